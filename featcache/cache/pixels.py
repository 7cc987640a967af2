"""The exact pixels a backbone saw: a cached view rebuilt from its image file and stored view parameters.

Extraction builds every view with ``featcache.preprocess.render_views``
(``letterbox``, then ``view_of`` per view); this module calls the same two
functions with the parameters the cache stored, so a
later stage (the student) is shown, pixel for pixel, what the teacher saw.
The image file must still be the one extracted (its SHA-1 is checked).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.cache.store import DONE, CacheError, open_cache_file, read_identity
from featcache.errors import InputError
from featcache.preprocess import letterbox, view_of


class ViewPixels:
    """Rebuilds cached views of one cache; opens the cache's tables once."""

    def __init__(self, cache: Path, root: Path | None = None) -> None:
        self.cache = Path(cache)
        with open_cache_file(cache) as f:
            ident = read_identity(f, cache)
            g, v = f["images"], f["views"]
            self.paths = g["path"].asstr()[...]
            self.status, self.sha1 = g["status"][...], g["sha1"][...]
            self.view_start, self.n_views = g["view_start"][...], g["n_views"][...]
            cols = [v["dx"][...][:, None], v["dy"][...][:, None], v["flip"][...][:, None]]
            if "erase" in v:  # format 3: random erasing
                cols += [v["erase"][...], v["erase_fill"][...]]
            self.params = np.concatenate([c.astype(np.int16) for c in cols], 1)
        self.root = Path(root) if root is not None else Path(ident.dataset_root)
        self.size = tuple(ident.preprocessing["image_size"])

    def base(self, image: int) -> np.ndarray:
        """(H, W, 3) uint8: cache image row ``image`` decoded and letterboxed, the image every view is cut from;
        a file changed since extraction (its SHA-1 differs) is refused."""
        if not 0 <= image < len(self.paths) or self.status[image] != DONE:
            raise CacheError(f"{self.cache}: image row {image} is not a cached image")
        path = self.root / self.paths[image]
        data, problem = self.file(image)
        if problem == "changed":
            raise InputError(f"{path} changed since it was extracted into {self.cache} (its SHA-1 differs)")
        if problem:
            raise InputError(f"{path}: cannot read the image extracted into {self.cache} ({problem}); "
                             "is the dataset root the folder it was extracted from?")
        return letterbox(Image.open(io.BytesIO(data)), self.size)

    def file(self, image: int) -> tuple[bytes, str]:
        """The image file's bytes and what is wrong with it: '' (it is the file extracted), 'changed' (its SHA-1
        differs) or why it cannot be read."""
        try:
            data = (self.root / self.paths[image]).read_bytes()
        except OSError as exc:
            return b"", exc.strerror or type(exc).__name__
        if hashlib.sha1(data).hexdigest().encode() != self.sha1[image]:
            return data, "changed"
        return data, ""

    def image_views(self, image: int, views: list[int] | None = None) -> torch.Tensor:
        """(V, 3, H, W) uint8: views ``views`` (default all) of cache image row ``image``, as extraction fed them."""
        if not 0 <= image < len(self.paths) or self.status[image] != DONE:
            raise CacheError(f"{self.cache}: image row {image} is not a cached image")
        n = int(self.n_views[image])
        views = list(range(n)) if views is None else views
        bad = [v for v in views if not 0 <= v < n]
        if bad:
            raise CacheError(f"{self.cache}: image {self.paths[image]} has views 0..{n - 1}, not {bad}")
        base = self.base(image)
        rows = self.view_start[image] + np.asarray(views, dtype=np.int64)
        return torch.from_numpy(np.stack([view_of(base, p) for p in self.params[rows]])).permute(0, 3, 1, 2)


def view_pixels(cache: Path, image: int, view: int) -> torch.Tensor:
    """(3, H, W) uint8: the exact input extraction gave every backbone for ``view`` of cache image row ``image``.

    Each backbone then normalises it its own way (``Backbone.normalize``).
    """
    return ViewPixels(cache).image_views(image, [view])[0]
