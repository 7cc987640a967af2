"""Dataset layouts: readers for the official folder structures and a CSV manifest."""

from __future__ import annotations

from pathlib import Path

from featcache.datasets.base import SPLITS, DatasetLayoutError, Item, Listing, Rejected, raise_on_rejected
from featcache.datasets.layouts import PATTERNS, available, get_reader

__all__ = ["SPLITS", "DatasetLayoutError", "Item", "Listing", "Rejected", "available", "load_listing"]


def load_listing(name: str, root: str | Path, strict: bool = True) -> Listing:
    """List a dataset in its official layout.

    ``strict`` refuses files whose names break the dataset's rule; otherwise
    they are kept in ``Listing.rejected`` so that extraction records them.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DatasetLayoutError(f"{name}: dataset root {root} does not exist")
    listing = get_reader(name)(root)
    raise_on_rejected(listing, PATTERNS[name], strict)
    if not listing.items:
        raise DatasetLayoutError(f"{name}: no images found under {listing.root}")
    return listing
