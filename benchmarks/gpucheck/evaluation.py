"""gpu_check's evaluation section: exact evaluation against the bare product, a large gallery, and the device path's
metrics against the CPU path's.

Timing is fair to both sides: the inputs are made and L2-normalised before any clock starts, and both sides
include the same fixed costs, the gallery's upload from host memory and the gallery's identity index, so that
their ratio is the cost of ranking alone.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from eval_speed import market_like
from featcache.evaluation.ranking import GalleryIndex
from featcache.evaluation.runner import evaluate
from featcache.evaluation.search import DEFAULT_BUDGET, block_size
from gpucheck.common import Context, at_most, sync


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _timings(qn, gn, labels, dev: torch.device, repeats: int = 3) -> tuple[float, float]:
    """Fastest of ``repeats`` (after a warm-up) of featcache's evaluation and of the bare on-device product of the
    same query blocks; both upload the gallery and build the identity index inside their time."""
    qp, qc, gp, gc = labels
    device = "cuda" if dev.type == "cuda" else "cpu"

    def bare() -> float:
        sync(dev)
        t0 = time.perf_counter()
        g = torch.from_numpy(gn).to(dev)
        GalleryIndex.build(qp, qc, gp, gc)
        block = block_size(len(gn), DEFAULT_BUDGET)
        for a in range(0, len(qn), block):
            g.new_tensor(qn[a: a + block]) @ g.T
        sync(dev)
        return time.perf_counter() - t0

    def ours() -> float:
        sync(dev)
        t0 = time.perf_counter()
        evaluate(qn, gn, qp, qc, gp, gc, device=device, ranking="device")
        sync(dev)
        return time.perf_counter() - t0

    bare(), ours()  # warm-up
    return min(ours() for _ in range(repeats)), min(bare() for _ in range(repeats))


def section_eval(c: Context) -> None:
    """Market-size evaluation against the bare product (<= 1.3x), a large gallery (10,000 x 1,000,000 x 512-d on a
    GPU: < 3 s; scaled down on the CPU), and the device path's metrics equal to the CPU path's."""
    s, table, dev = c.setup, c.table, c.setup.device
    nq, ng, d = s.eval_sizes
    qf, gf, qp, qc, gp, gc = market_like(nq, ng, d)
    qn, gn = _unit(qf), _unit(gf)
    t_ours, t_bare = _timings(qn, gn, (qp, qc, gp, gc), dev)
    table.add(f"eval {nq:,} x {ng:,} x {d}-d: evaluation / bare product on the device, s (both: gallery upload and "
              "identity index included; inputs normalised beforehand)", f"{t_ours:.3f}", f"{t_bare:.3f}",
              f"{t_ours / t_bare:.2f}", at_most(t_ours / t_bare, 1.3, s, "x"))
    # the device path's metrics against the CPU path's, integer-valued features: every score exact on both
    small = market_like(*((1000, 8000, 256) if s.gpu else (100, 800, 32)), seed=1)
    device = "cuda" if s.gpu else "cpu"
    cpu = evaluate(*small, device="cpu", ranking="sort")[0]
    on_device = evaluate(*small, device=device, ranking="device")[0]
    same = cpu == on_device
    table.add(f"eval metrics, {device} device path = CPU path (integer-valued features)", "equal" if same else f"{on_device}",
              "CPU path", "", "PASS" if same else "FAIL")
    _large_gallery(c)


def _large_gallery(c: Context) -> None:
    """Exact evaluation of a large gallery: 10,000 x 1,000,000 x 512-d on a GPU (target < 3 s), 100 x 20,000 x 32-d
    on the CPU (the same code, not judged). Inputs made and normalised before the clock starts."""
    s, table, dev = c.setup, c.table, c.setup.device
    nq, ng, d = s.scale_sizes
    rng = np.random.default_rng(0)
    ids = max(1, ng // 20)
    qn, gn = _unit(rng.standard_normal((nq, d), dtype=np.float32)), _unit(rng.standard_normal((ng, d), dtype=np.float32))
    qp, gp = rng.integers(0, ids, nq), rng.integers(0, ids, ng)
    qc, gc = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    device = "cuda" if s.gpu else "cpu"
    if s.gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync(dev)
    t0 = time.perf_counter()
    evaluate(qn, gn, qp, qc, gp, gc, device=device, ranking="device")
    sync(dev)
    t = time.perf_counter() - t0
    gallery = gn.nbytes / 2**30
    memory = f" ({(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB)" if s.gpu else ""
    table.add(f"eval {nq:,} x {ng:,} x {d}-d exact, s (GPU memory: peak, gallery + budget; gallery upload and index "
              "included)", f"{t:.2f}{memory}", f"3 s ({gallery + DEFAULT_BUDGET / 2**30:.2f} GiB)", f"{t / 3:.2f}",
              at_most(t, 3.0, s, " s"))
