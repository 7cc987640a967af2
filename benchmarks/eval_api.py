"""``featcache.evaluate`` (the public API) against torchreid's ``evaluate_rank``, Python and Cython paths.

Market-1501 size by default: 3,368 queries x 15,913 gallery images x 2048-d, features drawn as in
``eval_speed.py`` and unnormalised. Each side gets what its users pass: featcache the raw features (it
L2-normalises them itself); torchreid the cosine distance matrix of the normalised features, which it
argsorts whole (NumPy's default sort, as torchreid does). Prints each side's time (featcache's includes its
product; torchreid's does not include the distance matrix, computed once beforehand and timed apart), the
speed-ups and the largest metric difference.

torchreid's Cython path (``rank_cy.pyx`` in deep-person-reid, MIT) is not on PyPI in built form. Build it
outside this repository and pass its folder:

    git clone https://github.com/KaiyangZhou/deep-person-reid   # torchreid/metrics/rank_cylib/rank_cy.pyx
    pip install cython && cd deep-person-reid/torchreid/metrics/rank_cylib && python setup.py build_ext --inplace
    python benchmarks/eval_api.py --torchreid-cython deep-person-reid/torchreid/metrics/rank_cylib

Both torchreid paths sort with NumPy's default (not stable) argsort, so with tied scores their order can
differ from featcache's rule (the earlier gallery entry first); the Cython path also sums in float32. The
features here have no exact ties after normalisation, so the metrics agree to float rounding.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_speed import _diff, market_like  # noqa: E402

import featcache  # noqa: E402


def torchreid_python(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20) -> dict:
    """torchreid's ``eval_market1501`` Python path (torchreid/metrics/rank.py, MIT), on a distance matrix."""
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_AP, num_valid_q = [], [], 0.0
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw_cmc = matches[q_idx][np.invert(remove)]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.0
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (i + 1.0) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * raw_cmc
        all_AP.append(tmp_cmc.sum() / num_rel)
    all_cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / num_valid_q
    return {"mAP": float(np.mean(all_AP)), "mINP": float("nan"), "cmc": {str(k): float(all_cmc[k - 1]) for k in (1, 5, 10, 20)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--torchreid-cython", type=Path, help="a folder holding torchreid's built rank_cy module")
    args = ap.parse_args()
    qf, gf, qp, qc, gp, gc = market_like(args.queries, args.gallery, args.dim)

    featcache.evaluate(qf[:64], gf, qp[:64], gp, qc[:64], gc, device="cpu")  # warm-up: thread pool, buffers
    t0 = time.perf_counter()
    ours = featcache.evaluate(qf, gf, qp, gp, qc, gc, device="cpu")
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    qn, gn = qf / np.linalg.norm(qf, axis=1, keepdims=True), gf / np.linalg.norm(gf, axis=1, keepdims=True)
    distmat = (1.0 - qn @ gn.T).astype(np.float32)
    t_dist = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = torchreid_python(distmat, qp, gp, qc, gc)
    t_py = time.perf_counter() - t0
    print(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores)")
    print(f"features: {args.queries} queries x {args.gallery} gallery x {args.dim}-d, unnormalised")
    print(f"featcache.evaluate        : {t_ours:7.2f} s (product included)   mAP {ours['mAP']:.6f}  R1 {ours['cmc']['1']:.6f}")
    print(f"torchreid Python loop     : {t_py:7.2f} s (+ {t_dist:.2f} s distance matrix)   mAP {ref['mAP']:.6f}  R1 {ref['cmc']['1']:.6f}")
    print(f"speed-up over the Python loop: {t_py / t_ours:.1f}x; largest metric difference {_diff(ours, ref):.2e}")
    if args.torchreid_cython:
        sys.path.insert(0, str(args.torchreid_cython))
        from rank_cy import evaluate_cy

        t0 = time.perf_counter()
        cmc, mAP = evaluate_cy(distmat, qp.astype(np.int64), gp.astype(np.int64), qc.astype(np.int64), gc.astype(np.int64), 20)
        t_cy = time.perf_counter() - t0
        diff = max(abs(float(mAP) - ours["mAP"]), abs(float(cmc[0]) - ours["cmc"]["1"]))
        print(f"torchreid Cython          : {t_cy:7.2f} s (+ {t_dist:.2f} s distance matrix)   mAP {float(mAP):.6f}  R1 {float(cmc[0]):.6f}")
        print(f"speed-up over the Cython path: {t_cy / t_ours:.1f}x; largest metric difference {diff:.2e}")
    else:
        print("torchreid Cython: not run (--torchreid-cython DIR: see the module doc)")


if __name__ == "__main__":
    main()
