"""Floor 6: the training loop (Accelerate) and its resumable state."""
