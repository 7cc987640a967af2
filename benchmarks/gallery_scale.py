"""Million-image galleries: exact evaluation of 10,000 queries against 1,000,000 gallery images, then
approximate search (FAISS IVF-PQ) with its recall@10 against exact search and its speed-up.

Features are synthetic: one centre per identity (100,000 identities, ten gallery images each, cameras 1-6),
Gaussian noise (1.8 per dimension against centres of 1: hard enough that exact mAP is well below 1, so
ranking is not trivial), L2-normalised float32 rows. Exact evaluation is ``featcache.evaluation.runner.evaluate``, the
code ``featcache eval`` runs: query blocks sized by the score budget (256 MiB), so memory stays bounded
whatever the gallery. Peak memory is the process's maximum resident set (the gallery itself is
1,000,000 x d x 4 bytes). Recall@10 compares plain top-10 lists (no junk removal) of a sample of queries.

    python benchmarks/gallery_scale.py [--gallery 1000000 --queries 10000 --dim 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np

from featcache.evaluation.approx import ApproxIndex, ApproxSpec
from featcache.evaluation.runner import evaluate


def synthetic(nq: int, ng: int, d: int, seed: int = 0, noise: float = 1.8):
    rng = np.random.default_rng(seed)
    ids = max(1, ng // 10)
    centers = rng.standard_normal((ids, d), dtype=np.float32)
    g_pids = rng.integers(1, ids + 1, ng)
    g_cams = rng.integers(1, 7, ng)
    q_pids = g_pids[rng.choice(ng, nq, replace=False)]
    q_cams = rng.integers(1, 7, nq)

    def feats(pids: np.ndarray) -> np.ndarray:
        out = np.empty((len(pids), d), np.float32)
        for s in range(0, len(pids), 65536):  # in chunks: no temporary of the whole array
            x = centers[pids[s: s + 65536] - 1] + noise * rng.standard_normal((len(pids[s: s + 65536]), d), dtype=np.float32)
            out[s: s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return feats(q_pids), feats(g_pids), q_pids, q_cams, g_pids, g_cams


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--recall-queries", type=int, default=1000, help="Queries whose top-10 lists are compared.")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32, help="nprobe of the approximate evaluation.")
    ap.add_argument("--sweep", default="8,32,128,512", help="nprobe values of the recall@10 / speed table.")
    ap.add_argument("--noise", type=float, default=1.8)
    ap.add_argument("--k", type=int, default=100, help="List length of approximate evaluation.")
    args = ap.parse_args()
    print(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores)")
    t0 = time.perf_counter()
    qf, gf, qp, qc, gp, gc = synthetic(args.queries, args.gallery, args.dim, noise=args.noise)
    print(f"features: {args.queries} queries x {args.gallery} gallery x {args.dim}-d float32 "
          f"({gf.nbytes / 2**30:.2f} GiB gallery) made in {time.perf_counter() - t0:.0f} s; peak RSS so far {peak_gib():.2f} GiB")

    t0 = time.perf_counter()
    exact, _, backend = evaluate(qf, gf, qp, qc, gp, gc, device="cpu")
    t_exact = time.perf_counter() - t0
    print(f"exact   ({backend}): {t_exact:7.1f} s  mAP {exact['mAP']:.4f}  R1 {exact['cmc']['1']:.4f}  mINP {exact['mINP']:.4f}; "
          f"peak RSS {peak_gib():.2f} GiB")

    spec = ApproxSpec("ivf-pq", k=args.k, nprobe=args.nprobe, nlist=args.nlist)
    t0 = time.perf_counter()
    approx, _, abackend = evaluate(qf, gf, qp, qc, gp, gc, device="cpu", approx=spec)
    t_approx = time.perf_counter() - t0
    s = approx["search"]
    print(f"approx  ({abackend}, {s['index']}): {t_approx:7.1f} s (index build {s['build_s']:.1f} s, search and metrics "
          f"{s['search_s']:.1f} s)  AP@{args.k} {approx['mAP']:.4f}  R1 {approx['cmc']['1']:.4f}; peak RSS {peak_gib():.2f} GiB")

    import faiss

    sample = np.random.default_rng(1).choice(args.queries, min(args.recall_queries, args.queries), replace=False)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(gf)
    t0 = time.perf_counter()
    _, truth = flat.search(qf[sample], 10)
    t_flat = time.perf_counter() - t0
    del flat
    ann = ApproxIndex(gf, ApproxSpec("ivf-pq", k=10, nprobe=args.nprobe, nlist=args.nlist))
    print(f"recall@10 against exact top-10 lists ({len(sample)} queries; exact flat search {t_flat:.2f} s; "
          f"index {ann.description.rsplit(', nprobe', 1)[0]}, built in {ann.build_seconds:.1f} s):")
    for nprobe in [int(x) for x in args.sweep.split(",")]:
        faiss.ParameterSpace().set_index_parameter(ann.index, "nprobe", nprobe)
        t0 = time.perf_counter()
        got = ann.search(qf[sample], 10)
        t_ann = time.perf_counter() - t0
        recall = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(truth, got)]))
        print(f"  nprobe {nprobe:4d}: recall@10 {recall:.4f}   search {t_ann:6.2f} s   speed-up over exact {t_flat / t_ann:6.1f}x")
    print(f"evaluation, all {args.queries} queries: exact {t_exact:.1f} s, approximate (nprobe {args.nprobe}) {t_approx:.1f} s "
          f"with the index build, {s['search_s']:.1f} s without: {t_exact / t_approx:.1f}x and {t_exact / s['search_s']:.1f}x")


if __name__ == "__main__":
    main()
