"""Teacher targets: the gate run's outputs for every cached training view, computed once at the end of a run
and written through ``featcache.cache.targets`` (which documents the file), read by distillation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.cache.targets import TARGETS, TeacherTargets, ValTargets, write_teacher_targets
from featcache.evaluation.search import l2_normalize
from featcache.gate.data import TrainData
from featcache.gate.model import GateModel
from featcache.gate.outputs import infer_rows
from featcache.training.rundir import RunDir, state_digest


def write_targets(model: GateModel, data: TrainData, cache: Path, run: Path) -> Path:
    """For every training image and cached view: fused feature, ID logits, gate weights (HDF5, atomic)."""
    rows = np.arange(len(data.feats[0]))
    fused, retrieval, logits, gates, _ = infer_rows(model, data.feats, rows, data.route)
    val = data.val
    val_retrieval = infer_rows(model, val.feats, np.arange(len(val.pids)), val.route)[1] if val is not None else None
    image_of_row = np.repeat(np.arange(len(data.n_views)), data.n_views)
    view_of_row = rows - data.row_start[image_of_row]
    digest = state_digest(model.state_dict())

    held = None
    if val is not None:
        held = ValTargets(val.images.astype(np.int64), val.pids.astype(np.int64), val.camids.astype(np.int64),
                          val.query.astype(bool), l2_normalize(val_retrieval.astype(np.float32)))
    return write_teacher_targets(TeacherTargets(
        RunDir(run).artifact(TARGETS), list(data.experts), data.identity.digest(), str(Path(run).resolve()),
        image=data.images[image_of_row].astype(np.int64), view=view_of_row.astype(np.uint8),
        label=data.labels[image_of_row].astype(np.int64), label_pids=data.pids.astype(np.int64),
        feature=fused.astype(np.float32), logits=logits.astype(np.float32), gates=gates.astype(np.float32),
        weights_digest=digest, retrieval=l2_normalize(retrieval.astype(np.float32)), val=held,
        cache=str(Path(cache).resolve())))
