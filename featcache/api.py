"""featcache's public Python API: the few names a researcher imports from ``featcache`` (docs/api.md).

- ``evaluate``: mAP, CMC and mINP of any model's features (or of a distance matrix) under the
  Market-1501 / VeRi-776 protocol, exact, in blocks within a memory budget.
- ``open_cache``: a feature cache for reading (``CacheReader``: pooled features, tokens and attention maps
  of a split, every row checked).
- ``read_teacher_targets``: a gate run's teacher targets (``TeacherTargets``).
- ``load_model``: a trained student or teacher as a ``torch.nn.Module`` that embeds images exactly as ``featcache
  eval`` does (``featcache.evaluation.embedder.Embedder``).

These names, and the classes they return, are public and kept stable; everything else in the package may
change between versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from featcache.errors import InputError, check_choice
from featcache.runtime import check_device_name, resolve_device

if TYPE_CHECKING:
    from featcache.cache.reader import CacheReader
    from featcache.evaluation.embedder import Embedder
    from featcache.cache.targets import TeacherTargets

ArrayLike = Any  # a NumPy array, a torch tensor, or a (nested) list


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    try:
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, on any device, of any dtype (bf16 too)
            x = x.detach().cpu()
            if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
                x = x.float()
            x = x.numpy()
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name}: expected an array, a tensor or a list ({exc})") from None


def _matrix(x: ArrayLike, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim != 2 or a.dtype.kind not in "fiub":
        raise InputError(f"{name}: expected a 2-D array of numbers, got shape {a.shape} of {a.dtype}")
    bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
    if bad.size:
        raise InputError(f"{name}: {bad.size} row(s) hold NaN or inf (rows {', '.join(map(str, bad[:5]))}"
                         f"{' ...' if bad.size > 5 else ''})")
    return a.astype(np.float32, copy=False)  # features and distances are ranked as float32


def _labels(x: ArrayLike, n: int, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim > 1 and a.size != max(a.shape):
        raise InputError(f"{name}: expected a 1-D sequence of labels, got shape {a.shape}")
    a = a.reshape(-1)
    if a.dtype.kind not in "iubf" or (a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a)))):
        raise InputError(f"{name}: expected integer labels (integers, or floats with integer values), got {a.dtype}")
    if len(a) != n:
        raise InputError(f"{name}: {len(a)} labels for {n} rows")
    return a.astype(np.int64)


def evaluate(query: ArrayLike | None, gallery: ArrayLike | None, q_pids: ArrayLike, g_pids: ArrayLike,
             q_camids: ArrayLike, g_camids: ArrayLike, *, distmat: ArrayLike | None = None,
             ranks: Sequence[int] = (1, 5, 10, 20), ap: str = "plain", device: str = "auto",
             budget_mb: int = 256, junk_pids: Sequence[int] = (-1,), ranking: str = "auto") -> dict[str, Any]:
    """Exact re-ID metrics under the Market-1501 / VeRi-776 protocol.

    Pass features ``query`` (Q, D) and ``gallery`` (G, D), or ``distmat`` (Q, G) with ``query`` and ``gallery``
    None; then identities and cameras, in torchreid's order (``q_pids, g_pids, q_camids, g_camids``).

    - Features are ranked by cosine similarity: featcache L2-normalises every row itself, so unnormalised
      features give the same metrics as normalised ones.
    - A distance matrix is ranked smallest first (Euclidean distances, say).
    - Ties are broken by gallery order (as a stable sort would).
    - The protocol ignores each query's junk: gallery images of its identity seen by its own camera.
    - Gallery images whose identity is in ``junk_pids`` (default: -1, the official Market-1501 kit's junk
      boxes) are ignored for every query, as if removed. ``junk_pids=()`` counts them as negatives, as
      torchreid does on data its readers have not filtered. A query of such an identity is refused.
    - A query with no valid match is skipped and counted in ``queries_skipped``.
    - Inputs may be NumPy arrays, torch tensors (any device) or lists. Labels may be of any integer type, or
      floats holding integers.

    ``ap``: ``plain`` (torchreid, fast-reid) or ``trapezoid`` (the official MATLAB kits). ``device``: where
    features are searched (``auto``, ``cpu``, ``cuda`` or ``cuda:N``). ``ranking``: where each positive's rank is
    counted: ``device`` where the scores are computed (on a GPU, so only ranks leave it; on the CPU, with torch),
    ``sort`` on the CPU, ``auto`` on the device when the scores are on a GPU. All three give the same ranks. Returns ``{"mAP", "mINP", "cmc": {"1": ...},
    "queries_evaluated", "queries_skipped", "gallery_junk"}``, fractions in [0, 1] (``gallery_junk``: the
    gallery rows ignored through ``junk_pids``).
    """
    from featcache.evaluation.metrics import AP_FORMS
    from featcache.evaluation.engine import evaluate as evaluate_features, evaluate_distances
    from featcache.evaluation.search import RANKINGS, l2_normalize

    check_choice(ap, AP_FORMS, "ap", InputError, what=f"ap={ap!r}")  # named as the keywords they are
    check_choice(ranking, RANKINGS, "ranking", InputError, what=f"ranking={ranking!r}")
    check_device_name(str(device), "device")
    if str(device).startswith("cuda"):  # named as the keyword it is, not as the command line's --device
        resolve_device(str(device), "device")
    ranks = tuple(sorted({int(k) for k in ranks}))
    if not ranks or ranks[0] < 1:
        raise InputError(f"ranks={ranks}: expected positive CMC ranks")
    qf, gf, d = _scores_input(query, gallery, distmat, q_pids, g_pids)
    nq, ng = d.shape if d is not None else (len(qf), len(gf))
    qp, gp = _labels(q_pids, nq, "q_pids"), _labels(g_pids, ng, "g_pids")
    qc, gc = _labels(q_camids, nq, "q_camids"), _labels(g_camids, ng, "g_camids")
    keep = _gallery_kept(qp, gp, junk_pids)
    gp, gc, ng = gp[keep], gc[keep], int(keep.sum())
    budget = int(budget_mb) * 2**20
    if d is None:
        qf, gf = l2_normalize(qf), l2_normalize(gf[keep])  # the protocol's cosine; a zero row stays zero
        res = evaluate_features(qf, gf, qp, qc, gp, gc, ranks=ranks, ap_form=ap, device=device, budget=budget,
                                ranking=ranking)[0]
        return {**res, "gallery_junk": int((~keep).sum())}
    res = evaluate_distances(d[:, keep], qp, qc, gp, gc, ranks, ap, budget)
    return {**res, "gallery_junk": int((~keep).sum())}


def _scores_input(query: ArrayLike | None, gallery: ArrayLike | None, distmat: ArrayLike | None, q_pids: ArrayLike,
                  g_pids: ArrayLike) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(query features, gallery features, None) or (None, None, distance matrix), each checked."""
    if distmat is not None:
        if query is not None or gallery is not None:
            raise InputError("evaluate: pass features (query, gallery) or distmat, not both")
        d = _matrix(distmat, "distmat")
        _check_orientation(*d.shape, q_pids, g_pids)
        return None, None, d
    if query is None or gallery is None:
        raise InputError("evaluate: pass query and gallery features, or distmat=")
    qf, gf = _matrix(query, "query"), _matrix(gallery, "gallery")
    if qf.shape[1] != gf.shape[1]:
        raise InputError(f"query has {qf.shape[1]}-d features and gallery {gf.shape[1]}-d: they must match")
    return qf, gf, None


