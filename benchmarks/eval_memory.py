"""Peak memory (RSS) of featcache's evaluation: 2,000 queries against a 500,000-image gallery of 512-d features.

The features themselves take 1.0 GB (float32); the target is a peak under
4 GB for the whole process, which the blockwise search keeps by never
holding more than one block of scores.

    python benchmarks/eval_memory.py
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np

from featcache.evaluation.runner import evaluate


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--gallery", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ids = args.gallery // 10
    g_pids = rng.integers(0, ids, args.gallery)
    q_pids = rng.integers(1, ids, args.queries)
    g_cams, q_cams = rng.integers(1, 7, args.gallery), rng.integers(1, 7, args.queries)
    centers = rng.standard_normal((ids, args.dim), dtype=np.float32)

    def feats(pids: np.ndarray) -> np.ndarray:  # built in chunks so that generation adds no peak of its own
        out = np.empty((len(pids), args.dim), dtype=np.float32)
        for s in range(0, len(pids), 50_000):
            x = centers[pids[s: s + 50_000]] + 1.6 * rng.standard_normal((len(pids[s: s + 50_000]), args.dim), dtype=np.float32)
            out[s: s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    gf, qf = feats(g_pids), feats(q_pids)
    before = rss_gb()
    t0 = time.perf_counter()
    res, _, backend = evaluate(qf, gf, q_pids, q_cams, g_pids, g_cams, device="cpu")
    secs = time.perf_counter() - t0
    print(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores); search backend {backend}")
    print(f"features: {args.queries} queries x {args.gallery} gallery x {args.dim}-d ({(qf.nbytes + gf.nbytes) / 2**30:.2f} GiB)")
    print(f"peak RSS before evaluation {before:.2f} GiB; peak RSS of the whole run {rss_gb():.2f} GiB (target < 4 GB); {secs:.1f} s")
    print(f"mAP {res['mAP']:.4f}  R1 {res['cmc']['1']:.4f}  mINP {res['mINP']:.4f}  ({res['queries_evaluated']} queries)")


if __name__ == "__main__":
    main()
