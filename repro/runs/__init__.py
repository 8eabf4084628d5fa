"""Floor 7: one table entry end to end: the work-folder layout, run folders with status and lock, data preparation, train + evaluate, published checkpoints, the demo."""
