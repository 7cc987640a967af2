"""The ranks of a ``torchrun`` launch: who this process is, and the few messages ranks exchange.

featcache reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins a gloo process
group: ranks only agree on the cache before they start and wait for each
other at the end, so gloo serves CPU and GPU runs alike and NCCL is never
needed. Each rank then works on its own shard (featcache.cache.shards).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch

from featcache.runtime import Ranks, rank_device, ranks_from_env

logger = logging.getLogger(__name__)

__all__ = ["Group", "Ranks", "rank_device", "ranks_from_env"]  # the ranks themselves live in featcache.runtime


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
