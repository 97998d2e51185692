"""Training: the step, the loop, checkpoints, evaluation and metrics."""
