"""Re-ID metrics from the exact rank of every positive, as the protocols define them.

Rules (Market-1501, DukeMTMC-reID, MSMT17 and VeRi-776 alike): a gallery
entry with the query's identity *and* camera is junk and is removed from the
ranking; an entry with the query's identity from another camera is a
positive (VeRi-776's "good"); everything else, distractors (pid 0)
included, is a negative. A query with no positive is skipped and counted.

Ranks are taken among the non-junk entries by descending similarity. Ties
are broken deterministically by gallery order (the entry that comes first in
the cache, i.e. in the dataset's listing, ranks first), so results do not
depend on the search backend or block size.

From the sorted 1-based ranks r_1 < ... < r_n of a query's n positives:

- AP, plain (torchreid, fast-reid): mean over k of precision at each hit, k / r_k.
- AP, trapezoid (the official Market-1501 and VeRi-776 MATLAB kits): sum over
  k of (1/n) * (p_prev + k / r_k) / 2, where p_prev = (k-1)/(r_k - 1) is the
  precision just before the hit (1 when r_1 = 1).
- CMC@K: 1 if r_1 <= K.
- INP (mINP's term, Ye et al. 2021): n / r_n, the share of positives above
  the hardest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featcache.errors import InputError, check_choice

AP_FORMS = ("plain", "trapezoid")


def positive_ranks(scores: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Sorted 1-based ranks of the positives among non-junk entries (ties: lower gallery index first).

    ``scores`` (G,) similarities; ``positives`` and ``junk`` are (G,) masks.
    Counts, for each positive, the valid entries that beat it: O(n_pos * G),
    no sort of the gallery.
    """
    pos = np.flatnonzero(positives)
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64)
    sp = scores[pos]
    jk = np.flatnonzero(junk)
    better = (scores[None, :] > sp[:, None]).sum(1) - (scores[jk][None, :] > sp[:, None]).sum(1)
    equal = scores[None, :] == sp[:, None]
    ties = np.zeros_like(better)
    if equal.sum() > pos.size:  # some score is shared beyond a positive with itself: count earlier entries
        valid_before = ~junk[None, :] & (np.arange(scores.size)[None, :] < pos[:, None])
        ties = (equal & valid_before).sum(1)
    return np.sort(better + ties + 1)


def average_precision(ranks: np.ndarray, form: str = "plain") -> float:
    k = np.arange(1, ranks.size + 1, dtype=np.float64)
    r = ranks.astype(np.float64)
    if form == "plain":  # per query: the common form returns before any check
        return float(np.mean(k / r))
    check_choice(form, AP_FORMS, "--ap")
    prev = np.where(r > 1, (k - 1) / np.maximum(r - 1, 1), 1.0)  # trapezoid
    return float(np.mean((prev + k / r) / 2))


def ap_terms(ranks: np.ndarray, starts: np.ndarray, counts: np.ndarray, form: str) -> np.ndarray:
    """Each hit's term of AP (the module doc's rule), for queries' sorted ranks laid end to end."""
    k = (np.arange(ranks.size) - np.repeat(starts, counts) + 1).astype(np.float64)
    r = ranks.astype(np.float64)
    if form == "plain":
        return k / r
    check_choice(form, AP_FORMS, "--ap")
    return (np.where(r > 1, (k - 1) / np.maximum(r - 1, 1), 1.0) + k / r) / 2  # trapezoid


