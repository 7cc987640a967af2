"""Peak memory (RSS) of ``featcache eval --model gate:RUN``: 2,000 queries against a 500,000-image gallery.

The gate kind reads the experts' cached pooled features (768-d and 640-d here,
the widths of CLIP ViT-B/16 and ALIGN-B7) and pushes them through the teacher
in blocks bounded by ``--budget-mb``, on the chosen device. Its output, the
2048-d BN-neck feature, is what gets searched: for 500,000 gallery images
that is 3.81 GiB of float32 by itself. The bound to check is therefore
"output features + one block", the same bound as the backbone kinds
(``eval_memory.py``: 512-d features, 2.19 GiB peak). Featcache 0.1 pushed the
whole split through the model at once, which needs the activations of every
row at the same time (the 4,096-wide gate input alone is 7.6 GiB here).

    python benchmarks/eval_memory_gate.py            # writes a 2.8 GB cache in a temporary folder, removed after
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featcache.cache import BatchResult, CacheWriter, create_cache, make_identity
from featcache.cache.spec import OutputSpec
from featcache.datasets import Item, Listing
from featcache.preprocess import PARAMS

EXPERTS = {"clip-sim": ("open_clip", 768), "align-sim": ("align", 640)}


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_cache(path: Path, queries: int, gallery: int, train_ids: int, seed: int = 0) -> None:
    """A feature cache in the real format: a small training split, one view per query and gallery image."""
    rng = np.random.default_rng(seed)
    ids = gallery // 10
    items = [Item(f"train/{p:05d}_{k}.jpg", p, 1 + k % 6, "train") for p in range(1, train_ids + 1) for k in range(8)]
    items += [Item(f"query/{i:07d}.jpg", int(p), int(c), "query")
              for i, (p, c) in enumerate(zip(rng.integers(1, ids, queries), rng.integers(1, 7, queries)))]
    items += [Item(f"gallery/{i:07d}.jpg", int(p), int(c), "gallery")
              for i, (p, c) in enumerate(zip(rng.integers(0, ids, gallery), rng.integers(1, 7, gallery)))]
    listing = Listing("csv", path.parent / "synthetic", items)
    n_views = {"train": 2, "query": 1, "gallery": 1}
    identity = make_identity(listing, {"synthetic": True, "image_size": [256, 256], "resize": "none", "views": n_views},
                             {e: {"family": f, "weights": f"synthetic:seed={seed}", "preset": {}} for e, (f, _) in EXPERTS.items()})
    create_cache(path, listing, identity, n_views, {e: {"pooled": OutputSpec((d,), "float32", "synthetic")} for e, (_, d) in EXPERTS.items()}, "none")
    pids = np.array([it.pid for it in items])
    nv = np.array([n_views[it.split] for it in items], dtype=np.int64)
    centers = {e: rng.standard_normal((ids + train_ids + 1, d), dtype=np.float32) for e, (_, d) in EXPERTS.items()}
    writer = CacheWriter(path)
    try:
        for s in range(0, len(items), 50_000):  # through the cache's writer, a block of images at a time
            img = np.arange(s, min(len(items), s + 50_000))
            counts = nv[img]
            rows_pid = np.repeat(pids[img], counts)
            params = np.zeros((len(rows_pid), len(PARAMS)), np.int16)
            params[:, 0] = params[:, 1] = 10
            params[:, 2] = (np.arange(len(rows_pid)) - np.repeat(np.cumsum(counts) - counts, counts)) % 2
            outputs = {e: {"pooled": centers[e][rows_pid] + 1.6 * rng.standard_normal((len(rows_pid), d), dtype=np.float32)}
                       for e, (_, d) in EXPERTS.items()}
            writer.write(BatchResult(list(img), np.zeros(len(img), bool), [""] * len(img), list(img), np.zeros(len(img), np.int32),
                                     np.zeros(len(img), np.int32), np.full(len(img), b"", dtype="S40"), params,
                                     np.cumsum(counts) - counts, outputs))
    finally:
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--gallery", type=int, default=500_000)
    ap.add_argument("--budget-mb", type=int, default=256)
    args = ap.parse_args()
    from featcache.evaluation.runner import EvalConfig, run_eval
    from featcache.gate.config import GateConfig
    from featcache.gate.runner import run_train_gate

    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        cache = tmp / "big.h5"
        t0 = time.perf_counter()
        write_cache(cache, args.queries, args.gallery, train_ids=64)
        print(f"cache written in {time.perf_counter() - t0:.0f} s ({cache.stat().st_size / 2**30:.2f} GiB)")
        run = run_train_gate(GateConfig.from_dict(dict(cache=cache, out=tmp / "run", experts=tuple(EXPERTS), fusion="moe-top1", epochs=1))).run
        before = rss_gb()
        t0 = time.perf_counter()
        ev = run_eval(EvalConfig(cache, f"gate:{run}", device="cpu", budget_mb=args.budget_mb))
        secs = time.perf_counter() - t0
        feats = (ev.qf.nbytes + ev.gf.nbytes) / 2**30
        print(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores); search backend {ev.report['search_backend']}; budget {args.budget_mb} MiB")
        print(f"gate:{run.name}: {args.queries} queries x {args.gallery} gallery -> 2048-d features ({feats:.2f} GiB)")
        print(f"peak RSS before evaluation {before:.2f} GiB; peak RSS of the whole run {rss_gb():.2f} GiB "
              f"= features {feats:.2f} GiB + {rss_gb() - feats:.2f} GiB; {secs:.0f} s "
              f"(features {ev.report['timings']['features_s']:.0f} s, search {ev.report['timings']['search_and_metrics_s']:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
