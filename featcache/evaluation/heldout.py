"""A held-out split evaluated under the test protocol: what gate and student validation share.

The split itself (which identities, which images are queries) is chosen in featcache.training.validation;
this module only ranks and scores, so that it stays in the evaluation layer, which knows no stage.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import InputError


def evaluate_split(feats: np.ndarray, pids: np.ndarray, camids: np.ndarray, query: np.ndarray, ap_form: str = "plain") -> dict:
    """L2-normalised features of the validation images under the test protocol (queries ``query``, gallery the
    rest): mAP, CMC, mINP, mAP per query camera and the split's sizes. A split without true matches gives
    ``mAP: None`` and the reason, so that a finished training is not lost to it."""
    from featcache.evaluation.engine import evaluate

    q, g = query, ~query
    counts = dict(identities=int(len(np.unique(pids))), queries=int(q.sum()), gallery=int(g.sum()))
    try:
        report, per_query, _ = evaluate(feats[q], feats[g], pids[q], camids[q], pids[g], camids[g], ap_form=ap_form, device="cpu")
    except InputError as exc:  # e.g. held-out identities each seen by one camera
        return {"mAP": None, "reason": str(exc), **counts}
    q_cams = camids[q]
    by_cam: dict[int, list[float]] = {}
    for i, (ap, _) in per_query.items():
        by_cam.setdefault(int(q_cams[i]), []).append(ap)
    report["mAP_by_camera"] = {str(c): float(np.mean(v)) for c, v in sorted(by_cam.items())}  # queries from that camera
    return {**report, **counts}
