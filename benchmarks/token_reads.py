"""Token features bigger than memory: random-batch reads against a sequential read of the same bytes, for the
cache's layout and the alternatives (chunk shapes, compression), with file size and write speed.

Training reads token features in random batches (``featcache.cache.read_rows``: each batch's rows sorted,
one slice per run of consecutive rows). A cache larger than RAM serves them from disk, so every pass here
starts cold: the file's pages are dropped from the page cache (``posix_fadvise(DONTNEED)``, after an fsync)
before it is read, as if it were many times the size of memory.

Layouts (all hold the same rows, written as extraction writes them: batches of 32 rows):

- ``contiguous``: the cache's layout (allocated at creation, raw bytes overwritten in place);
- ``chunk-1`` / ``chunk-16``: chunks of 1 or 16 rows, all allocated at creation (no compression);
- ``lzf-16`` / ``gzip-16``: chunks of 16 rows, byte-shuffled and compressed (allocated as written).

Rows are CLIP ViT-B/16-like token maps, float16 (tokens x 768). Their values are synthetic (a low-rank
signal plus noise), so compression ratios are indicative only: measure your own cache with ``featcache info``.
Prints, per layout: file size, write MB/s, sequential and random-batch read MB/s, and random over sequential
(target >= 50 % for the cache's own layout).

    python benchmarks/token_reads.py [--rows 8000 --tokens 128 --dim 768 --batch 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from featcache.cache.store import read_rows


def drop_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (written pages are flushed first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_rows(n: int, tokens: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, dim)).astype(np.float32)

    def batch(s: int, e: int) -> np.ndarray:
        coef = rng.standard_normal((e - s, tokens, 16)).astype(np.float32)
        return (coef @ basis + 0.3 * rng.standard_normal((e - s, tokens, dim), dtype=np.float32)).astype(np.float16)

    return batch


def create(path: Path, layout: str, shape: tuple[int, int, int]) -> None:
    with h5py.File(path, "w") as f:
        if layout == "contiguous":
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            h5py.h5d.create(f.id, b"tokens", h5py.h5t.py_create(np.dtype(np.float16)), h5py.h5s.create_simple(shape), dcpl=dcpl)
        elif layout.startswith("chunk-"):
            rows = int(layout.split("-")[1])
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_chunk((rows, *shape[1:]))
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            h5py.h5d.create(f.id, b"tokens", h5py.h5t.py_create(np.dtype(np.float16)), h5py.h5s.create_simple(shape), dcpl=dcpl)
        else:
            comp, rows = layout.split("-")
            f.create_dataset("tokens", shape=shape, dtype=np.float16, chunks=(int(rows), *shape[1:]), shuffle=True,
                             compression=comp, **({"compression_opts": 4} if comp == "gzip" else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=None, help="Where the files go (default: a temporary folder).")
    ap.add_argument("--layouts", default="contiguous,chunk-1,chunk-16,lzf-16,gzip-16")
    args = ap.parse_args()
    shape = (args.rows, args.tokens, args.dim)
    row_bytes = args.tokens * args.dim * 2
    total = args.rows * row_bytes / 2**20
    print(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores); {args.rows} rows x {args.tokens} x {args.dim} "
          f"float16 = {total:.0f} MiB a file; batches of {args.batch}; every read pass starts with the file out of the page cache")
    rng = np.random.default_rng(1)
    order = rng.permutation(args.rows)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for layout in args.layouts.split(","):
            path = Path(tmp) / f"{layout}.h5"
            create(path, layout, shape)
            rows = make_rows(*shape)
            t0 = time.perf_counter()
            with h5py.File(path, "r+") as f:
                ds = f["tokens"]
                for s in range(0, args.rows, 32):
                    ds[s: s + 32] = rows(s, min(s + 32, args.rows))
            drop_cache(path)
            t_write = time.perf_counter() - t0
            size = path.stat().st_size / 2**20

            with h5py.File(path, "r", rdcc_nbytes=4 * 2**20) as f:
                ds = f["tokens"]
                drop_cache(path)
                t0 = time.perf_counter()
                for s in range(0, args.rows, args.batch):
                    ds[s: s + args.batch]
                t_seq = time.perf_counter() - t0
                drop_cache(path)
                t0 = time.perf_counter()
                for s in range(0, args.rows, args.batch):
                    read_rows(ds, np.sort(order[s: s + args.batch]))
                t_rand = time.perf_counter() - t0
            print(f"{layout:10s}  file {size:7.0f} MiB ({size / total:5.1%})  write {total / t_write:6.0f} MiB/s  "
                  f"sequential {total / t_seq:6.0f} MiB/s  random batches {total / t_rand:6.0f} MiB/s  "
                  f"random/sequential {t_seq / t_rand:5.1%}")
            path.unlink()


if __name__ == "__main__":
    main()
