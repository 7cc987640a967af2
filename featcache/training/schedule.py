"""The learning-rate schedule of every trained stage: cosine decay from ``lr`` to ``lr_min`` over all steps."""

from __future__ import annotations

import math


def cosine_lr(lr: float, lr_min: float, step: int, total: int) -> float:
    """The rate at ``step`` of ``total``; a step past the end stays at ``lr_min`` (an epoch's PK batches can
    outnumber ``steps_per_epoch`` by one or two for another seed, and the cosine must not turn back up)."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def set_lr(optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
