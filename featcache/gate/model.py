"""Expert adapters (Eq. 6), fusions (the paper's Table 5 ablation and beyond) and the ID head.

Adapters map each cached pooled feature to a common 2048-d space: open_clip
experts get FC(d->1024)+ReLU+Dropout(0.2)+FC(1024->2048), ALIGN experts
FC(d->2048), d being the width the cache holds. The gate (Eq. 7) is
FC(K*2048->512)+ReLU+FC(512->256)+ReLU+FC(256->K); its weights (Eq. 8) are a
softmax at temperature 1.0 in training and 0.5 at inference, made sparse at
inference for the top-k fusions with renormalisation (Eq. 9). The fused
feature goes through BN to a bias-free linear ID classifier (the logits z_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from featcache.registry import Registry

DIM = 2048
TAU_TRAIN, TAU_TEST = 1.0, 0.5


def adapter(family: str, d_in: int) -> nn.Module:
    if family == "open_clip":
        return nn.Sequential(nn.Linear(d_in, 1024), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(1024, DIM))
    return nn.Linear(d_in, DIM)


@dataclass
class FusionOut:
    feature: torch.Tensor          # (N, 2048) fused, before BN: the teacher's F_t
    gates: torch.Tensor            # (N, K) expert weights used (one-hot or averaging for non-gated fusions)
    aux_loss: torch.Tensor         # load-balancing loss (0 unless moe-top2)


class Fusion(nn.Module):
    """Combines the K adapted features; subclasses implement ``combine``."""

    experts_needed: int | None = None  # None: all experts

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, feats: list[torch.Tensor]) -> FusionOut:  # pragma: no cover - abstract
        raise NotImplementedError


FUSIONS: Registry[Callable[..., Fusion]] = Registry("fusion (--fusion)")
register_fusion = FUSIONS.register
fusion_names = FUSIONS.names


def make_fusion(name: str, k: int, expert: int | None = None) -> Fusion:
    cls = FUSIONS.get(name)
    return cls(k, expert) if issubclass(cls, Single) else cls(k)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


@register_fusion("clip", "the open_clip expert alone")
class Single(Fusion):
    """One expert alone (the ``clip`` or ``align`` ablation rows)."""

    def __init__(self, k: int, expert: int | None) -> None:
        super().__init__(k)
        self.expert = int(expert or 0)

    def forward(self, feats):
        g = feats[0].new_zeros(feats[0].shape[0], self.k)
        g[:, self.expert] = 1
        return FusionOut(feats[self.expert], g, _zero(feats[0]))


@register_fusion("align", "the ALIGN expert alone")
class SingleAlign(Single):
    """The ALIGN expert alone (the expert index is chosen from the families by the trainer)."""


@register_fusion("concat", "FC over the concatenated adapted features")
class Concat(Fusion):
    """FC(K*2048 -> 2048) on the concatenated adapted features."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.fc = nn.Linear(k * DIM, DIM)

    def forward(self, feats):
        x = feats[0]
        return FusionOut(self.fc(torch.cat(feats, 1)), x.new_full((x.shape[0], self.k), 1.0 / self.k), _zero(x))


@register_fusion("average", "mean of the adapted features")
class Average(Fusion):
    def forward(self, feats):
        x = feats[0]
        return FusionOut(torch.stack(feats, 1).mean(1), x.new_full((x.shape[0], self.k), 1.0 / self.k), _zero(x))


class Gated(Fusion):
    """Eq. 7-9: gate logits h(x), softmax(h / tau), top-``top_k`` sparse with renormalisation at inference."""

    top_k: int | None = None  # None: dense
    balance: float = 0.0

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.gate = nn.Sequential(nn.Linear(k * DIM, 512), nn.ReLU(inplace=True), nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, k))

    def weights(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights used, dense softmax probabilities)."""
        tau = TAU_TRAIN if self.training else TAU_TEST
        p = torch.softmax(self.gate(torch.cat(feats, 1)) / tau, dim=1)
        if self.training or self.top_k is None or self.top_k >= self.k:
            return p, p
        top = p.topk(self.top_k, dim=1)
        sparse = torch.zeros_like(p).scatter(1, top.indices, top.values)
        return sparse / sparse.sum(1, keepdim=True), p

    def forward(self, feats):
        g, p = self.weights(feats)
        fused = (torch.stack(feats, 1) * g.unsqueeze(-1)).sum(1)
        aux = _zero(fused)
        if self.balance and self.training:
            # Switch-style load balancing: K * sum_i (share routed to i) * (mean probability of i)
            share = F.one_hot(p.argmax(1), self.k).float().mean(0)
            aux = self.balance * self.k * (share * p.mean(0)).sum()
        return FusionOut(fused, g, aux)


@register_fusion("moe-top1", "the paper's gate: top-1 expert at inference")
class MoETop1(Gated):
    top_k = 1


@register_fusion("moe-soft", "dense gate mixture")
class MoESoft(Gated):
    top_k = None


@register_fusion("moe-top2", "top-2 experts with load balancing")
class MoETop2(Gated):
    top_k = 2
    balance = 0.01


class GateModel(nn.Module):
    """Adapters + fusion + BN neck + ID classifier."""

    def __init__(self, families: list[str], dims: list[int], fusion: str, n_classes: int, single_expert: int | None = None) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapter(f, d) for f, d in zip(families, dims))
        self.fusion = make_fusion(fusion, len(dims), single_expert)
        self.bn = nn.BatchNorm1d(DIM)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(DIM, n_classes, bias=False)

    def forward(self, xs: list[torch.Tensor]) -> tuple[FusionOut, torch.Tensor, torch.Tensor]:
        """(fusion output, BN feature used for retrieval, ID logits)."""
        feats = [a(x) for a, x in zip(self.adapters, xs)]
        out = self.fusion(feats)
        neck = self.bn(out.feature)
        return out, neck, self.classifier(neck)
