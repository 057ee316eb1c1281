"""Command-line entry points: ``python -m experiments.hopfield|cnn|p2g``."""
