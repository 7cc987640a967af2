"""A trained model in the user's own code: images in, the features ``featcache eval`` ranks out.

``Embedder`` is what ``featcache.load_model`` returns: a ``torch.nn.Module`` in eval mode whose ``preprocess``
turns images (file paths, PIL images or uint8 tensors) into the exact pixels evaluation feeds the model (view
0: the image letterboxed to the run's input size, uint8), whose ``forward`` turns those pixels into
L2-normalised features, and whose ``embed`` does both in batches. Each stage package subclasses it for its
runs and registers a loader by the command that makes such a run (``features.register_run_model``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from featcache.errors import InputError
from featcache.preprocess import letterbox

Images = Sequence[Any] | torch.Tensor


def read_image(item: Any) -> Image.Image:
    """A PIL image from a file path or a PIL image; an unreadable file is one ``InputError`` line naming it."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, Path)):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: cannot read the image ({exc.strerror or type(exc).__name__})") from None
        try:
            img = Image.open(io.BytesIO(data))  # as evaluation decodes it: the file's bytes
            img.load()
            return img
        except (OSError, UnidentifiedImageError, ValueError):
            raise InputError(f"{path}: cannot read the image (not an image file PIL can decode, or a truncated one)") from None
    raise InputError(f"images: expected file paths, PIL images or a uint8 tensor (N, 3, H, W), got {type(item).__name__}")


def as_pil(images: Images) -> list[Image.Image]:
    """The images of any accepted form as PIL images (a uint8 tensor (N, 3, H, W) or (3, H, W) included)."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise InputError(f"images: expected a uint8 tensor (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        batch = images[None] if images.ndim == 3 else images
        return [Image.fromarray(x.permute(1, 2, 0).contiguous().cpu().numpy()) for x in batch]
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    return [read_image(x) for x in images]


def batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    if size < 1:
        raise InputError(f"batch_size {size}: expected at least 1")
    for s in range(0, len(items), size):
        yield items[s: s + size]


class Embedder(torch.nn.Module):
    """A trained model as evaluation runs it: ``preprocess`` (images -> view-0 uint8 pixels), ``forward`` (pixels ->
    L2-normalised features), ``embed`` (both, in batches, to a NumPy array). Subclasses implement ``features``."""

    def __init__(self, image_size: tuple[int, int], device: torch.device) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.device = torch.device(device)

    def preprocess(self, images: Images) -> torch.Tensor:
        """(N, 3, H, W) uint8 on the model's device: each image letterboxed to the run's input size, exactly the
        pixels ``featcache eval`` gives the model (view 0)."""
        images = as_pil(images)
        if not images:
            raise InputError("images: expected at least one image")
        pixels = np.stack([letterbox(img, self.image_size) for img in images])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(self.device)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(N, 3, H, W) uint8 -> (N, D) float features before their L2 normalisation."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 (``preprocess``'s output) -> (N, D) float32 L2-normalised features."""
        if pixels.dtype != torch.uint8:
            raise InputError(f"expected the uint8 pixels preprocess() gives, got {pixels.dtype}")
        return torch.nn.functional.normalize(self.features(pixels.to(self.device)).float(), dim=1)

    @torch.inference_mode()
    def embed(self, images: Images, batch_size: int = 64) -> np.ndarray:
        """(N, D) float32 features of ``images`` (paths, PIL images or a uint8 tensor), row for row."""
        items = images if isinstance(images, torch.Tensor) else ([images] if isinstance(images, (str, Path, Image.Image)) else list(images))
        out = [self(self.preprocess(b)).cpu().numpy() for b in batches(items, batch_size)]
        if not out:
            raise InputError("images: expected at least one image")
        return np.concatenate(out)
