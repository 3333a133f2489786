"""Flax layers shared by the model families."""
