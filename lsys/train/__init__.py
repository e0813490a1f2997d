"""Training: the loop (trainer), engines, optimizer and schedule, checkpoints and metrics."""
