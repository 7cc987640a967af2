"""What the benchmark scripts share: offline model hubs (weights come from local caches only, never a download in
the middle of a timing) and the line that names the device a figure was measured on.

Import it before featcache: ``import benchkit`` sets ``HF_HUB_OFFLINE`` for the backbones it loads.
"""

from __future__ import annotations

import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def device_line(device=None) -> str:
    """``NVIDIA H100 ...`` for a CUDA device, else ``CPU (x86_64, 2 cores, torch threads 2)``."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
