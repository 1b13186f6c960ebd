"""Data pipeline, training loop, strategies, checkpoints and the command line."""
