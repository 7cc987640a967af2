"""What a trained stage gives the training loop (``Stage``: an epoch's plan, ``Epoch``, and each batch's ``Step``),
and what a hook reads of the loop (``LoopState``). Plain types, so that the loop and its hooks share them
without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Iterable, Protocol, TypeVar

import numpy as np
import torch

B = TypeVar("B")


@dataclass
class Step:
    """What one step gives the loop: the loss it minimises and the scalars the epoch's log averages (the loss is
    logged as ``loss``; a column a stage never logs in an epoch is left empty in the log)."""

    loss: torch.Tensor
    logged: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Epoch(Generic[B]):
    """An epoch's plan: its batches (any iterable: a list, a DataLoader), how many, and how many images they hold."""

    batches: Iterable[B]
    steps: int
    images: int


class Stage(Protocol[B]):
    """What a trained stage gives the loop."""

    #: the averaged columns of the log, in order (``loss`` first)
    columns: tuple[str, ...]

    def begin_epoch(self, epoch: int, rng: np.random.Generator) -> Epoch[B]:
        """Set the model up for ``epoch`` (schedules of its own) and draw the epoch's batches from ``rng``."""

    def step(self, batch: B) -> Step:
        """The forward pass and losses of one batch (the loop does backward and the optimizer step)."""

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Extra columns for the epoch's log row (after the averaged ones, lr, seconds and images/s)."""


class LoopState(Protocol):
    """What a hook reads of the loop running it."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    schedule: Any
    rng: np.random.Generator
    device: torch.device
    run: Any            # the RunDir, or None
    desc: str
    stage: Stage
    start: int          # the first epoch this process trains (after a resumed checkpoint)
