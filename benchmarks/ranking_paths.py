"""Where ranks are counted: ``featcache.evaluate(..., ranking="device")`` against ``ranking="sort"``, same run.

The device path (``featcache.evaluation.device_ranking``) is what runs on a GPU, where the scores stay; here it
runs on CPU torch, which is how its work is compared without a GPU. Many positives per query are its hard case:
400 queries x 100,000 gallery x 64-d, 300 gallery images per identity in 6 cameras (about 250 positives per
query). Target: the device path at most 2x the sort path, with equal metrics. Each side runs ``--repeats``
times, alternating; the fastest of each is kept.

    python benchmarks/ranking_paths.py          # --queries 400 --gallery 100000 --dim 64
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import featcache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--per-id", type=int, default=300, help="gallery images per identity")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ids = max(1, args.gallery // args.per_id)
    g_pids, q_pids = rng.integers(0, ids, args.gallery), rng.integers(0, ids, args.queries)
    g_cams, q_cams = rng.integers(1, 7, args.gallery), rng.integers(1, 7, args.queries)
    centers = rng.standard_normal((ids, args.dim)).astype(np.float32)
    gf = centers[g_pids] + 1.5 * rng.standard_normal((args.gallery, args.dim)).astype(np.float32)
    qf = centers[q_pids] + 1.5 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    best: dict[str, float] = {}
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for ranking in ("sort", "device"):
            t0 = time.perf_counter()
            results[ranking] = featcache.evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, device="cpu", ranking=ranking)
            best[ranking] = min(best.get(ranking, np.inf), time.perf_counter() - t0)
    s, d = results["sort"], results["device"]
    positives = (q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] != g_cams[None, :])
    print(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    print(f"{args.queries} queries x {args.gallery} gallery x {args.dim}-d, {positives.sum(1).mean():.0f} positives a "
          f"query on average; fastest of {args.repeats}")
    print(f"ranking=sort   {best['sort']:.2f} s   mAP {s['mAP']:.6f}  R1 {s['cmc']['1']:.6f}  mINP {s['mINP']:.6f}")
    print(f"ranking=device {best['device']:.2f} s   mAP {d['mAP']:.6f}  R1 {d['cmc']['1']:.6f}  mINP {d['mINP']:.6f}")
    same = all(abs(s[k] - d[k]) < 1e-12 for k in ("mAP", "mINP")) and s["cmc"] == d["cmc"]
    print(f"device / sort = {best['device'] / best['sort']:.2f}x (target <= 2x); metrics equal: {same}")


if __name__ == "__main__":
    main()
