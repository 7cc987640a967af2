"""The evaluation engine: features (or a distance matrix) in, the protocol's metrics out.

``evaluate`` scores the queries against the gallery block by block (``search``: numpy, FAISS or torch; or the
k-reciprocal re-ranked distances of ``rerank``), hands each block to a ``Ranker`` that finds every query's
positive ranks, and sums them in a ``metrics.Accumulator``: one block of scores in memory at a time, within
``budget`` bytes. ``evaluate_approx`` ranks an approximate index's top-k lists instead (labelled so), and
``evaluate_distances`` a given distance matrix (``featcache.evaluate(distmat=...)``). ``featcache eval``
(``runner``), ``featcache.evaluate`` (``api``), the validation splits (``heldout``) and the gate's route targets
call these; none of them ranks on its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from featcache.evaluation.approx import ApproxIndex, ApproxSpec, truncated_ranks
from featcache.evaluation.metrics import Accumulator
from featcache.evaluation.ranking import GalleryIndex, block_ranks
from featcache.evaluation.rerank import rerank_blocks
from featcache.evaluation.search import DEFAULT_BUDGET, Scorer, block_size, score_blocks
from featcache.progress import progress

if TYPE_CHECKING:
    from featcache.cache import CacheSplit

logger = logging.getLogger(__name__)

RANKS = (1, 5, 10, 20)   # the CMC ranks reported by default
AP_FORM = "plain"        # metrics.AP_FORMS
DEVICE = "auto"


@dataclass
class Evaluation:
    """One evaluation: its report, both splits, the features as ranked and each query's (AP, first rank)."""

    report: dict[str, Any]
    query: CacheSplit
    gallery: CacheSplit
    qf: np.ndarray
    gf: np.ndarray
    per_query: dict[int, tuple[float, int]] = field(default_factory=dict)  # query index -> (AP, first rank)


@dataclass(frozen=True)
class SortRanker:
    """Positive ranks by sorting each block of scores on the CPU (``ranking``)."""

    label: str = ""

    def blocks(self, qf: np.ndarray, scorer: Scorer, block: int) -> Iterator[tuple[int, Any]]:
        return score_blocks(qf, scorer, block)

    def ranks(self, scores: np.ndarray, start: int, index: GalleryIndex) -> tuple:
        return block_ranks(scores, start, index)


@dataclass(frozen=True)
class DeviceRanker:
    """Positive ranks counted where the scores are (``device_ranking``): on a GPU only the ranks leave it."""

    budget: int
    label: str = " (ranks on the device)"

    def blocks(self, qf: np.ndarray, scorer: Scorer, block: int) -> Iterator[tuple[int, Any]]:
        return ((s, scorer.device_scores(qf[s: s + block])) for s in range(0, len(qf), block))

    def ranks(self, scores, start: int, index: GalleryIndex) -> tuple:
        from featcache.evaluation.device_ranking import device_block_ranks  # torch

        return device_block_ranks(scores, start, index, self.budget)


def ranker_for(ranking: str, scorer: Scorer, budget: int) -> SortRanker | DeviceRanker:
    """What ``ranking`` selects: ``device`` counts each positive's rank where the scores are computed (on a GPU with
    torch, even where GPU FAISS is installed, so only ranks leave it; CPU torch without a GPU); ``sort`` ranks on
    the CPU; ``auto`` counts on the device when the scores are on a GPU, and sorts otherwise. All give the same ranks."""
    if ranking == "device" or (ranking == "auto" and scorer.backend == "torch-cuda"):
        return DeviceRanker(budget)
    return SortRanker()


def warn_degenerate(x: np.ndarray, what: str, per_row: bool = False) -> bool:
    """Warn when every row of ``x`` is the same (``per_row``: every entry of each row): all scores of a query tie, and
    its metrics come from the gallery's order alone (all-zero features from a dead model, say)."""
    if x.size == 0 or len(x) < 2 and not per_row:
        return False
    spread = np.ptp(x, axis=1) if per_row else np.ptp(x, axis=0)
    if spread.max() > 0:
        return False
    logger.warning("%s are degenerate (%s): every score ties, so the metrics follow the gallery's order, not the "
                   "model", what, "each row constant" if per_row else "every row the same")
    return True


