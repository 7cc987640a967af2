"""How a teacher's experts compare: its features and routing over cached rows, and AP split by which expert
embedded each true match (the same as the query's, or another), so that the alignment of the experts' spaces
shows directly (docs/notes/gate-routing.md)."""

from __future__ import annotations

import numpy as np

from featcache.evaluation.heldout import evaluate_split
from featcache.evaluation.metrics import average_precision, masks, positive_ranks
from featcache.evaluation.search import l2_normalize
from featcache.gate.data import ValData
from featcache.gate.model import GateModel
from featcache.gate.outputs import infer_rows


def embed(model: GateModel, xs: list[np.ndarray], route: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised retrieval features, the expert each row is routed to: argmax of its gate weights) of cached
    pooled features ``xs`` (one array per expert, rows aligned), in inference mode."""
    xs = [np.asarray(x, dtype=np.float32) for x in xs]
    _, neck, _, gates, _ = infer_rows(model, xs, np.arange(len(xs[0])), route)
    return l2_normalize(neck, inplace=True), gates.argmax(1)


def ap_by_expert(qf: np.ndarray, gf: np.ndarray, q_pids: np.ndarray, q_cams: np.ndarray, g_pids: np.ndarray,
                 g_cams: np.ndarray, q_expert: np.ndarray, g_expert: np.ndarray, ap_form: str = "plain") -> dict[str, float | int | None]:
    """mAP over the true matches embedded by the query's own expert (``same``) and by another (``cross``).

    For each group, the other group's true matches are treated as junk (removed from the ranking), so each AP is
    that of a protocol in which only that group's matches exist; a query with no match in a group is left out of
    that group's mean. ``all`` is the ordinary mAP (featcache's protocol and tie rule) for reference.
    """
    out: dict[str, list[float]] = {"all": [], "same": [], "cross": []}
    for i in range(len(qf)):
        scores = gf @ qf[i]
        pos, junk = masks(int(q_pids[i]), int(q_cams[i]), g_pids, g_cams)
        same = pos & (g_expert == q_expert[i])
        for key, p, j in (("all", pos, junk), ("same", same, junk | (pos & ~same)), ("cross", pos & ~same, junk | same)):
            r = positive_ranks(scores, p, j)
            if r.size:
                out[key].append(average_precision(r, ap_form))
    res: dict[str, float | int | None] = {f"mAP_{k}": float(np.mean(v)) if v else None for k, v in out.items()}
    res.update({f"queries_{k}": len(v) for k, v in out.items()})
    return res


def evaluate_val(model: GateModel, val: ValData, ap_form: str = "plain") -> dict:
    """The teacher on the validation identities (view 0 of each image), under the test protocol: mAP, CMC and
    mINP, and mAP split by the expert that embedded each true match."""
    was = model.training
    model.eval()
    feats, experts = embed(model, val.feats, val.route)
    model.train(was)
    report = evaluate_split(feats, val.pids, val.camids, val.query, ap_form)
    if report["mAP"] is None:
        return report
    q, g = val.query, ~val.query
    report.update(ap_by_expert(feats[q], feats[g], val.pids[q], val.camids[q], val.pids[g], val.camids[g],
                               experts[q], experts[g], ap_form))
    report["routed_share"] = (np.bincount(experts, minlength=len(val.feats)) / len(experts)).round(6).tolist()
    return report
