"""Building blocks that know nothing of training: typed configs, layers over the kernels, checkpoints, JSON files."""
