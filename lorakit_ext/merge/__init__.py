"""Network algebra: exact merges, factor SVD re-compression, merge into checkpoints, extract, resize."""
