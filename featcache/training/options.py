"""Checks shared by the trained stages' configs (torch-free, so the CLI starts fast)."""

from __future__ import annotations

from featcache.errors import ConfigError, InputError


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


def check_identities(n_ids: int, batch_size: int, instances: int, cache: object) -> None:
    """A training split with at least P = batch size / K identities, or no PK batch can be drawn from it."""
    p = batch_size // instances
    if n_ids < p:
        raise InputError(f"{cache}: {n_ids} training identities, fewer than P = {p} needed for P x K = {p} x {instances} "
                         f"batches (a batch is P identities x K images, K = --instances): lower --batch-size to at most "
                         f"{n_ids * instances}, or --instances")


#: ``--precision`` of the trained stages: auto (bf16 autocast and channels_last on CUDA, float32 on the CPU),
#: fp32, or bf16 (autocast). No fp16: it would need loss scaling, and bf16 trains as fast on the GPUs that have it.
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
