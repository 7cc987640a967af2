"""Checks shared by the trained stages' configs (torch-free, so the CLI starts fast)."""

from __future__ import annotations

from featcache.errors import ConfigError


def check_training(epochs: int, batch_size: int, instances: int, lr: float, lr_min: float) -> None:
    """Epochs, PK batch shape and learning rates that a training run can use."""
    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: expected at least 1")
    if instances < 2:
        raise ConfigError(f"--instances {instances}: expected at least 2 images per identity (the triplet loss needs positives)")
    if batch_size < 2 * instances or batch_size % instances:
        raise ConfigError(f"--batch-size {batch_size}: a batch is P identities x K images each (K = --instances {instances}), "
                          f"so expected a multiple of {instances} that covers at least 2 identities ({2 * instances}, "
                          f"{3 * instances}, ...)")
    if lr <= 0 or lr_min < 0 or lr_min > lr:
        raise ConfigError(f"lr {lr}, lr_min {lr_min}: expected 0 <= lr_min <= lr and lr > 0")


#: ``--precision`` of the trained stages: auto (bf16 autocast and channels_last on CUDA, float32 on the CPU),
#: fp32, or bf16 (autocast). No fp16: it would need loss scaling, and bf16 trains as fast on the GPUs that have it.
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
