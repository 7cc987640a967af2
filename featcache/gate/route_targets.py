"""Routing targets from retrieval: per training image, the expert whose cached feature alone retrieves the image's
identity best, leave-one-out within the training split (``--set route_target=retrieval``).

The route-by-loss targets compare the experts' ID losses on the training images themselves, which the adapters
fit: once both fit, the comparison says little about which expert generalises. These targets are computed once,
before training, from the cached features alone: each training image is a query against every other training
image under the test protocol (its identity in other cameras: positives; in its own camera, itself included:
junk), and the target is the expert with the higher AP. Images without a positive, or with equal APs, have none.
"""

from __future__ import annotations

import logging

import numpy as np

from featcache.evaluation.search import l2_normalize
from featcache.gate.data import TrainData

logger = logging.getLogger(__name__)
NO_TARGET = -1


def retrieval_targets(data: TrainData, device: str = "cpu") -> np.ndarray:
    """(images,) the index of the expert with the best leave-one-out AP of each training image, or ``NO_TARGET``."""
    from featcache.evaluation.engine import evaluate

    pids, cams = data.pids[data.labels], data.camids
    aps = np.full((len(data.labels), len(data.feats)), np.nan)
    for e, f in enumerate(data.feats):
        x = l2_normalize(np.ascontiguousarray(f[data.row_start], dtype=np.float32), inplace=True)  # view 0 of each image
        _, per_query, _ = evaluate(x, x, pids, cams, pids, cams, device=device)
        for i, (ap, _) in per_query.items():
            aps[i, e] = ap
    top2 = np.sort(aps, 1)[:, -2:]  # NaN (no positive) sorts last
    best = np.where(np.isnan(aps).any(1) | (top2[:, 0] == top2[:, 1]), NO_TARGET, np.argmax(np.nan_to_num(aps), 1))
    logger.info("retrieval routing targets: %s; %d images without one",
                ", ".join(f"{n} {int((best == e).sum())}" for e, n in enumerate(data.experts)), int((best == NO_TARGET).sum()))
    return best.astype(np.int64)
