"""Where work runs: the device choices every stage offers, and how ``auto`` resolves."""

from __future__ import annotations

import os

from featcache.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str, option: str = "--device") -> None:
    if name not in DEVICES:
        raise ConfigError(f"{option} {name!r}: expected one of {', '.join(DEVICES)}")


def resolve_device(name: str, option: str = "--device"):
    """``auto``: CUDA when torch sees it, else CPU; ``cuda`` without CUDA is a configuration error."""
    import torch

    check_device_name(name, option)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} cuda: torch sees no CUDA device on this machine (use --device cpu or auto)")
    return torch.device(name)


def resolve_workers(workers: int | None, device) -> int:
    """Decoding processes. Auto (None): none on CPU, where decoding (about 1.5 ms an image) is cheap next to
    inference and a worker process would preempt torch's threads; up to 8 on CUDA, where the GPU
    would otherwise wait for decoding."""
    if workers is not None:
        return workers
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
