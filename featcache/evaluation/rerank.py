"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), memory-bounded.

Follows the reference implementation step for step (distances are squared
Euclidean on L2-normalised features, 2 - 2 cos, each row divided by its
maximum; k1 = 20, k2 = 6, lambda = 0.3), but never builds the N x N matrices
of queries and gallery together: the k1+1 nearest neighbours of every item
come from blockwise exact search, the encoding V is kept sparse (a few dozen
entries a row), and the Jaccard term is computed query by query through an
inverted index of V's columns. Memory is O(N * k1) plus one block of scores.
Ties in the neighbour lists are broken by item index.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
from featcache.progress import progress

from featcache.evaluation.search import Scorer, block_size

logger = logging.getLogger(__name__)


def _neighbours(x: np.ndarray, scorer: Scorer, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) nearest items of every item by descending similarity (ties by index), and each row's max distance."""
    n = len(x)
    k = min(k, n)
    ranks = np.empty((n, k), dtype=np.int64)
    rowmax = np.empty(n, dtype=np.float64)
    for s in progress(range(0, n, block), desc="rerank: neighbours", unit="block", leave=False):
        sc = scorer.scores(x[s: s + block])
        rowmax[s: s + len(sc)] = np.maximum(0.0, 2.0 - 2.0 * sc.min(1).astype(np.float64))
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(sc), 1))
        vals = np.take_along_axis(sc, part, 1)
        order = np.lexsort((part, -vals), axis=1)
        ranks[s: s + len(sc)] = np.take_along_axis(part, order, 1)
    return ranks, np.maximum(rowmax, 1e-12)


def _reciprocal(ranks: np.ndarray, i: int, k: int) -> np.ndarray:
    fwd = ranks[i, : k + 1]
    back = ranks[fwd, : k + 1]
    return fwd[(back == i).any(1)]


def _encode(x: np.ndarray, ranks: np.ndarray, rowmax: np.ndarray, k1: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sparse rows of V: (columns, weights) of the expanded k-reciprocal set of every item."""
    half = int(np.around(k1 / 2.0))
    rows = []
    for i in progress(range(len(x)), desc="rerank: encode", unit="item", leave=False):
        r = _reciprocal(ranks, i, k1)
        exp = [r]
        for c in r:
            rc = _reciprocal(ranks, int(c), half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3 * len(rc):
                exp.append(rc)
        cols = np.unique(np.concatenate(exp))
        d = np.maximum(0.0, 2.0 - 2.0 * (x[cols] @ x[i]).astype(np.float64)) / rowmax[i]
        w = np.exp(-d)
        rows.append((cols, (w / w.sum()).astype(np.float32)))
    return rows


def _query_expand(rows, ranks: np.ndarray, k2: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if k2 == 1:
        return rows
    out = []
    for i in range(len(rows)):
        nb = ranks[i, :k2]
        cols = np.concatenate([rows[j][0] for j in nb])
        vals = np.concatenate([rows[j][1] for j in nb]).astype(np.float64)
        u, inv = np.unique(cols, return_inverse=True)
        out.append((u, (np.bincount(inv, weights=vals) / len(nb)).astype(np.float32)))
    return out


def _columns(rows, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverted index of V: for each column, the rows holding it and their values (CSC arrays)."""
    cols = np.concatenate([c for c, _ in rows])
    vals = np.concatenate([v for _, v in rows])
    row_ids = np.repeat(np.arange(len(rows)), [len(c) for c, _ in rows])
    order = np.argsort(cols, kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=n))])
    return ptr, row_ids[order], vals[order]


def rerank_blocks(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lam: float,
                  device: str = "auto", budget: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first query index, re-ranked scores = -final distance) per block of queries."""
    x = np.ascontiguousarray(np.concatenate([query, gallery]), dtype=np.float32)
    nq, n = len(query), len(x)
    scorer = Scorer(x, device)
    block = block_size(n) if budget is None else block_size(n, budget)
    ranks, rowmax = _neighbours(x, scorer, k1 + 1, block)
    v = _query_expand(_encode(x, ranks, rowmax, k1), ranks, k2)
    ptr, col_rows, col_vals = _columns(v, n)
    for s in range(0, nq, block):
        sc = scorer.scores(x[s: min(s + block, nq)])[:, nq:].astype(np.float64)
        out = np.empty_like(sc)
        for b in range(len(sc)):
            i = s + b
            cols, vals = v[i]
            starts, ends = ptr[cols], ptr[cols + 1]
            lens = ends - starts
            idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
            mins = np.minimum(np.repeat(vals, lens), col_vals[idx])
            tmin = np.bincount(col_rows[idx], weights=mins, minlength=n)[nq:]
            jac = 1.0 - tmin / (2.0 - tmin)
            orig = np.maximum(0.0, 2.0 - 2.0 * sc[b]) / rowmax[i]
            out[b] = -((1 - lam) * jac + lam * orig)
        yield s, out
