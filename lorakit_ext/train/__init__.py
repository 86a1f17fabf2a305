"""The training engine: datasets, the training loop, background jobs."""
