"""Training: loss, optimizer and schedule, the train step, the loop, metrics."""
