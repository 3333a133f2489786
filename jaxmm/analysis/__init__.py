"""Analyses of where to prune: opt-in capture, Entropy Collapse Layer, information horizon."""
