"""Training: the per-worker loop and its named steps."""
