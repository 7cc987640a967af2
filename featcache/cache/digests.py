"""What a cache's identity says the data *is*: digests of the image list and of every listed file's bytes."""

from __future__ import annotations

import hashlib

import numpy as np

from featcache.datasets import Listing


def items_digest(listing: Listing) -> str:
    """Digest of the image list (paths, labels, splits, rejected names): part of the cache's identity."""
    h = hashlib.sha1()
    for it in listing.items:
        h.update(f"{it.path}\t{it.pid}\t{it.camid}\t{it.split}\n".encode())
    for r in listing.rejected:
        h.update(f"{r.path}\trejected\n".encode())
    return h.hexdigest()


def file_digests(listing: Listing) -> np.ndarray:
    """SHA-1 (hex, S40) of every listed file's bytes, in listing order; a file that cannot be read gets its
    reason instead (extraction records it as failed). What the cache's identity says the data *is*."""
    from featcache.progress import progress

    out = np.empty(len(listing.items), dtype="S40")
    with progress(total=len(listing.items), desc="identify", unit="file", leave=False) as bar:
        for i, it in enumerate(listing.items):
            try:
                out[i] = hashlib.sha1((listing.root / it.path).read_bytes()).hexdigest().encode()
            except OSError as exc:
                out[i] = f"unreadable:{exc.errno}".encode()
            bar.update(1)
    return out


def content_digest(listing: Listing, digests: np.ndarray) -> str:
    """Digest of (path, SHA-1 of the bytes) of every listed file."""
    h = hashlib.sha1()
    for it, d in zip(listing.items, digests):
        h.update(it.path.encode() + b"\t" + bytes(d) + b"\n")
    return h.hexdigest()
