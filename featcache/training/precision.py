"""How a trained stage computes on its device: autocast dtype and memory format (torch-free names in ``options``).

``auto`` is what the hardware wants: bf16 autocast on CUDA (float32's range, so no loss scaling), float32 on
the CPU, the reference every equality test compares against. The layout follows the device, whatever the
precision: channels_last for convolutional models on CUDA (the layout tensor cores read without transposes),
the default one on the CPU. Losses are computed in float32 either way (the stages cast the model's outputs
before their losses)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from featcache.errors import check_choice
from featcache.training.options import TRAIN_PRECISIONS


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: float32) and whether the model and its image inputs are channels_last."""

    dtype: torch.dtype | None = None
    channels_last: bool = False
    device_type: str = "cpu"

    @classmethod
    def resolve(cls, requested: str, device: torch.device, convolutional: bool = False) -> "Precision":
        check_choice(requested, TRAIN_PRECISIONS, "--precision")
        cuda = device.type == "cuda"
        if requested == "auto":
            requested = "bf16" if cuda else "fp32"
        return cls(torch.bfloat16 if requested == "bf16" else None, cuda and convolutional, device.type)

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context a forward pass runs in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in its memory format (a checkpoint's weights are saved contiguous and load into either)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """An (N, C, H, W) batch in the model's memory format (a no-op where it already is)."""
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
