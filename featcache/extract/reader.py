"""Reader: decodes images in DataLoader workers into uint8 views; a bad file becomes a failure record."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from featcache.datasets import Item
from featcache.preprocess import render_views, view_params

logger = logging.getLogger(__name__)

_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class Decoded:
    index: int
    views: np.ndarray | None   # (V, H, W, 3) uint8; None once ``collate`` has stacked them (and for failures)
    params: np.ndarray | None  # (V, 10) int16: featcache.preprocess.PARAMS; None: the file failed
    width: int = 0
    height: int = 0
    sha1: str = ""
    error: str = ""
    exif_rotated: bool = False  # the file has an EXIF orientation other than 'normal' (ignored, see the runner)


class ImageReader(torch.utils.data.Dataset):
    """Indexable by image index; each call reads, hashes, decodes and builds that image's views."""

    def __init__(self, root: Path, items: Sequence[Item], size: tuple[int, int], n_views: dict[str, int], aug_seed: int) -> None:
        self.root, self.items, self.size, self.n_views, self.aug_seed = root, items, size, n_views, aug_seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Decoded:
        item = self.items[index]
        try:
            data = (self.root / item.path).read_bytes()
            if not data:
                raise ValueError("zero-byte file")
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now: truncated files fail here, not later
        except FileNotFoundError:
            broken = (self.root / item.path).is_symlink()
            return Decoded(index, None, None, error="broken symbolic link" if broken else "file not found")
        except UnidentifiedImageError:
            return Decoded(index, None, None, error="not an image PIL can identify")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return Decoded(index, None, None, error=f"{type(exc).__name__}: {exc}")
        params = view_params(self.n_views[item.split], self.aug_seed, index, self.size)
        views = render_views(img, self.size, params)
        rotated = img.getexif().get(_ORIENTATION, 1) not in (0, 1)
        return Decoded(index, views, params, img.width, img.height, hashlib.sha1(data).hexdigest(), exif_rotated=rotated)


@dataclass
class DecodedBatch:
    """One batch as the loader delivers it: the records (without their pixels) and every decoded view stacked
    once, in the worker, into one (rows, H, W, 3) uint8 tensor that the loader's pin-memory thread pins on CUDA
    (``pin_memory``), so the copy to the device can run without waiting."""

    records: list[Decoded]
    views: torch.Tensor

    @property
    def ok(self) -> list[Decoded]:
        """The records that decoded, in row order."""
        return [r for r in self.records if r.params is not None]

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(r.params) for r in self.ok], dtype=np.int64)

    @property
    def first_view(self) -> np.ndarray:
        """The row of view 0 of each decoded image within the batch."""
        c = self.counts
        return (np.cumsum(c) - c).astype(np.int64)

    def pin_memory(self) -> "DecodedBatch":
        return DecodedBatch(self.records, self.views.pin_memory())

    def nchw(self) -> torch.Tensor:
        """(rows, 3, H, W) uint8, a view of the same memory."""
        return self.views.permute(0, 3, 1, 2)


def collate(records: list[Decoded]) -> DecodedBatch:
    """Stack the decoded images' views once and keep the records without their pixels."""
    arrays = [r.views for r in records if r.views is not None]
    views = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty((0, 0, 0, 3), dtype=torch.uint8)
    return DecodedBatch([dataclasses.replace(r, views=None) for r in records], views)


class BlockSampler(torch.utils.data.Sampler):
    """Fixed blocks of ``batch_size`` consecutive image indices, skipping blocks already finished.

    Blocks are fixed by index, so a resumed run groups images exactly as an
    uninterrupted run does and produces the same numbers.
    """

    def __init__(self, n_items: int, batch_size: int, pending: np.ndarray) -> None:
        self.blocks = [
            list(range(s, min(s + batch_size, n_items)))
            for s in range(0, n_items, batch_size)
            if pending[s: s + batch_size].any()
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

