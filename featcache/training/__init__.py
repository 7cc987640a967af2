"""What every training stage shares: the one training loop (``loop``) and its precision (``precision``), the run
directory (config, log, checkpoints, resume, NaN stop), PK sampling, the task losses and the learning-rate schedule."""
