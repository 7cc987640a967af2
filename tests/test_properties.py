"""Properties of the public API, searched by hypothesis against small independent references written here.

``featcache.evaluate`` over random sizes, dimensions and dtypes, with ties, junk, gallery boxes of identity -1,
distractors (identity 0), queries without a match and distance-matrix input; ``CacheSplit.read`` over random views
and subsets of a small cache. Scores are exact in every dtype (one-hot features, integer distances), so ties are
ties on every CPU and the reference's order is the protocol's, not a rounding accident. The default suite runs a
few dozen examples of each; ``-m slow`` runs the same properties with many more.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import featcache
from featcache.errors import FeatcacheError

# the default suite's examples are the same on every run (a failure reproduces); the long runs draw new ones. No
# example database: nothing is written into the checkout (hypothesis prints each falsifying example).
QUICK = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)
LONG = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
RANKS = (1, 2, 5)


# ---------------------------------------------------------------------------------------------- the reference
def reference(order_key: np.ndarray, qp, qc, gp, gc, minus_one_junk: bool = True) -> dict | str:
    """The Market-1501 protocol from its definition. ``order_key[i, j]``: smaller ranks gallery j earlier for query
    i; ties go to the earlier gallery entry. Junk: same identity and camera, or gallery identity -1. Where there is
    nothing to evaluate, the error featcache must raise (a pattern)."""
    if minus_one_junk and (np.asarray(gp) == -1).all():
        return "every gallery row has an identity in junk_pids"
    aps, inps, firsts = [], [], []
    for i in range(len(qp)):
        order = sorted(range(len(gp)), key=lambda j: (order_key[i, j], j))
        kept = [j for j in order if not (minus_one_junk and gp[j] == -1) and not (gp[j] == qp[i] and gc[j] == qc[i])]
        hits = [r for r, j in enumerate(kept, 1) if gp[j] == qp[i]]
        if not hits:
            continue
        aps.append(np.mean([(n + 1) / r for n, r in enumerate(hits)]))
        inps.append(len(hits) / hits[-1])
        firsts.append(hits[0])
    if not aps:
        return "no query has a valid match"
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "queries_evaluated": len(aps),
            "gallery_junk": int((np.asarray(gp) == -1).sum()) if minus_one_junk else 0,
            "queries_skipped": len(qp) - len(aps), "cmc": {str(k): float(np.mean([f <= k for f in firsts])) for k in RANKS}}


def agrees(ours_call, ref: dict | str) -> None:
    if isinstance(ref, str):
        with pytest.raises(FeatcacheError, match=ref):
            ours_call()
        return
    ours = ours_call()
    for key in ("mAP", "mINP"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert ours["cmc"] == pytest.approx(ref["cmc"], abs=1e-6)
    assert (ours["queries_evaluated"], ours["queries_skipped"]) == (ref["queries_evaluated"], ref["queries_skipped"])
    assert ours["gallery_junk"] == ref["gallery_junk"]


# ---------------------------------------------------------------------------------------------- the inputs
@st.composite
def labelled_sets(draw):
    """Query and gallery labels: identities 1-4 (query), -1 (junk boxes), 0 (distractors) and 1-4 (gallery), cameras
    1-3, so same-camera junk, ties and queries without a match all occur."""
    nq, ng = draw(st.integers(1, 6)), draw(st.integers(1, 24))
    qp = np.array(draw(st.lists(st.integers(1, 4), min_size=nq, max_size=nq)))
    gp = np.array(draw(st.lists(st.integers(-1, 4), min_size=ng, max_size=ng)))
    qc = np.array(draw(st.lists(st.integers(1, 3), min_size=nq, max_size=nq)))
    gc = np.array(draw(st.lists(st.integers(1, 3), min_size=ng, max_size=ng)))
    return qp, gp, qc, gc


@st.composite
def feature_case(draw):
    """One-hot features (times a positive scale, any dtype): cosine scores are exactly 1 or 0, so ties are exact."""
    qp, gp, qc, gc = draw(labelled_sets())
    d = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64, np.int32]))
    qdir = np.array(draw(st.lists(st.integers(0, d - 1), min_size=len(qp), max_size=len(qp))))
    gdir = np.array(draw(st.lists(st.integers(0, d - 1), min_size=len(gp), max_size=len(gp))))
    scale = draw(st.integers(1, 9))
    return np.eye(d)[qdir].astype(dtype) * scale, np.eye(d)[gdir].astype(dtype), qp, gp, qc, gc


@st.composite
def distance_case(draw):
    """Integer distances in a small range: many exact ties, any float dtype."""
    qp, gp, qc, gc = draw(labelled_sets())
    dist = np.array(draw(st.lists(st.integers(0, 4), min_size=len(qp) * len(gp), max_size=len(qp) * len(gp))))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int64]))
    return dist.reshape(len(qp), len(gp)).astype(dtype), qp, gp, qc, gc


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate_on_features(case) -> None:
    qf, gf, qp, gp, qc, gc = case
    cos = qf.astype(np.float64) @ gf.astype(np.float64).T  # one-hot rows: the cosine up to a positive scale
    agrees(lambda: featcache.evaluate(qf, gf, qp, gp, qc, gc, ranks=RANKS), reference(-cos, qp, qc, gp, gc))
    agrees(lambda: featcache.evaluate(qf, gf, qp, gp, qc, gc, ranks=RANKS, junk_pids=()),  # -1 boxes as negatives
           reference(-cos, qp, qc, gp, gc, minus_one_junk=False))


def evaluate_on_distances(case) -> None:
    dist, qp, gp, qc, gc = case
    agrees(lambda: featcache.evaluate(None, None, qp, gp, qc, gc, distmat=dist, ranks=RANKS), reference(dist, qp, qc, gp, gc))


@pytest.mark.heavy
@QUICK
@given(feature_case())
def test_evaluate_on_features_agrees_with_the_protocol(case):
    evaluate_on_features(case)


@QUICK
@given(distance_case())
def test_evaluate_on_a_distance_matrix_agrees_with_the_protocol(case):
    evaluate_on_distances(case)


@pytest.mark.slow
@LONG
@given(feature_case())
def test_evaluate_on_features_agrees_with_the_protocol_long(case):
    evaluate_on_features(case)


@pytest.mark.slow
@LONG
@given(distance_case())
def test_evaluate_on_a_distance_matrix_agrees_with_the_protocol_long(case):
    evaluate_on_distances(case)


# ---------------------------------------------------------------------------------------------- CacheSplit.read
def raw_rows(cache, split: str, view: int, subset: slice) -> np.ndarray | None:
    """The split's rows of view ``view`` read with plain h5py, or None when some image lacks that view."""
    with h5py.File(cache, "r") as f:
        code = ["train", "query", "gallery"].index(split)
        images = np.flatnonzero((f["images/split"][...] == code) & (f["images/status"][...] == 1))
        n_views = f["images/n_views"][...][images]
        if view < 0 or (n_views <= view).any():
            return None
        rows = (f["images/view_start"][...][images] + view)[subset]
        return f["backbones/clip-tiny/pooled"][...][rows]


def read_agrees(cache, split: str, view: int, subset: slice) -> None:
    ref = raw_rows(cache, split, view, subset)
    with featcache.open_cache(cache) as c:
        part = c.split(split)
        if ref is None:
            with pytest.raises(FeatcacheError, match=f"the {split} split holds .*not view {view}"):
                part.read("clip-tiny", "pooled", view=view, subset=subset)
        else:
            np.testing.assert_array_equal(part.read("clip-tiny", "pooled", view=view, subset=subset), ref)


reads = dict(split=st.sampled_from(["train", "query", "gallery"]), view=st.integers(-3, 4),
             subset=st.builds(slice, st.none() | st.integers(-8, 8), st.none() | st.integers(-8, 8),
                              st.none() | st.integers(1, 3)))


@settings(QUICK, max_examples=25)
@given(**reads)
def test_cache_split_read_agrees_with_plain_h5py(market_cache, split, view, subset):
    read_agrees(market_cache, split, view, subset)


@pytest.mark.slow
@settings(LONG, max_examples=300)
@given(**reads)
def test_cache_split_read_agrees_with_plain_h5py_long(market_cache, split, view, subset):
    read_agrees(market_cache, split, view, subset)
