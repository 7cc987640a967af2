"""The ranks of a ``torchrun`` launch: who this process is, and the few messages ranks exchange.

featcache reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins a gloo process
group: ranks only agree on the cache before they start and wait for each
other at the end, so gloo serves CPU and GPU runs alike and NCCL is never
needed. Each rank then works on its own shard (featcache.cache.shards).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from featcache.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def ranks_from_env() -> Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 outside one)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} and WORLD_SIZE {world}: expected 0 <= RANK < WORLD_SIZE (torchrun sets them)")
    if world > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        raise ConfigError(f"WORLD_SIZE is {world} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
    return Ranks(rank, world, local)


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """A rank's own GPU (LOCAL_RANK) when the run is on CUDA; the device unchanged otherwise."""
    if device.type == "cuda" and ranks.distributed:
        device = torch.device("cuda", ranks.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    return device


class Group:
    """The gloo process group of a launch: ``share`` a value from rank 0, ``wait`` for every rank."""

    def __init__(self, ranks: Ranks, timeout_s: float = 7 * 24 * 3600) -> None:
        import torch.distributed as dist

        self.ranks = ranks
        self.dist = dist
        self.owned = False
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=timedelta(seconds=timeout_s))
            self.owned = True

    def share(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        t = torch.tensor([0 if flag else 1])
        self.dist.all_reduce(t)
        return int(t.item()) == 0

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
