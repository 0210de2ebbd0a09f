"""Training: the loop around DeepSpeed, the optimizer and LR schedule, process groups, the run folder."""