@dataclass
class Accumulator:
    """Collects per-query results; ``result`` gives the means over evaluated queries."""

    ranks_wanted: tuple[int, ...]
    ap_form: str = "plain"
    aps: list[float] = field(default_factory=list)
    inps: list[float] = field(default_factory=list)
    first: list[int] = field(default_factory=list)
    evaluated: list[int] = field(default_factory=list)
    skipped: int = 0

    def add(self, query_index: int, ranks: np.ndarray) -> None:
        if ranks.size == 0:
            self.skipped += 1
            return
        self.aps.append(average_precision(ranks, self.ap_form))
        self.inps.append(ranks.size / float(ranks[-1]))
        self.first.append(int(ranks[0]))
        self.evaluated.append(query_index)

    def add_block(self, first: int, ranks: np.ndarray, counts: np.ndarray) -> None:
        """``add`` for consecutive queries at once: ``ranks`` sorted within each query, ``counts`` per query."""
        has = counts > 0
        self.skipped += int((~has).sum())
        if not has.any():
            return
        c = counts[has]
        starts = np.concatenate([[0], np.cumsum(c)[:-1]])
        terms = ap_terms(ranks, starts, c, self.ap_form)
        self.aps.extend((np.add.reduceat(terms, starts) / c).tolist())
        self.inps.extend((c / ranks[starts + c - 1]).tolist())
        self.first.extend(ranks[starts].tolist())
        self.evaluated.extend((first + np.flatnonzero(has)).tolist())

    def add_truncated(self, first: int, ranks: np.ndarray, found: np.ndarray, n_pos: np.ndarray, k: int) -> None:
        """Approximate search: ``ranks`` of the ``found`` positives within each returned top-``k`` list, of the
        ``n_pos`` each query has (featcache.evaluation.approx states the rule: AP@k, INP 0 when any is beyond k)."""
        has = n_pos > 0
        self.skipped += int((~has).sum())
        starts = np.concatenate([[0], np.cumsum(found)[:-1]]).astype(np.int64)
        terms = ap_terms(ranks, starts, found, self.ap_form)
        sums = np.zeros(len(found))
        np.add.at(sums, np.repeat(np.arange(len(found)), found), terms)
        padded = np.append(ranks, 0)  # queries with nothing found index the pad; np.where discards it
        last = np.where(found > 0, padded[np.where(found > 0, starts + found - 1, ranks.size)], 0)
        never = np.iinfo(np.int64).max  # a query whose positives are all beyond k: a miss at every CMC rank
        firsts = np.where(found > 0, padded[np.where(found > 0, starts, ranks.size)], never)
        q = np.flatnonzero(has)
        self.aps.extend((sums[q] / n_pos[q]).tolist())
        self.inps.extend(np.where(found[q] == n_pos[q], n_pos[q] / np.maximum(last[q], 1), 0.0).tolist())
        self.first.extend(firsts[q].tolist())
        self.evaluated.extend((first + q).tolist())

    def result(self) -> dict:
        if not self.aps:
            raise InputError("no query has a valid match in the gallery (same identity, another camera): nothing to evaluate")
        first = np.asarray(self.first)
        return {
            "mAP": float(np.mean(self.aps)),
            "mINP": float(np.mean(self.inps)),
            "cmc": {str(k): float(np.mean(first <= k)) for k in self.ranks_wanted},
            "queries_evaluated": len(self.aps),
            "queries_skipped": self.skipped,
        }


def masks(q_pid: int, q_cam: int, g_pids: np.ndarray, g_cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, junk) for one query under the rule in the module doc."""
    same = g_pids == q_pid
    same_cam = g_cams == q_cam
    return same & ~same_cam, same & same_cam


def top_k(scores: np.ndarray, junk: np.ndarray, k: int) -> np.ndarray:
    """The gallery indices of the ``k`` best non-junk entries, best first (ties: earlier entry first)."""
    valid = np.flatnonzero(~junk)
    order = np.lexsort((valid, -scores[valid]))
    return valid[order[:k]]


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` (0-based), ties sharing their mean rank, as Spearman's correlation needs."""
    order = np.argsort(x, kind="stable")
    sx = x[order]
    first = np.concatenate([[True], sx[1:] != sx[:-1]])
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.concatenate([starts[1:], [len(x)]])
    out = np.empty(len(x), dtype=np.float64)
    out[order] = ((starts + ends - 1) / 2.0)[group]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (Pearson's of their tie-averaged ranks); 0 when either
    is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def agreement(qa: np.ndarray, ga: np.ndarray, qb: np.ndarray, gb: np.ndarray, q_pids: np.ndarray, q_cams: np.ndarray,
              g_pids: np.ndarray, g_cams: np.ndarray, k: int = 10, block: int = 1024) -> dict[str, float]:
    """How far two models rank the gallery alike, means over queries:

    - ``top_k_overlap``: |top-k(a) ∩ top-k(b)| / k;
    - ``rank_correlation``: Spearman's correlation of the two models' similarities to the whole gallery.

    Both drop the query's junk entries (same identity and camera), as the protocol does; features are
    L2-normalised rows, scored by inner product.
    """
    if len(qa) != len(qb) or len(ga) != len(gb):
        raise InputError(f"agreement: the two models scored {len(qa)}/{len(qb)} queries and {len(ga)}/{len(gb)} gallery images")
    k = min(k, len(ga))
    overlap, corr = 0.0, 0.0
    for s in range(0, len(qa), block):
        sa, sb = qa[s: s + block] @ ga.T, qb[s: s + block] @ gb.T
        for i in range(len(sa)):
            _, junk = masks(int(q_pids[s + i]), int(q_cams[s + i]), g_pids, g_cams)
            kk = min(k, int((~junk).sum()))
            if kk:
                overlap += np.intersect1d(top_k(sa[i], junk, kk), top_k(sb[i], junk, kk)).size / kk
                corr += spearman(sa[i][~junk], sb[i][~junk])
    n = max(1, len(qa))
    return {"top_k_overlap": overlap / n, "rank_correlation": corr / n}
