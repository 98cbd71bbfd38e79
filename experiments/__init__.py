"""Experiment commands: thin layers from a CLI or config to so3lib library calls (python -m experiments.X)."""
