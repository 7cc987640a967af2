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

from featcache.gate.routing import Routing
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
    probs: torch.Tensor | None = None  # (N, K) the gate's dense softmax (gated fusions), for entropy and statistics
    experts: list[torch.Tensor] | None = None  # the adapted features of each expert
    gate_logits: torch.Tensor | None = None     # (N, K) the gate's logits h(x), noise included (gated fusions)
    clean_logits: torch.Tensor | None = None    # (N, K) the logits before the noise (gated fusions)
    noise_std: torch.Tensor | None = None       # (N, K) the noise's scale (noisy gating in training), else None


class Fusion(nn.Module):
    """Combines the K adapted features; subclasses implement ``forward``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, feats: list[torch.Tensor], raw: list[torch.Tensor] | None = None,
                route: torch.Tensor | None = None) -> FusionOut:  # pragma: no cover - abstract
        raise NotImplementedError


FUSIONS: Registry[Callable[..., Fusion]] = Registry("fusion (--fusion)")
register_fusion = FUSIONS.register
fusion_names = FUSIONS.names


def make_fusion(name: str, dims: list[int], expert: int | None = None, routing: Routing | None = None) -> Fusion:
    cls = FUSIONS.get(name)
    if issubclass(cls, Single):
        return cls(len(dims), expert)
    if issubclass(cls, Gated):
        return cls(len(dims), dims, routing or Routing())
    return cls(len(dims))


@register_fusion("clip", "the open_clip expert alone")
class Single(Fusion):
    """One expert alone (the ``clip`` or ``align`` ablation rows)."""

    def __init__(self, k: int, expert: int | None) -> None:
        super().__init__(k)
        self.expert = int(expert or 0)

    def forward(self, feats, raw=None, route=None):
        g = feats[0].new_zeros(feats[0].shape[0], self.k)
        g[:, self.expert] = 1
        return FusionOut(feats[self.expert], g)


@register_fusion("align", "the ALIGN expert alone")
class SingleAlign(Single):
    """The ALIGN expert alone (the expert index is chosen from the families by the trainer)."""


@register_fusion("concat", "FC over the concatenated adapted features")
class Concat(Fusion):
    """FC(K*2048 -> 2048) on the concatenated adapted features."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.fc = nn.Linear(k * DIM, DIM)

    def forward(self, feats, raw=None, route=None):
        x = feats[0]
        return FusionOut(self.fc(torch.cat(feats, 1)), x.new_full((x.shape[0], self.k), 1.0 / self.k))


@register_fusion("average", "mean of the adapted features")
class Average(Fusion):
    def forward(self, feats, raw=None, route=None):
        x = feats[0]
        return FusionOut(torch.stack(feats, 1).mean(1), x.new_full((x.shape[0], self.k), 1.0 / self.k))


