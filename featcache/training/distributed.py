"""Data-parallel training under ``torchrun``: the process group, the model's gradients averaged across ranks, and
each rank's share of an epoch's batches.

Every rank draws the same epoch from the same random state (the PK batches and their views), then takes the
batches ``rank, rank + world, ...`` of the first ``world * (n // world)``: the shares are disjoint, equal in
number (DistributedDataParallel needs every rank to step alike), and together they are the epoch, less at most
``world - 1`` batches. ``--batch-size`` stays the size of one batch, so a step of K ranks trains on K batches.
NCCL joins GPU ranks, gloo CPU ones. Rank 0 alone writes the run's files.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from featcache.runtime import Ranks, ranks_from_env

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CallOf(nn.Module):
    """``fn`` of a module as its ``forward``, so that DistributedDataParallel syncs what that method computes."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


class TrainingGroup:
    """This process's place in a data-parallel launch; one process alone when not under torchrun."""

    def __init__(self, ranks: Ranks, device: torch.device, timeout_s: float = 3600) -> None:
        self.ranks, self.device = ranks, device
        self.owned, self.group = False, None  # whether this joined the default group; the group gradients use
        if ranks.distributed:
            import torch.distributed as dist

            backend = "nccl" if device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world, timeout=timedelta(seconds=timeout_s))
                self.owned = True
            elif dist.get_backend() != backend:  # a pipeline's gloo group: the GPUs' gradients go through NCCL
                self.group = dist.new_group(backend=backend)
            logger.info("rank %d of %d (%s)", ranks.rank, ranks.world, backend)

    @classmethod
    def from_env(cls, device: torch.device) -> "TrainingGroup":
        return cls(ranks_from_env(), device)

    @property
    def world(self) -> int:
        return self.ranks.world

    @property
    def is_main(self) -> bool:
        return self.ranks.rank == 0

    def barrier(self) -> None:
        if self.ranks.distributed:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, module: nn.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a method of ``module``) with its gradients averaged across ranks; ``fn`` itself alone."""
        if not self.ranks.distributed:
            return fn
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(CallOf(module, fn), device_ids=ids, process_group=self.group)

    def share(self, items: list[T]) -> list[T]:
        """This rank's share of an epoch's batches: every ``world``-th of the first ``world * (n // world)``."""
        if not self.ranks.distributed:
            return items
        n = len(items) // self.world * self.world
        return items[self.ranks.rank:n:self.world]

    def close(self) -> None:
        if self.ranks.distributed:
            import torch.distributed as dist

            if self.group is not None:
                dist.destroy_process_group(self.group)
            if self.owned and dist.is_initialized():  # a pipeline's group stays its own
                dist.destroy_process_group()