def evaluate(qf: np.ndarray, gf: np.ndarray, q_pids: np.ndarray, q_cams: np.ndarray, g_pids: np.ndarray, g_cams: np.ndarray,
             ranks: tuple[int, ...] = RANKS, ap_form: str = AP_FORM, device: str = DEVICE, budget: int = DEFAULT_BUDGET,
             rerank: tuple[int, int, float] | None = None,
             approx: ApproxSpec | None = None, ranking: str = "auto") -> tuple[dict[str, Any], dict[int, tuple[float, int]], str]:
    """Metrics of features ranked by their inner product, which is the protocol's cosine similarity only when
    every row has unit length (featcache's feature sources L2-normalise them; ``featcache.evaluate``, the public
    function, normalises whatever it is given). Returns (metrics, per-query (AP, first rank), backend). With
    ``approx``, the metrics of approximate search's top-k lists (``evaluate_approx``), labelled so; ``ranking``
    picks the ``Ranker`` (``ranker_for``)."""
    warn_degenerate(gf, "gallery features")
    acc = Accumulator(tuple(sorted(set(ranks))), ap_form)
    if approx is not None:
        return evaluate_approx(qf, gf, q_pids, q_cams, g_pids, g_cams, acc, approx, device, budget)
    ranker: SortRanker | DeviceRanker
    if rerank is not None:
        ranker, blocks = SortRanker(), rerank_blocks(qf, gf, *rerank, device=device, budget=budget)
        backend = "rerank"
    else:
        scorer = Scorer(gf, device, torch_scores=ranking == "device")
        ranker = ranker_for(ranking, scorer, budget)
        blocks = ranker.blocks(qf, scorer, block_size(len(gf), budget))
        backend = scorer.backend + ranker.label
    per_query = _accumulate(acc, blocks, ranker, GalleryIndex.build(q_pids, q_cams, g_pids, g_cams), len(qf))
    return acc.result(), per_query, backend


def _accumulate(acc: Accumulator, blocks: Iterable[tuple[int, Any]], ranker: SortRanker | DeviceRanker,
                index: GalleryIndex, n_queries: int) -> dict[int, tuple[float, int]]:
    """Rank each block of scores into ``acc``; the per-query (AP, first rank) of the evaluated queries."""
    per_query: dict[int, tuple[float, int]] = {}
    with progress(total=n_queries, desc="eval", unit="query", leave=False) as bar:
        for start, scores in blocks:
            n = len(acc.aps)
            acc.add_block(start, *ranker.ranks(scores, start, index))
            per_query.update(zip(acc.evaluated[n:], zip(acc.aps[n:], acc.first[n:])))
            bar.update(len(scores))
            del scores  # before the next block is scored: one block's scores at a time, not two
    return per_query


def evaluate_approx(qf, gf, q_pids, q_cams, g_pids, g_cams, acc: Accumulator, spec: ApproxSpec, device: str,
                    budget: int) -> tuple[dict[str, Any], dict[int, tuple[float, int]], str]:
    """The metrics of an approximate index's top ``spec.k`` lists (AP@k, CMC within k), labelled as such."""
    index = GalleryIndex.build(q_pids, q_cams, g_pids, g_cams)
    ann = ApproxIndex(gf, spec, device)
    k_search = min(len(gf), spec.k + int(np.diff(index.junk_start).max(initial=0)))  # junk is dropped from the lists
    block = max(1, budget // max(1, k_search * 64))
    per_query: dict[int, tuple[float, int]] = {}
    t0 = time.perf_counter()
    with progress(total=len(qf), desc="eval (approx)", unit="query", leave=False) as bar:
        for s in range(0, len(qf), block):
            found = ann.search(qf[s: s + block], k_search)
            n = len(acc.aps)
            acc.add_truncated(s, *truncated_ranks(found, s, index, len(gf), spec.k), spec.k)
            per_query.update(zip(acc.evaluated[n:], zip(acc.aps[n:], acc.first[n:])))
            bar.update(len(found))
    res = acc.result()
    res["search"] = {"mode": "approx", "index": ann.description, "k": spec.k, "build_s": ann.build_seconds,
                     "search_s": time.perf_counter() - t0,
                     "note": "approximate search: AP@k over each query's top k (a positive beyond k adds nothing), "
                             "CMC within k, INP 0 when a positive is beyond k; not the protocol's exact metrics"}
    return res, per_query, ann.backend


def evaluate_distances(d: np.ndarray, qp: np.ndarray, qc: np.ndarray, gp: np.ndarray, gc: np.ndarray,
                       ranks: tuple[int, ...], ap: str, budget: int) -> dict[str, Any]:
    """The protocol's metrics of a (query x gallery) distance matrix, smallest first, in blocks of queries."""
    if len(gp) > 1:  # one gallery column cannot tie with another
        warn_degenerate(d, "distmat's distances", per_row=True)
    acc = Accumulator(ranks, ap)
    index = GalleryIndex.build(qp, qc, gp, gc)
    block = max(1, budget // max(1, len(gp) * 24))
    for s in range(0, len(d), block):
        acc.add_block(s, *block_ranks(-d[s: s + block], s, index))
    return acc.result()
