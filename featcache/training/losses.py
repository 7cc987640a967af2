"""The task losses of every trained stage: ID cross-entropy and batch-hard triplet (Eq. 14-15)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def id_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 14: cross-entropy over the training identities (optionally label-smoothed)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def batch_hard_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float, others: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 15, Hermans et al.: for each anchor, its farthest positive and nearest negative (Euclidean).

    With ``others`` (the same images embedded another way, row for row), anchors come from ``feats`` and
    positives and negatives from ``others``: a cross-embedding triplet (the same image counts as a positive).
    """
    d = torch.cdist(feats, feats if others is None else others).clamp_min(1e-12)
    same = labels[:, None] == labels[None, :]
    hardest_pos = (d * same).max(1).values
    hardest_neg = d.masked_fill(same, float("inf")).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()
