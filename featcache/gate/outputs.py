"""What a run leaves besides its weights: inference over cached rows, the BN recalibration and gate statistics (Section 4.3)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from featcache.gate.data import TrainData
from featcache.gate.model import GateModel, Gated, Single

logger = logging.getLogger(__name__)

TARGETS = "teacher_targets.h5"


@torch.inference_mode()
def infer_rows(model: GateModel, feats: list[np.ndarray], rows: np.ndarray, block: int = 4096):
    """Inference-mode teacher outputs for cached rows: (fused feature F_t, BN feature, logits z_t, gate weights)."""
    outs = [], [], [], []
    device = next(model.parameters()).device
    for s in range(0, len(rows), block):
        r = rows[s: s + block]
        fo, neck, logits = model([torch.from_numpy(f[r]).to(device) for f in feats])
        for acc, v in zip(outs, (fo.feature, neck, logits, fo.gates)):
            acc.append(v.float().cpu().numpy())
    return tuple(np.concatenate(o) for o in outs)


@torch.inference_mode()
def recalibrate_bn(model: GateModel, data: TrainData) -> None:
    """Re-estimate the BN neck's statistics on inference-mode fused features of every training view.

    Training sees a dense softmax mixture (temperature 1.0); inference uses
    temperature 0.5 and, for the top-k fusions, a sparse mixture, so the fused
    features at inference follow another distribution than the one BN's
    running statistics were collected on. Without this, the retrieval feature
    of a gated teacher is dominated by a constant offset.
    """
    fused, _, _, _ = infer_rows(model, data.feats, np.arange(len(data.feats[0])))
    f = torch.from_numpy(fused).double()
    model.bn.running_mean.copy_(f.mean(0).float())
    model.bn.running_var.copy_(f.var(0, unbiased=True).float())


def gate_statistics(model: GateModel, data: TrainData, out: Path) -> dict:
    """Mean expert weight overall and per camera, share routed to each expert (view 0 of every training image)."""
    _, _, _, g = infer_rows(model, data.feats, data.row_start)
    routes = isinstance(model.fusion, (Gated, Single))  # concat and average weigh experts equally: nothing is routed
    routed = np.bincount(g.argmax(1), minlength=g.shape[1]) / len(g) if routes else None
    stats = {
        "experts": data.experts,
        "mean_weight": dict(zip(data.experts, g.mean(0).round(6).tolist())),
        "routed_share": dict(zip(data.experts, routed.round(6).tolist())) if routed is not None else None,
        "per_camera": {str(int(c)): dict(zip(data.experts, g[data.camids == c].mean(0).round(6).tolist())) for c in np.unique(data.camids)},
        "images": int(len(g)),
        "mode": "inference (temperature 0.5, sparse top-k where the fusion is)",
    }
    (out / "gate_stats.json").write_text(json.dumps(stats, indent=2))
    _histogram(g, data.experts, out / "gate_hist.png")
    return stats


def _histogram(g: np.ndarray, experts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for i, name in enumerate(experts):
        ax.hist(g[:, i], bins=20, range=(0, 1), alpha=0.6, label=name)
    ax.set(xlabel="gate weight", ylabel="training images", title="expert weights at inference")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
