"""Reusable Flax NNX layers with logical axis names on every parameter."""
