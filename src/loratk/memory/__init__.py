"""Training memory without a GPU: run the real training step on fake tensors (no storage allocated) and count
the bytes alive at every point (`tracker`), then fit the cost of a batch (`estimate`)."""
