"""CADIT: conditional adversarial image translation for domain adaptation (spec: cadit.md)."""
