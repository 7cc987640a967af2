"""Image preprocessing shared by extraction and every later stage, so pixels match exactly.

An image is resized with PIL bilinear interpolation to fit (H, W) keeping its
aspect ratio, and centred on a zero (black) canvas. View 0 is that image,
view 1 its horizontal flip; training views 2+ are seeded augmentations:
pad by ``AUG_PAD`` zeros, crop (H, W) at offset (dy, dx), flip if drawn. The
parameters (dx, dy, flip) of every view are stored in the cache, so
``apply_view(letterbox(img), dx, dy, flip)`` rebuilds the exact pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

AUG_PAD = 10


def letterbox(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB image -> uint8 array (H, W, 3), aspect preserved, zero padded, centred."""
    h, w = size
    scale = min(h / img.height, w / img.width)
    nh, nw = max(1, round(img.height * scale)), max(1, round(img.width * scale))
    resized = np.asarray(img.convert("RGB").resize((nw, nh), Image.BILINEAR))
    out = np.zeros((h, w, 3), dtype=np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top: top + nh, left: left + nw] = resized
    return out


#: random erasing (the paper's §3.2, torchreid's RandomErasing): probability, area share, aspect range, fill (RGB)
ERASE_P, ERASE_AREA, ERASE_ASPECT, ERASE_FILL = 0.5, (0.02, 0.4), (0.3, 1 / 0.3), (124, 116, 104)
#: columns of a view's parameters
PARAMS = ("dx", "dy", "flip", "ex", "ey", "ew", "eh", "fill_r", "fill_g", "fill_b")


def view_params(n_views: int, seed: int, index: int, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """(n_views, 10) int16 rows of ``PARAMS``: view 0 clean, view 1 flipped, then seeded pad-crops, flips and
    random erasing (a rectangle ex, ey, ew, eh of the final view filled with fill; ew = 0: none).

    The seed of view v of image ``index`` is (seed, index, v), independent of
    batch order, so a resumed run draws the same augmentations.
    """
    none = (0, 0, 0, 0, 0, 0, 0)
    rows = [(AUG_PAD, AUG_PAD, 0, *none), (AUG_PAD, AUG_PAD, 1, *none)][:n_views]
    h, w = size
    for v in range(2, n_views):
        rng = np.random.default_rng([seed, index, v])
        dx, dy = rng.integers(0, 2 * AUG_PAD + 1, size=2)
        flip = int(rng.random() < 0.5)
        erase = none
        if rng.random() < ERASE_P:
            for _ in range(100):  # torchreid's RandomErasing: a rectangle of random area and aspect that fits
                area = rng.uniform(*ERASE_AREA) * h * w
                aspect = rng.uniform(*ERASE_ASPECT)
                eh, ew = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
                if 0 < ew < w and 0 < eh < h:
                    ey, ex = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                    erase = (ex, ey, ew, eh, *ERASE_FILL)
                    break
        rows.append((int(dx), int(dy), flip, *erase))
    return np.asarray(rows, dtype=np.int16).reshape(-1, len(PARAMS))


def apply_view(base: np.ndarray, dx: int, dy: int, flip: int, ex: int = 0, ey: int = 0, ew: int = 0, eh: int = 0,
               fill: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Pad ``base`` (H, W, 3) by AUG_PAD zeros, crop (H, W) at (dy, dx), optionally flip left-right, then
    erase the rectangle (ex, ey, ew, eh) of the result with ``fill`` (ew = 0: no erasing)."""
    h, w = base.shape[:2]
    if (dx, dy) == (AUG_PAD, AUG_PAD):
        out = base
    else:
        padded = np.pad(base, ((AUG_PAD, AUG_PAD), (AUG_PAD, AUG_PAD), (0, 0)))
        out = padded[dy: dy + h, dx: dx + w]
    out = np.ascontiguousarray(out[:, ::-1] if flip else out)
    if ew > 0 and eh > 0:
        out = out.copy() if out is base else out
        out[ey: ey + eh, ex: ex + ew] = np.asarray(fill, dtype=np.uint8)
    return out


def render_views(img: Image.Image, size: tuple[int, int], params: np.ndarray) -> np.ndarray:
    """(V, H, W, 3) uint8: the views with parameters ``params`` (rows of dx, dy, flip) of a decoded image.

    The one function that turns an image and stored view parameters into
    pixels: extraction uses it, and so does every later stage that must see
    what the backbones saw (``featcache.cache.pixels``).
    """
    base = letterbox(img, size)
    return np.stack([view_of(base, p) for p in np.asarray(params)])


def view_of(base: np.ndarray, params: np.ndarray) -> np.ndarray:
    """One view (H, W, 3) of a letterboxed image from its stored parameters (a row of ``PARAMS``, or dx, dy, flip)."""
    p = np.asarray(params).astype(int)
    erase = (p[3], p[4], p[5], p[6], tuple(p[7:10])) if len(p) >= 10 else ()
    return apply_view(base, p[0], p[1], p[2], *erase)


def parse_size(text: str | int | tuple | list) -> tuple[int, int]:
    """'256' -> (256, 256); '256x128' -> (256, 128) as (H, W)."""
    if isinstance(text, (tuple, list)):
        text = "x".join(str(v) for v in text)
    parts = str(text).lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"image size {text!r}: expected N or HxW, e.g. 256 or 256x128") from None
    if len(vals) == 1:
        vals *= 2
    if len(vals) != 2 or min(vals) < 16:
        raise ValueError(f"image size {text!r}: expected N or HxW with sides of at least 16 pixels")
    return vals[0], vals[1]
