"""Where work runs: the device choices every stage offers, and how ``auto`` resolves."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from featcache.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: batches each decoding worker prepares ahead: few, since each sits in shared memory (/dev/shm) until used
PREFETCH = 2
SHM = "/dev/shm"

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N, one GPU of several


def check_device_name(name: str, option: str = "--device") -> None:
    """auto, cpu, cuda, or cuda:N (every stage accepts the same names)."""
    index = name[5:] if isinstance(name, str) and name.startswith("cuda:") else None
    if name not in DEVICES and not (index is not None and index.isdigit()):
        raise ConfigError(f"{option} {name!r}: expected auto, cpu, cuda or cuda:N")


def resolve_device(name: str, option: str = "--device"):
    """``auto``: CUDA when torch sees it, else CPU; ``cuda`` without CUDA is a configuration error. ``option``: how
    the caller names the setting (``--device`` on the command line, ``device`` for a Python keyword)."""
    import torch

    check_device_name(name, option)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    said = f"{option} {name}" if option.startswith("--") else f"{option}={name!r}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        hint = f"{option} cpu or auto" if option.startswith("--") else f"{option}='cpu' or 'auto'"
        raise ConfigError(f"{said}: torch sees no CUDA device on this machine (use {hint})")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{said}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return device


def torch_device_name(device) -> str:
    """A device by name, for reports (the GPU model on CUDA)."""
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def resolve_workers(workers: int | None, device) -> int:
    """Decoding processes. Auto (None): none on CPU, where decoding (about 1.5 ms an image) is cheap next to
    inference and a worker process would preempt torch's threads. On CUDA the GPU outruns decoding (CLIP
    ViT-B/16 ran 6,000 views/s on an H200, while 12 workers fed the student 1,500-1,600 images/s, 2026-12-04),
    so each rank takes its share of the cores it may use, less one for itself and its writer thread."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // local - 1)


def parse_workers(value) -> int | None:
    """``auto`` (or None) -> None; otherwise a count of decoding processes."""
    if value is None or str(value).lower() == "auto":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r}: expected a number of processes or auto") from None


def workers_for_shm(workers: int, batch_bytes: int, shm: str = SHM) -> int:
    """As many of ``workers`` as shared memory holds: each keeps up to ``PREFETCH`` batches of ``batch_bytes`` in
    ``shm`` (Docker gives containers 64 MiB by default, where 15 workers of 50 MB batches end in "DataLoader worker
    killed by signal: Bus error"). Fewer workers, or none (decoding in the main process), with one line saying why."""
    if workers <= 0 or not os.path.isdir(shm):
        return workers
    free = shutil.disk_usage(shm).free
    per_worker = PREFETCH * max(1, batch_bytes) * 5 // 4  # a quarter spare: the batch being handed over
    fit = min(workers, free // per_worker)
    if fit < workers:
        logger.warning("%s has %.0f MiB free, too little for %d decoding workers holding %d batches of %.0f MiB each: "
                       "using %d (give a container more shared memory, e.g. docker run --shm-size=8g)", shm, free / 2**20,
                       workers, PREFETCH, batch_bytes / 2**20, fit)
    return int(fit)


def loader_options(device, workers: int, batch_bytes: int) -> dict:
    """DataLoader keywords for decoding workers that feed ``device``: workers that fit in shared memory, a small
    prefetch, and pinned batches on CUDA. Create the loader's iterator inside ``on_device(device)`` so that its
    pinning thread works on that GPU (torch pins on the current device; ``pin_memory_device`` is deprecated)."""
    n = workers_for_shm(workers, batch_bytes)
    return {"num_workers": n, "pin_memory": device.type == "cuda", "prefetch_factor": PREFETCH if n else None}


def on_device(device):
    """``device`` as the current CUDA device for a ``with`` block, restored after it; nothing on the CPU. Library
    calls never change the caller's current device for longer than that."""
    if getattr(device, "type", "cpu") != "cuda":
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(device)


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
    import torch

    if device.type == "cuda" and ranks.distributed:
        device = torch.device("cuda", ranks.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    return device
