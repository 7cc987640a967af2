"""Mapper: runs every backbone on a batch of uint8 views (inference mode, bf16 autocast on CUDA)."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from featcache.backbones import Backbone, OutputSpec

logger = logging.getLogger(__name__)


class Mapper:
    def __init__(self, backbones: dict[str, Backbone], specs: dict[str, dict[str, OutputSpec]], device: torch.device) -> None:
        self.backbones = {k: b.to(device).eval() for k, b in backbones.items()}
        self.specs = specs
        self.device = device

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
        """uint8 (rows, 3, H, W) -> {backbone: {output: array (rows, ...)}} in the stored dtypes."""
        x = views.to(self.device, non_blocking=True)
        out: dict[str, dict[str, np.ndarray]] = {}
        with self._autocast():
            for name, bb in self.backbones.items():
                res = bb(bb.normalize(x))
                out[name] = {k: v.float().cpu().numpy().astype(self.specs[name][k].dtype, copy=False) for k, v in res.items()}
        return out
