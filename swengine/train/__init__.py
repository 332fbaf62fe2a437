"""The training loop and its pieces."""
