"""train-gate's objective: the losses of a step beside the ID and triplet terms (Eq. 6-9 and the routing recipe).

The balancing losses read what a gated fusion's output carries (its dense probabilities, clean and noisy
logits, noise scale); the expert losses train each expert's adapted feature alone and put every expert's
feature in one space; the routing loss teaches the gate each image's best expert. docs/notes/gate-routing.md
measures each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featcache.gate.routing import Routing
from featcache.gate.model import FusionOut, GateModel, Gated
from featcache.gate.route_targets import NO_TARGET
from featcache.training.losses import batch_hard_triplet


def balance_losses(model: GateModel, fo: FusionOut, routing: Routing) -> torch.Tensor:
    """The Switch, importance and load balancing losses of a gated fusion in training; 0 otherwise."""
    aux = fo.feature.new_zeros(())
    fusion = model.fusion
    if not (isinstance(fusion, Gated) and fusion.training):
        return aux
    p, k = fo.probs, fusion.k
    if routing.balance:
        # Switch Transformer: K * sum_i (share routed to i) * (mean probability of i); 1 when perfectly balanced
        share = F.one_hot(p.argmax(1), k).float().mean(0)
        aux = aux + routing.balance * k * (share * p.mean(0)).sum()
    if routing.importance:
        # Shazeer et al.: squared coefficient of variation of each expert's summed weight; 0 when equal
        aux = aux + routing.importance * cv_squared(p.sum(0))
    if routing.load and fo.noise_std is not None:
        load = smooth_load(fo.clean_logits, fo.gate_logits, fo.noise_std, fusion.top_k or k)
        aux = aux + routing.load * cv_squared(load.sum(0))
    return aux


def expert_losses(model: GateModel, experts: list[torch.Tensor], y: torch.Tensor, routing: Routing,
                  margin: float) -> torch.Tensor:
    """Each expert's feature standing alone (its own triplet), the experts agreeing on an image, and the
    alignment losses: what gives the gate real choices and lets routed images compare."""
    loss = experts[0].new_zeros(())
    if routing.expert_loss:
        loss = routing.expert_loss * torch.stack([batch_hard_triplet(e, y, margin) for e in experts]).mean()
    if routing.agreement:
        loss = loss + routing.agreement * agreement_loss(experts)
    return loss + alignment_losses(model, experts, y, routing, margin)


def route_loss(gate_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the gate against each image's best expert, over the images that have one; 0 when none in
    the batch has (a plain mean would be 0/0). Chosen on the device: no wait for it to say whether any has one."""
    ce = F.cross_entropy(gate_logits, target, ignore_index=NO_TARGET)  # NaN when every target is NO_TARGET
    return torch.where((target != NO_TARGET).any(), ce, ce.new_zeros(()))  # its gradient is 0 then, not NaN


def alignment_losses(model: GateModel, experts: list[torch.Tensor], y: torch.Tensor, routing: Routing, margin: float) -> torch.Tensor:
    """What puts every expert's retrieval feature in one space (docs/notes/gate-routing.md): each expert's own ID loss
    through the shared classifier, and a cross-expert triplet on BN'd, L2-normalised features, anchors embedded
    by one expert and positives and negatives by another, optionally moving only each image's unreliable expert."""
    loss = experts[0].new_zeros(())
    if not (routing.expert_id or routing.cross_expert):
        return loss
    necked = model.expert_necked(experts)
    own = torch.stack([F.cross_entropy(model.classifier(z), y, reduction="none") for z in necked], 1)  # (N, K)
    if routing.expert_id:
        loss = loss + routing.expert_id * own.mean()
    if routing.cross_expert and len(experts) > 1:
        unit = [F.normalize(z, dim=1) for z in necked]
        if routing.cross_detach:  # the image's reliable expert is the target, not the one that moves
            reliable = own.detach().argmin(1)
            unit = [F.normalize(z, dim=1) for z in model.expert_necked(experts, constant_stats=True)]  # no leak through BN
            unit = [torch.where((reliable == e)[:, None], u.detach(), u) for e, u in enumerate(unit)]
        pairs = [batch_hard_triplet(unit[a], y, margin, others=unit[b]) for a in range(len(unit)) for b in range(len(unit)) if a != b]
        loss = loss + routing.cross_expert * torch.stack(pairs).mean()
    return loss


def agreement_loss(experts: list[torch.Tensor]) -> torch.Tensor:
    """Mean of 1 - cosine between the adapted features that every pair of experts gives the same image: 0 when
    the experts agree, so that a query and a gallery image routed to different experts compare in one space."""
    unit = [F.normalize(e, dim=1) for e in experts]
    pairs = [(a * b).sum(1) for j, a in enumerate(unit) for b in unit[j + 1:]]
    return (1 - torch.stack(pairs)).mean() if pairs else experts[0].new_zeros(())


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of a vector: 0 when its entries are equal."""
    return x.var(unbiased=False) / x.mean().pow(2).clamp_min(1e-12)


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al. (2017, Appendix A): per image and expert, the probability that expert i stays in the top k
    when only its own noise is drawn again, P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / std_i).

    The k-th largest noisy logit among the others is the (k+1)-th largest overall when i is in the top k, and the
    k-th largest otherwise. Differentiable in the clean logits and the noise scale, unlike the routed count.
    """
    n_experts = noisy.shape[1]
    if k >= n_experts:
        return torch.ones_like(clean)
    top = noisy.topk(k + 1, dim=1).values
    in_top = noisy >= top[:, k - 1:k]
    threshold = torch.where(in_top, top[:, k:k + 1], top[:, k - 1:k])
    # no argument validation: it reads the arguments back to the host (three waits for a GPU a step)
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()), validate_args=False)
    return normal.cdf((clean - threshold) / std.clamp_min(1e-9))
