"""The student on the identities its teacher held out: retrieval under the test protocol, and how alike it ranks
with its teacher (written to the run's val.json)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from featcache.distill.data import Teacher, ViewDataset
from featcache.distill.students import Student, normalize
from featcache.evaluation.heldout import evaluate_split
from featcache.evaluation.metrics import agreement
from featcache.evaluation.search import l2_normalize

logger = logging.getLogger(__name__)

AGREE_K = 10


@torch.inference_mode()
def validate(model: Student, teacher: Teacher, dataset: ViewDataset, device: torch.device, batch: int = 64) -> dict | None:
    """The student on the identities its teacher held out (view 0 of each image, under the test protocol): mAP,
    CMC, mINP, and its agreement with the teacher's ranking of the same images (top-10 overlap, rank correlation
    of similarities); None when the teacher held none out or its targets predate the record (version 1)."""
    val = teacher.targets.val
    if val is None:
        return None
    was = model.training
    model.eval()
    feats = []
    for s in range(0, len(val.image), batch):
        pixels = torch.stack([dataset[(int(i), 0)] for i in val.image[s: s + batch]])
        feats.append(model(normalize(pixels.to(device))).float().cpu().numpy())
    model.train(was)
    f = l2_normalize(np.concatenate(feats))
    report = evaluate_split(f, val.pid, val.camid, val.query)
    if report["mAP"] is not None:
        q, g = val.query, ~val.query
        report["agreement"] = {"with": "teacher", "k": AGREE_K, **agreement(
            f[q], f[g], val.retrieval[q], val.retrieval[g], val.pid[q], val.camid[q], val.pid[g], val.camid[g], AGREE_K)}
    return report


def log_validation(val: dict) -> None:
    """One log line of what ``validate`` found."""
    if val["mAP"] is None:
        logger.warning("validation: nothing to evaluate: %s", val["reason"])
        return
    a = val["agreement"]
    logger.info("validation (%d identities held out by the teacher): mAP %.4f; agreement with the teacher: "
                "top-%d overlap %.4f, rank correlation %.4f", val["identities"], val["mAP"], a["k"],
                a["top_k_overlap"], a["rank_correlation"])