def _check_orientation(nq: int, ng: int, q_pids: ArrayLike, g_pids: ArrayLike) -> None:
    """A transposed distance matrix is named as such (its rows are gallery images), not as a label-count mismatch."""
    n_q, n_g = (_to_numpy(x, name).size for x, name in ((q_pids, "q_pids"), (g_pids, "g_pids")))
    if (nq, ng) == (n_g, n_q) and nq != ng:
        raise InputError(f"distmat: shape ({nq}, {ng}) is (gallery x query) for {n_q} query and {n_g} gallery labels; "
                         f"expected (query x gallery), ({n_q}, {n_g}): pass distmat.T")


def _gallery_kept(qp: np.ndarray, gp: np.ndarray, junk_pids: Sequence[int]) -> np.ndarray:
    """The gallery rows that take part in the ranking: those whose identity is not in ``junk_pids``; a query of
    such an identity has no defined matches and is refused."""
    try:
        junk = np.asarray(list(junk_pids))
    except TypeError:
        junk = np.asarray([None])
    if junk.size and junk.dtype.kind not in "iu":
        raise InputError(f"junk_pids={junk_pids!r}: expected a sequence of integer identities, e.g. (-1,)")
    junk = junk.astype(np.int64)
    bad = np.flatnonzero(np.isin(qp, junk))
    if bad.size:
        raise InputError(f"q_pids: query row(s) {', '.join(map(str, bad[:5]))}{' ...' if bad.size > 5 else ''} have "
                         f"identity {int(qp[bad[0]])}, which junk_pids={tuple(int(p) for p in junk)} marks as junk: "
                         f"remove those queries")
    keep = ~np.isin(gp, junk)
    if len(gp) == 0:
        raise InputError("gallery: no rows to search")
    if not keep.any():
        raise InputError(f"g_pids: every gallery row has an identity in junk_pids={tuple(int(p) for p in junk)}")
    return keep


def open_cache(path: str | Path) -> "CacheReader":
    """A feature cache for reading (``featcache.cache.CacheReader``); use it as a context manager."""
    from featcache.cache.reader import CacheReader

    return CacheReader(path)


def read_teacher_targets(path: str | Path, cache_identity: str | None = None) -> "TeacherTargets":
    """A gate run's teacher targets (``RUN/teacher_targets.h5``) in memory (``featcache.cache.targets.TeacherTargets``)."""
    from featcache.cache.targets import TeacherTargets

    return TeacherTargets.load(Path(path), cache_identity)


def load_model(run: str | Path, device: str = "cpu") -> "Embedder":
    """A finished ``distill`` run (the student) or ``train-gate`` run (the teacher, with its backbones loaded the
    standard way, from the weights its cache was made with) as a ``torch.nn.Module`` in eval mode on ``device``.

    ``model.embed(images)`` gives the features ``featcache eval`` ranks, L2-normalised, as an (N, d) array;
    ``images`` are file paths, PIL images or a uint8 tensor (N, 3, H, W). ``model.preprocess(images)`` gives the
    pixels evaluation feeds the model, and ``model(pixels)`` the features, for a loop of one's own.
    """
    from featcache.evaluation.features import RUN_MODELS
    from featcache.training.rundir import RunDir

    check_device_name(str(device), "device")
    run = Path(run)
    command = RunDir.command_of(run)
    if command not in RUN_MODELS.names():  # names() loads the stages that register their runs
        raise InputError(f"{run} is a {command} run; load_model loads {' and '.join(RUN_MODELS.names())} runs")
    return RUN_MODELS.get(command)(run, str(resolve_device(device)))
