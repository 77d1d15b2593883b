"""Evaluation during training: validation images, evaluation loss, metrics and plots."""
