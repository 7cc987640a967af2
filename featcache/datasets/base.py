"""The dataset item model shared by every layout reader."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from featcache.errors import InputError

logger = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class DatasetLayoutError(InputError):
    """The folder does not follow the dataset's official layout or naming rule."""


@dataclass(frozen=True)
class Item:
    """One image: its path relative to the dataset root, identity, camera and split.

    Identities and cameras are kept as the dataset names them (Market-1501
    cameras are 1-6, VeRi-776 cameras 1-20); pid 0 is a distractor.
    """

    path: str
    pid: int
    camid: int
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DatasetLayoutError(f"{self.path}: split {self.split!r} is not one of {SPLITS}")


class Rejected(NamedTuple):
    """A file whose name breaks the dataset's rule: never guessed into an identity, recorded as failed."""

    path: str
    reason: str
    split: str  # the split of the folder it was found in


@dataclass
class Listing:
    """What a reader found: the usable items and the files it had to reject (path, reason)."""

    name: str
    root: Path
    items: list[Item] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    junk: int = 0  # files the protocol itself leaves out (Market-1501 / Duke pid -1 boxes)

    def count(self, split: str) -> int:
        return sum(1 for it in self.items if it.split == split)

    def summary(self) -> str:
        parts = [f"{s}: {self.count(s)}" for s in SPLITS]
        if self.junk:
            parts.append(f"junk boxes left out by the protocol: {self.junk}")
        if self.rejected:
            parts.append(f"rejected names: {len(self.rejected)}")
        return f"{self.name} at {self.root} ({', '.join(parts)})"


def require_dir(root: Path, sub: str, dataset: str, hint: str) -> Path:
    """Return ``root/sub`` or raise naming the missing folder and the expected layout."""
    path = root / sub
    if not path.is_dir():
        raise DatasetLayoutError(
            f"{dataset}: folder {path} not found. Expected layout under {root}: {hint}"
        )
    return path


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (other files, e.g. Thumbs.db, are skipped)."""
    # broken symbolic links are kept: extraction records them as failed rather than leaving them out unseen
    files = sorted(p for p in folder.iterdir() if (p.is_file() or p.is_symlink() and not p.exists()) and p.suffix.lower() in IMAGE_SUFFIXES)
    others = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        logger.debug("%s: skipping %d non-image files (%s ...)", folder, len(others), others[0])
    return files


def raise_on_rejected(listing: Listing, pattern: str, strict: bool) -> None:
    """In strict mode, refuse a listing with badly named files; else log them.

    Names that break the dataset's rule are never guessed into an identity.
    """
    if not listing.rejected:
        return
    shown = "\n".join(f"  {r.path}: {r.reason}" for r in listing.rejected[:20])
    more = f"\n  ... and {len(listing.rejected) - 20} more" if len(listing.rejected) > 20 else ""
    if strict:
        names = ", ".join(r.path for r in listing.rejected[:5])
        raise DatasetLayoutError(
            f"{listing.name}: {len(listing.rejected)} file(s) under {listing.root} do not follow "
            f"the naming rule {pattern}: {names}"
            + (f" and {len(listing.rejected) - 5} more" if len(listing.rejected) > 5 else "")
            + "; rename or remove them, or pass --skip-bad-names to record them as failed and go on"
            + f"\n{shown}{more}"
        )
    logger.warning(
        "%s: %d file(s) do not follow %s and are recorded as failed:\n%s%s",
        listing.name, len(listing.rejected), pattern, shown, more,
    )


#: the resolved config ``featcache synth`` writes inside a synthetic dataset (``synth.CONFIG_NAME``, the same name)
SYNTH_CONFIG = "featcache-synth.yaml"
#: camera conditions of synthetic datasets, in the order a cache's ``condition`` annotation indexes them
CONDITIONS = ("day", "night", "blur")


def camera_conditions(root: str | Path) -> dict[int, str] | None:
    """Each camera's condition (day, night, blur) of a synthetic dataset written by ``featcache synth``, read from
    its config inside ``root``; None for any other dataset."""
    import yaml

    path = Path(root) / SYNTH_CONFIG
    if not path.is_file():
        return None
    cfg = (yaml.safe_load(path.read_text()) or {}).get("synth", {})
    night, blur = set(cfg.get("night_cams") or ()), set(cfg.get("blur_cams") or ())
    return {c: "night" if c in night else "blur" if c in blur else "day" for c in range(1, int(cfg.get("cams", 0)) + 1)}


def condition_rows(listing: "Listing", n_views: np.ndarray, conditions: dict[int, str]) -> np.ndarray:
    """Per view row of a cache made from ``listing`` (``n_views`` per image, in listing order), the index of its
    camera's condition in ``CONDITIONS``."""
    per_image = np.array([CONDITIONS.index(conditions.get(it.camid, "day")) for it in listing.items]
                         + [0] * len(listing.rejected), dtype=np.int8)
    return np.repeat(per_image, n_views)
