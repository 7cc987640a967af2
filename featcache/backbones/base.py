"""The frozen-backbone interface: what every family produces and how weights are identified."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from featcache.backbones.presets import Preset
from featcache.cache.spec import OutputSpec
from featcache.errors import InputError
from featcache.registry import Registry

logger = logging.getLogger(__name__)


class WeightsNotFoundError(InputError):
    """Pretrained weights could not be found; the message says where we looked and how to supply them."""


class Backbone(nn.Module):
    """A frozen backbone returning a dict of named outputs for a normalised image batch.

    Subclasses implement ``build`` (construct and load weights) and ``forward``.
    ``weights_id`` identifies the weights (tag, file hash, or random seed) so
    that a cache records exactly what produced it.
    """

    family: str = ""

    def __init__(self, preset: Preset, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.preset = preset
        self.image_size = image_size
        self.weights_id = ""
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW in [0, 255] to the preset's normalised float input."""
        return (images_uint8.float() / 255.0 - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def output_specs(self) -> dict[str, OutputSpec]:
        """Shapes of every output, found by running one blank image through the model."""
        device = next(self.parameters()).device
        dummy = torch.zeros(1, 3, *self.image_size, device=device)
        out = self.forward(dummy)
        return {k: OutputSpec(tuple(v.shape[1:]), self._dtype(k), self._doc(k), k == "tokens") for k, v in out.items()}

    @staticmethod
    def _dtype(name: str) -> str:
        # attention maps (sums of |F| over hundreds of channels) can exceed fp16's range
        return "float16" if name in ("tokens", "cls_attn") else "float32"

    def _doc(self, name: str) -> str:
        return name


FAMILIES: Registry[Callable[[Preset, tuple[int, int], str | None, bool], Backbone]] = Registry("backbone family")
register_family = FAMILIES.register
family_builder = FAMILIES.get


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def attention_map(tokens_or_map: torch.Tensor) -> torch.Tensor:
    """Eq. 11's spatial attention A = sum_c |F^c|: (N, C, H, W) -> (N, H, W)."""
    return tokens_or_map.abs().sum(dim=1)
