"""What a run leaves besides its weights: inference over cached rows, the BN recalibration and gate statistics (Section 4.3)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from featcache.gate.data import TrainData
from featcache.gate.model import GateModel, Gated, Single
from featcache.fileio import save_figure
from featcache.training.rundir import GATE_STATS, RunDir

logger = logging.getLogger(__name__)


@torch.inference_mode()
def infer_rows(model: GateModel, feats: list[np.ndarray], rows: np.ndarray, route: np.ndarray | None = None, block: int = 4096):
    """Inference-mode teacher outputs for cached rows: (fused feature F_t, BN feature, logits z_t, gate weights,
    the gate's dense probabilities, or the gate weights where the fusion has no gate)."""
    outs = [], [], [], [], []
    device = next(model.parameters()).device
    for s in range(0, len(rows), block):
        r = rows[s: s + block]
        rt = torch.from_numpy(route[r]).to(device) if route is not None else None
        fo, neck, logits = model([torch.from_numpy(f[r]).to(device) for f in feats], rt)
        probs = fo.probs if fo.probs is not None else fo.gates
        for acc, v in zip(outs, (fo.feature, neck, logits, fo.gates, probs)):
            acc.append(v.float().cpu().numpy())
    return tuple(np.concatenate(o) for o in outs)


def routing_row(model: GateModel, data: TrainData) -> dict[str, float]:
    """Per-epoch routing figures for log.csv (view 0 of every training image, inference mode): the gate's mean
    entropy, the share routed to each expert, and per camera the share routed to each expert."""
    if not isinstance(model.fusion, Gated):
        return {}
    was = model.training
    model.eval()
    _, _, _, g, p = infer_rows(model, data.feats, data.row_start, data.route)
    model.train(was)
    top = g.argmax(1)
    row = {"gate_entropy": float(-(p * np.log(np.clip(p, 1e-12, 1))).sum(1).mean())}
    for e, name in enumerate(data.experts):
        row[f"routed_{name}"] = float((top == e).mean())
    for c in np.unique(data.camids):
        sel = data.camids == c
        for e, name in enumerate(data.experts):
            row[f"routed_cam{int(c)}_{name}"] = float((top[sel] == e).mean())
    return row


@torch.inference_mode()
def recalibrate_bn(model: GateModel, data: TrainData) -> None:
    """Re-estimate the BN neck's statistics on inference-mode fused features of every training view.

    Training sees a dense softmax mixture (temperature 1.0); inference uses
    temperature 0.5 and, for the top-k fusions, a sparse mixture, so the fused
    features at inference follow another distribution than the one BN's
    running statistics were collected on. Without this, the retrieval feature
    of a gated teacher is dominated by a constant offset.
    """
    if model.necks is not None:  # a neck per expert: each sees its expert's inference-mode (dropout off) features
        model.eval()
        device = next(model.parameters()).device
        for a, bn, x in zip(model.adapters, model.necks, data.feats):
            f = torch.cat([a(torch.from_numpy(x[s: s + 4096]).to(device)) for s in range(0, len(x), 4096)]).double()
            _set_stats(bn, f)
        return
    fused = infer_rows(model, data.feats, np.arange(len(data.feats[0])), data.route)[0]
    _set_stats(model.bn, torch.from_numpy(fused).double())


def _set_stats(bn: torch.nn.BatchNorm1d, f: torch.Tensor) -> None:
    bn.running_mean.copy_(f.mean(0).float())
    bn.running_var.copy_(f.var(0, unbiased=True).float())


COLLAPSE = 0.99  # a gate that routes at least this share of the images to one expert has collapsed


def collapsed_onto(stats: dict) -> str | None:
    """The expert a gate sends at least ``COLLAPSE`` of the training images to, or None (no gate, or no collapse)."""
    if not stats.get("gated") or not stats.get("routed_share"):
        return None
    expert, share = max(stats["routed_share"].items(), key=lambda kv: kv[1])
    return expert if share >= COLLAPSE else None


def collapse_note(stats: dict) -> str | None:
    """One line warning of a collapsed gate, or None."""
    expert = collapsed_onto(stats)
    if expert is None:
        return None
    return (f"the gate sends {100 * stats['routed_share'][expert]:.1f}% of the training images to {expert}: it has "
            "collapsed onto one expert (docs/notes/gate-routing.md, 'Why the paper's gate collapses')")


def gate_statistics(model: GateModel, data: TrainData, rd: RunDir) -> dict:
    """Mean expert weight overall and per camera, share routed to each expert (view 0 of every training image)."""
    g = infer_rows(model, data.feats, data.row_start, data.route)[3]
    routes = isinstance(model.fusion, (Gated, Single))  # concat and average weigh experts equally: nothing is routed
    routed = np.bincount(g.argmax(1), minlength=g.shape[1]) / len(g) if routes else None
    stats = {
        "experts": data.experts,
        "mean_weight": dict(zip(data.experts, g.mean(0).round(6).tolist())),
        "routed_share": dict(zip(data.experts, routed.round(6).tolist())) if routed is not None else None,
        "per_camera": {str(int(c)): dict(zip(data.experts, g[data.camids == c].mean(0).round(6).tolist())) for c in np.unique(data.camids)},
        "images": int(len(g)),
        "mode": "inference (temperature 0.5, sparse top-k where the fusion is)",
        "gated": isinstance(model.fusion, Gated),
    }
    stats["collapsed_onto"] = collapsed_onto(stats)
    rd.write_json(GATE_STATS, stats)
    _histogram(g, data.experts, rd.artifact("gate_hist.png"))
    _heatmap(stats, rd.artifact("gate_heatmap.png"))
    _routing_curves(rd.log_rows(), data.experts, rd.artifact("gate_routing.png"))
    return stats


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heatmap(stats: dict, path: Path) -> None:
    """Mean gate weight per camera (rows) and expert (columns), at inference."""
    plt = _plt()
    cams = list(stats["per_camera"])
    m = np.array([[stats["per_camera"][c][e] for e in stats["experts"]] for c in cams])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(stats["experts"]), 1.2 + 0.45 * len(cams)), dpi=120)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(stats["experts"])), stats["experts"])
    ax.set_yticks(range(len(cams)), [f"camera {c}" for c in cams])
    for i in range(len(cams)):
        for j in range(len(stats["experts"])):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="white" if m[i, j] < 0.6 else "black")
    ax.set_title("mean gate weight per camera")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _routing_curves(rows: list[dict[str, str]], experts: list[str], path: Path) -> None:
    """Per epoch, the share of each camera's training images routed to the first expert (gated fusions only)."""
    cols = [k for k in (rows[0] if rows else {}) if k.startswith("routed_cam") and k.endswith(f"_{experts[0]}")]
    if not cols:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    epochs = [int(r["epoch"]) for r in rows]
    for c in cols:
        ax.plot(epochs, [float(r[c]) for r in rows], label=c[len("routed_"):-len(experts[0]) - 1])
    ax.set(xlabel="epoch", ylabel=f"share routed to {experts[0]}", ylim=(-0.05, 1.05), title="routing per camera during training")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _histogram(g: np.ndarray, experts: list[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for i, name in enumerate(experts):
        ax.hist(g[:, i], bins=20, range=(0, 1), alpha=0.6, label=name)
    ax.set(xlabel="gate weight", ylabel="training images", title="expert weights at inference")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