class Gated(Fusion):
    """Eq. 7-9: gate logits h(x), softmax(h / tau), top-``top_k`` sparse with renormalisation at inference.

    ``Routing`` adds the remedies measured in docs/notes/gate-routing.md: the gate's input (the adapted features, or
    the L2-normalised cached ones), stopping its gradient into the adapters, a zero-initialised last layer,
    training as it infers (straight-through or Gumbel top-k), an annealed temperature and learned noise
    (Shazeer et al. 2017). Its output carries what the balancing losses read (``featcache.gate.objective``).
    """

    top_k: int | None = None  # None: dense

    def __init__(self, k: int, dims: list[int], routing: Routing) -> None:
        super().__init__(k)
        self.routing = routing
        d_in = sum(dims) if routing.gate_input == "raw" else k * DIM
        self.gate = nn.Sequential(nn.Linear(d_in, 512), nn.ReLU(inplace=True), nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, k))
        if routing.gate_init == "zero":
            nn.init.zeros_(self.gate[-1].weight)
            nn.init.zeros_(self.gate[-1].bias)
        self.noise = nn.Linear(d_in, k) if routing.gate_noise > 0 else None
        # raw cached features differ in scale by backbone: standardise each dimension (running statistics, no
        # affine), so that what tells the images apart (their camera, say) reaches the gate at unit scale
        self.norm = nn.BatchNorm1d(d_in, affine=False) if routing.gate_input == "raw" else None
        self.tau_train = TAU_TRAIN  # the trainer lowers it when the recipe anneals
        self.averaging = False      # the trainer sets it during the warm-up epochs

    def freeze(self, frozen: bool) -> None:
        """Stop (or resume) the gate's learning: no gradient into its layers, its input statistics fixed."""
        for q in (*self.gate.parameters(), *(self.noise.parameters() if self.noise is not None else ())):
            q.requires_grad_(not frozen)
        if self.norm is not None and frozen:
            self.norm.eval()

    def gate_input(self, feats: list[torch.Tensor], raw: list[torch.Tensor] | None) -> torch.Tensor:
        if self.routing.gate_input == "raw":
            if raw is None:
                raise ValueError("this gate reads the cached features: pass raw")
            return self.norm(torch.cat(raw, 1))
        x = torch.cat(feats, 1)
        return x.detach() if self.routing.gate_detach else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(x)
        self._clean, self._std = h, None
        if self.noise is not None and self.training:  # noisy gating: noise only in training
            self._std = F.softplus(self.noise(x)) * self.routing.gate_noise
            h = h + torch.randn_like(h) * self._std
        return h

    def _top(self, p: torch.Tensor) -> torch.Tensor:
        k = self.top_k or self.k
        top = p.topk(k, dim=1)
        sparse = torch.zeros_like(p).scatter(1, top.indices, top.values)
        return sparse / sparse.sum(1, keepdim=True)

    def weights(self, feats: list[torch.Tensor], raw: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights used, dense softmax probabilities)."""
        h = self.logits(self.gate_input(feats, raw))
        self._last_logits = h
        tau = self.tau_train if self.training else TAU_TEST
        p = torch.softmax(h / tau, dim=1)
        sparse_model = self.top_k is not None and self.top_k < self.k
        if not self.training:
            return (self._top(p) if sparse_model else p), p
        if self.averaging:  # warm-up: every expert trains on every image, so the gate's targets mean something
            return torch.full_like(p, 1.0 / self.k), p
        mode = self.routing.train_routing if sparse_model else "dense"
        if mode == "straight-through":  # forward: the sparse weights inference uses; backward: the softmax's gradient
            # hard + (p - p.detach()), not hard + p - p.detach(): (1 + p) - p rounds to 0.99999994 for about a
            # quarter of float32 p in [0.5, 1), so the forward would not be exactly the weights inference uses
            return self._top(p).detach() + (p - p.detach()), p
        if mode == "gumbel":
            y = torch.softmax((h + _gumbel(h)) / tau, dim=1)
            return self._top(y).detach() + (y - y.detach()), p
        return p, p

    def forward(self, feats, raw=None, route=None):
        g, p = self.weights(feats, raw)
        fused = (torch.stack(feats, 1) * g.unsqueeze(-1)).sum(1)
        return FusionOut(fused, g, p, gate_logits=self._last_logits, clean_logits=self._clean, noise_std=self._std)


def _gumbel(h: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(h).clamp(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


@register_fusion("moe-top1", "the paper's gate: top-1 expert at inference")
class MoETop1(Gated):
    top_k = 1


@register_fusion("moe-soft", "dense gate mixture")
class MoESoft(Gated):
    top_k = None


@register_fusion("moe-top2", "top-2 experts with load balancing")
class MoETop2(Gated):
    top_k = 2


@register_fusion("moe-oracle", "routes each image to the expert known to be reliable for it (synthetic caches; the ceiling of top-1)")
class MoEOracle(Fusion):
    """Not a gate: the routing comes with the data (``synthetic/route`` in synthetic caches)."""

    def forward(self, feats, raw=None, route=None):
        if route is None:
            raise ValueError("moe-oracle needs the known route of every image")
        g = F.one_hot(route.long(), self.k).to(feats[0].dtype)
        return FusionOut((torch.stack(feats, 1) * g.unsqueeze(-1)).sum(1), g)


def _neck() -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(DIM)
    bn.bias.requires_grad_(False)  # BNNeck (Luo et al. 2019): no shift to learn before the bias-free classifier
    return bn


class GateModel(nn.Module):
    """Adapters + fusion + BN neck + ID classifier.

    With ``routing.expert_neck`` each expert has a BN neck of its own and the retrieval feature is the fusion's
    weighted mix of the experts' BN'd features (for top-1 routing: the routed expert's BN'd feature), so that
    images routed to different experts compare at one centre and scale; the fused feature F_t stays the mix of
    the adapted features, and the shared ``bn`` then goes unused.
    """

    def __init__(self, families: list[str], dims: list[int], fusion: str, n_classes: int, single_expert: int | None = None,
                 routing: Routing | None = None) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapter(f, d) for f, d in zip(families, dims))
        self.fusion = make_fusion(fusion, dims, single_expert, routing)
        self.bn = _neck()
        self.necks = nn.ModuleList(_neck() for _ in dims) if routing is not None and routing.expert_neck else None
        self.classifier = nn.Linear(DIM, n_classes, bias=False)
        self.id_span = routing is not None and routing.retrieval == "id-span"

    def forward(self, xs: list[torch.Tensor], route: torch.Tensor | None = None) -> tuple[FusionOut, torch.Tensor, torch.Tensor]:
        """(fusion output, BN feature used for retrieval, ID logits); ``route`` only for moe-oracle."""
        feats = [a(x) for a, x in zip(self.adapters, xs)]
        out = self.fusion(feats, xs, route)
        out.experts = feats
        if self.necks is None:
            neck = self.bn(out.feature)
        else:
            neck = (torch.stack([n(f) for n, f in zip(self.necks, feats)], 1) * out.gates.unsqueeze(-1)).sum(1)
        logits = self.classifier(neck)
        if self.id_span and not self.training:  # the same logits: W P = W
            neck = self.project_id_span(neck)
        return out, neck, logits

    def project_id_span(self, x: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of retrieval features onto the span of the ID classifier's weights W (C x D):
        x W^T (W W^T)^-1 W. The shared classifier ties every expert's feature of a training identity to one place
        in this span; outside it each expert's feature is free, and for unseen identities the experts differ there."""
        w = self.classifier.weight.double()
        gram = w @ w.T
        gram = gram + 1e-6 * gram.diagonal().mean() * torch.eye(len(w), dtype=w.dtype, device=w.device)
        coef = torch.linalg.solve(gram, (x.double() @ w.T).T).T
        return (coef @ w).to(x.dtype)

    def expert_necked(self, feats: list[torch.Tensor], constant_stats: bool = False) -> list[torch.Tensor]:
        """Each expert's feature alone through its neck (its own, or the shared one), with batch statistics and
        without touching the running statistics: what each expert would give for retrieval. ``constant_stats``
        treats the batch statistics as constants, so that a row's output has no gradient into other rows."""
        bns = self.necks if self.necks is not None else [self.bn] * len(feats)
        if not constant_stats:
            return [F.batch_norm(f, None, None, bn.weight, bn.bias, training=True) for bn, f in zip(bns, feats)]
        out = []
        for bn, f in zip(bns, feats):
            mean, var = f.detach().mean(0), f.detach().var(0, unbiased=False)
            out.append((f - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias)
        return out

    def expert_id_losses(self, feats: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(N, K) per-image ID loss of each expert's feature alone, through its neck and the shared classifier."""
        return torch.stack([F.cross_entropy(self.classifier(z), labels, reduction="none") for z in self.expert_necked(feats)], 1)
