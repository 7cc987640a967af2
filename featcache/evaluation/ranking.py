"""The exact rank of every positive for a whole block of queries at once, with no sort of the gallery.

``metrics.positive_ranks`` states the rule for one query; this module
computes the same ranks for a block, so that evaluating a gallery costs
little more than the query x gallery product itself:

1. Each query's positives and junk entries come from an index of the
   gallery by identity (``GalleryIndex``), not from a pass over the gallery.
2. Only entries scoring at least a query's weakest positive can outrank a
   positive. They are selected with one vectorised comparison per block,
   keyed by (query, score, gallery index) as one uint64 (the float32's bits
   made order-preserving, the index reversed so that of equal scores the
   earlier entry ranks first, the protocol's tie rule) and sorted; each
   positive's rank is then two binary searches in that key array.
3. Junk entries ranked before a positive are subtracted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np



def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> uint64 in [0, 2**32) whose order is the floats' order (-0.0 and 0.0 made equal)."""
    b = (np.ascontiguousarray(x, dtype=np.float32) + np.float32(0)).view(np.uint32)
    flip = (np.uint32(0) - (b >> np.uint32(31))) | np.uint32(0x80000000)  # negatives: every bit; others: the sign
    return (b ^ flip).astype(np.uint64)


@dataclass
class GalleryIndex:
    """For each query: the gallery indices of its positives and of its junk, as flat arrays with offsets."""

    pos_start: np.ndarray   # (Q + 1,)
    pos_col: np.ndarray
    junk_start: np.ndarray  # (Q + 1,)
    junk_col: np.ndarray

    @classmethod
    def build(cls, q_pids: np.ndarray, q_cams: np.ndarray, g_pids: np.ndarray, g_cams: np.ndarray) -> "GalleryIndex":
        order = np.argsort(g_pids, kind="stable")  # gallery order within an identity
        sorted_pids = g_pids[order]
        lo = np.searchsorted(sorted_pids, q_pids, side="left")
        hi = np.searchsorted(sorted_pids, q_pids, side="right")
        pos, junk = [], []
        for i in range(len(q_pids)):
            cand = order[lo[i]:hi[i]]
            same_cam = g_cams[cand] == q_cams[i]
            pos.append(cand[~same_cam])
            junk.append(cand[same_cam])
        return cls(_offsets(pos), _concat(pos), _offsets(junk), _concat(junk))


def _offsets(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def block_ranks(scores: np.ndarray, first: int, index: GalleryIndex) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the positives of queries ``first .. first + len(scores)``: (1-based ranks, sorted within each
    query and concatenated in query order; the number of positives of each query)."""
    n_rows, n_gal = scores.shape
    if scores.dtype != np.float32:  # re-ranked distances (float64): the per-query rule, at full precision
        return _ranks_per_query(scores, first, index)
    col_bits = max(1, int(n_gal - 1).bit_length())
    rows_per_pass = (1 << (32 - col_bits)) - 1  # a key is (row, score, gallery index) in 64 bits; row + 1 must fit
    parts = [_ranks(scores[s: s + rows_per_pass], first + s, index, col_bits) for s in range(0, n_rows, rows_per_pass)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _ranks(scores: np.ndarray, first: int, index: GalleryIndex, col_bits: int) -> tuple[np.ndarray, np.ndarray]:
    n_rows, n_gal = scores.shape
    counts = np.diff(index.pos_start[first: first + n_rows + 1])
    if not counts.any():
        return np.zeros(0, np.int64), counts
    row = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    col = index.pos_col[index.pos_start[first]: index.pos_start[first + n_rows]]
    sp = scores[row, col]

    shift_row, shift_val = np.uint64(32 + col_bits), np.uint64(col_bits)
    top = np.uint64((1 << col_bits) - 1)

    def key(r: np.ndarray, c: np.ndarray, v: np.ndarray) -> np.ndarray:
        # ascending key = (query, score ascending, gallery index descending): the entries after a positive's
        # key in its query's run are exactly those ranked before it (higher score, or equal and earlier)
        return (r.astype(np.uint64) << shift_row) | (_ordered(v) << shift_val) | (top - c.astype(np.uint64))

    # only entries scoring at least a query's weakest positive can rank before one of its positives
    floor = np.full(n_rows, np.inf, dtype=np.float32)
    has = counts > 0
    floor[has] = np.minimum.reduceat(sp, np.concatenate([[0], np.cumsum(counts)[:-1]])[has])
    selected = scores >= floor[:, None]
    flat = np.flatnonzero(selected)
    sel_row = np.repeat(np.arange(n_rows, dtype=np.int64), np.count_nonzero(selected, axis=1))
    keys = np.sort(key(sel_row, flat - sel_row * n_gal, scores.ravel()[flat]))
    pkey = key(row, col, sp)
    row_end = np.searchsorted(keys, (row.astype(np.uint64) + np.uint64(1)) << shift_row, side="left")
    before = row_end - np.searchsorted(keys, pkey, side="right")

    ja, jb = index.junk_start[first], index.junk_start[first + n_rows]
    if jb > ja:  # junk entries ranked before each positive, found the same way, are not counted
        jrow = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(index.junk_start[first: first + n_rows + 1]))
        jcol = index.junk_col[ja:jb]
        jkeys = np.sort(key(jrow, jcol, scores[jrow, jcol]))
        jend = np.searchsorted(jkeys, (row.astype(np.uint64) + np.uint64(1)) << shift_row, side="left")
        before -= jend - np.searchsorted(jkeys, pkey, side="right")

    ranks = before.astype(np.int64) + 1
    return ranks[np.lexsort((ranks, row))], counts


def _ranks_per_query(scores: np.ndarray, first: int, index: GalleryIndex) -> tuple[np.ndarray, np.ndarray]:
    from featcache.evaluation.metrics import positive_ranks

    n_gal = scores.shape[1]
    out, counts = [], []
    for r in range(len(scores)):
        i = first + r
        pos = np.zeros(n_gal, bool)
        junk = np.zeros(n_gal, bool)
        pos[index.pos_col[index.pos_start[i]: index.pos_start[i + 1]]] = True
        junk[index.junk_col[index.junk_start[i]: index.junk_start[i + 1]]] = True
        out.append(positive_ranks(scores[r], pos, junk))
        counts.append(out[-1].size)
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), np.asarray(counts, dtype=np.int64)


def split_ranks(ranks: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """``block_ranks``' output as one sorted array per query."""
    return np.split(ranks, np.cumsum(counts)[:-1])
