"""``featcache train-gate``'s config: the only place its defaults live (torch-free, so the CLI starts fast)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from featcache.config import StageConfig
from featcache.errors import ConfigError
from featcache.runtime import check_device_name


@dataclasses.dataclass(frozen=True)
class GateConfig(StageConfig):
    """``featcache train-gate``: the teacher's adapters and gate (paper §3.1, §3.3)."""

    command = "train-gate"

    cache: Path
    out: Path
    experts: tuple[str, ...] = ()        # empty: every backbone in the cache
    fusion: str = "moe-top1"
    epochs: int = 60
    seed: int = 42
    device: str = "auto"
    batch_size: int = 32                 # P x K with K = instances
    instances: int = 4
    lr: float = 3e-4
    lr_min: float = 3e-6
    weight_decay: float = 5e-4
    beta: float = 0.5                    # weight of the triplet loss
    margin: float = 0.3
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        from featcache.gate.model import FUSIONS  # the registry lives with the fusions (torch)

        FUSIONS.get(self.fusion)
        check_device_name(self.device)
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs}: expected at least 1")
        if self.instances < 2:
            raise ConfigError(f"instances {self.instances}: expected at least 2 images per identity (the triplet loss needs positives)")
        if self.batch_size < 2 * self.instances or self.batch_size % self.instances:
            raise ConfigError(f"batch_size {self.batch_size}: expected a multiple of instances ({self.instances}) covering at least 2 identities")
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ConfigError(f"lr {self.lr}, lr_min {self.lr_min}: expected 0 <= lr_min <= lr and lr > 0")
        if self.weight_decay < 0 or self.beta < 0 or self.margin < 0:
            raise ConfigError("weight_decay, beta and margin must not be negative")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing {self.label_smoothing}: expected 0 <= value < 1")
        if len(set(self.experts)) != len(self.experts):
            raise ConfigError(f"--experts names an expert twice: {','.join(self.experts)}")
        if self.experts:
            check_experts(self.fusion, self.experts)


#: fusions that use one expert alone, and the family of that expert
SINGLE_EXPERT = {"clip": "open_clip", "align": "align"}


def check_experts(fusion: str, experts: tuple[str, ...] | list[str]) -> None:
    """Fusions that combine experts need at least two (a gate over one expert routes nothing)."""
    if len(experts) < 2 and fusion not in SINGLE_EXPERT:
        raise ConfigError(f"--fusion {fusion} combines experts and needs at least two; got {', '.join(experts) or 'none'} "
                          "(use --fusion clip or align for one expert alone)")
