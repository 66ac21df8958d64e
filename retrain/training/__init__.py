"""Training: the head and its fit loop, cached and pixel datasets, fine-tuning, checkpoints, the training paths."""
