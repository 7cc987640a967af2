"""What every training stage shares: the run directory (config, log, checkpoints, resume, NaN stop),
PK sampling, the task losses and the learning-rate schedule."""
