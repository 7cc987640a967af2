"""What identifying a dataset by content costs: listing a Market-1501-sized folder, against listing it and
hashing every file (``featcache.cache.store.file_digests``), as extraction does before it creates or resumes a
cache.

Market-1501 has 36,036 listed files (12,936 training, 3,368 query, 19,732 gallery). The synthetic dataset here
has about that many (``--ids``), as real JPEGs. Both sides run twice, alternated, the faster kept; the files
are in the page cache after being written, as they are after a first extraction (``--drop-caches``, when
permitted, times the hashing from disk too).

    python benchmarks/identity_cost.py            # about 2 minutes on 2 cores, most of it writing the JPEGs
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from featcache.cache.digests import file_digests, items_digest
from featcache.datasets import load_listing
from featcache.synth import SynthConfig, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=3900, help="identities of the synthetic Market-1501 (3,900: about 36,000 files)")
    ap.add_argument("--drop-caches", action="store_true", help="also time the hashing after dropping the page cache (needs root)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="featcache-identity-") as tmp:
        root = Path(tmp) / "market"
        t0 = time.perf_counter()
        generate(SynthConfig(root, "market1501", ids=args.ids, cams=6, seed=0))
        t_gen = time.perf_counter() - t0
        listing_s, hashing_s = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            listing = load_listing("market1501", root)
            items_digest(listing)
            listing_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            listing = load_listing("market1501", root)
            items_digest(listing)
            file_digests(listing)
            hashing_s.append(time.perf_counter() - t0)
        n = len(listing.items)
        size = sum((root / it.path).stat().st_size for it in listing.items)
        print(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores); {n:,} files, {size / 2**20:.0f} MiB "
              f"(written in {t_gen:.0f} s)")
        a, b = min(listing_s), min(hashing_s)
        print(f"listing only              : {a:6.2f} s")
        print(f"listing + content digests : {b:6.2f} s   (+{b - a:.2f} s, {(b - a) / n * 1e6:.0f} us a file, "
              f"{size / 2**20 / max(b - a, 1e-9):.0f} MiB/s)")
        if args.drop_caches:
            try:
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            except OSError as exc:
                print(f"cold: not measured ({exc.strerror}: dropping the page cache needs root)")
            else:
                t0 = time.perf_counter()
                file_digests(load_listing("market1501", root))
                print(f"content digests from disk : {time.perf_counter() - t0:6.2f} s (page cache dropped)")


if __name__ == "__main__":
    main()
