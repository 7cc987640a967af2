"""How a gated fusion is trained to route: the ``Routing`` recipe's parts, the named recipes, and the one
function that resolves a run's routing from a recipe, its fusion and the remedies given (torch-free)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from featcache.errors import ConfigError, check_choice

#: fusions that use one expert alone, and the family of that expert
SINGLE_EXPERT = {"clip": "open_clip", "align": "align"}


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a gated fusion is trained to route (docs/notes/gate-routing.md measures each remedy)."""

    gate_input: str = "adapted"        # adapted: the adapted 2048-d features (Eq. 7); raw: the L2-normalised cached features
    gate_detach: bool = False          # stop the gate's gradient into the adapters
    gate_init: str = "default"         # default: PyTorch's; zero: last layer zero, every expert equally likely at the start
    train_routing: str = "dense"       # dense softmax (Eq. 8); straight-through or gumbel top-k: train as it infers
    tau_anneal: bool = False           # training temperature from 1.0 down to the inference 0.5 over the epochs
    gate_noise: float = 0.0            # noisy top-k gating (Shazeer et al. 2017): learned noise scale, training only
    balance: float = 0.0               # Switch-style load-balancing loss weight
    importance: float = 0.0            # Shazeer's importance loss weight (CV^2 of the experts' summed weights)
    load: float = 0.0                  # Shazeer's load loss weight (CV^2 of each expert's smooth routed count; needs gate_noise)
    expert_loss: float = 0.0           # weight of a triplet loss on each expert's adapted feature alone
    agreement: float = 0.0             # weight of a loss pulling the experts' adapted features of one image together
                                       # (1 - cosine), so that images routed to different experts compare in one space
    expert_id: float = 0.0             # weight of each expert's own ID loss (its feature alone through its neck and the
                                       # shared classifier), so that every expert maps an identity to one place
    expert_neck: bool = False          # a BN neck per expert: the retrieval feature is the gated mix of each expert's
                                       # BN'd feature, so routed images compare at one scale and centre
    cross_expert: float = 0.0          # weight of a cross-expert triplet on BN'd, L2-normalised features (anchor
                                       # embedded by one expert, positives and negatives by another)
    cross_detach: bool = False         # stop the cross-expert loss's gradient into each image's reliable expert (the
                                       # one whose feature alone gives the lowest ID loss): the other moves to it
    retrieval: str = "neck"            # neck: the BN-neck feature (BNNeck); id-span: the BN-neck feature projected onto the
                                       # span of the shared ID classifier's weights, where that classifier ties every
                                       # expert's feature of an identity to one place (docs/notes/gate-routing.md)
    warmup: float = 0.0                # share of the epochs in which the experts are averaged (the gate still learns)
    gate_freeze: bool = False          # the gate learns during the warm-up only, then keeps its routing: its targets are
                                       # fair only while the experts train alike (docs/notes/gate-routing.md)
    route_by_loss: float = 0.0         # weight of a routing loss: the gate learns to pick, per image, the expert whose
                                       # feature alone gives the lowest ID loss (hard EM, as mixtures of experts are fitted)
    route_target: str = "loss"         # what that routing loss's target is: loss (the lowest ID loss, each step) or
                                       # retrieval (the best leave-one-out AP of the cached feature, once; gate/route_targets.py)


ROUTING_FIELDS = tuple(f.name for f in dataclasses.fields(Routing))
#: the fields that train the experts' adapters rather than a gate: they apply to every fusion, so that a routed
#: teacher and the fixed fusions it is compared with are trained with the same losses
EXPERT_FIELDS = ("expert_loss", "agreement", "expert_id", "expert_neck", "cross_expert", "cross_detach", "retrieval")
RETRIEVALS = ("neck", "id-span")
ROUTE_TARGETS = ("loss", "retrieval")
#: recipes: "paper" is the paper's Eq. 7-9 exactly; "routed" is the default that routes (docs/train-gate.md)
RECIPES = {
    "paper": Routing(),
    "routed": Routing(gate_input="raw", gate_detach=True, gate_init="zero", train_routing="straight-through",
                      balance=0.01, expert_loss=0.5, warmup=0.5, route_by_loss=1.0, gate_freeze=True, retrieval="id-span"),
}
ROUTINGS = ("dense", "straight-through", "gumbel")
GATED = ("moe-top1", "moe-soft", "moe-top2")  # the fusions with a gate


def resolve_routing(recipe: str, fusion: str, overrides: Mapping[str, Any]) -> Routing:
    """The routing a run trains with: ``recipe``'s values for ``fusion``, with ``overrides`` (the remedies given,
    by name; None keeps the recipe's) on top, checked against the fusion. Built once, when the config is."""
    check_choice(recipe, RECIPES, "--gate-recipe")
    gated = fusion in GATED
    base = RECIPES[recipe]
    if not gated:  # no gate: nothing to route, but the experts train as the recipe trains them
        base = Routing(**{k: getattr(base, k) for k in EXPERT_FIELDS})
    if fusion == "moe-soft":
        base = dataclasses.replace(base, train_routing="dense")  # a dense mixture trains densely
    if fusion == "concat":  # one learned map over the concatenation: no BN'd experts to mix, nothing to align
        base = dataclasses.replace(base, expert_neck=False, retrieval="neck")
    if fusion in SINGLE_EXPERT:  # one expert alone: nothing to align (id-span costs it 4-25 mAP on validation)
        base = Routing()
    if fusion == "moe-top2" and recipe == "paper":
        base = dataclasses.replace(base, balance=0.01)  # the top-2 fusion has always carried the Switch loss
    explicit = {k: v for k, v in overrides.items() if v is not None}
    r = dataclasses.replace(base, **explicit)
    _check_routing(r, fusion, set(explicit))
    return r


def _check_routing(r: Routing, fusion: str, explicit: set[str]) -> None:
    """Refuse a routing that cannot apply: out-of-range values, and remedies the fusion has no use for."""
    check_choice(r.gate_input, ("adapted", "raw"), "--set gate_input", what=f"gate_input {r.gate_input!r}")
    check_choice(r.gate_init, ("default", "zero"), "--set gate_init", what=f"gate_init {r.gate_init!r}")
    check_choice(r.route_target, ROUTE_TARGETS, "--set route_target", what=f"--set route_target={r.route_target}")
    check_choice(r.retrieval, RETRIEVALS, "--set retrieval", what=f"--set retrieval={r.retrieval}")
    check_choice(r.train_routing, ROUTINGS, "train_routing")
    if not 0 <= r.warmup < 1:
        raise ConfigError(f"--set warmup={r.warmup}: expected a share of the epochs, 0 <= warmup < 1")
    for k in ("gate_noise", "balance", "importance", "load", "expert_loss", "agreement", "expert_id", "cross_expert",
              "route_by_loss"):
        if getattr(r, k) < 0:
            raise ConfigError(f"--set {k}={getattr(r, k)}: expected 0 or more")
    set_for_gate = [k for k in sorted(explicit) if getattr(r, k) != getattr(Routing(), k) and k not in EXPERT_FIELDS]
    if r.expert_neck and fusion == "concat":
        raise ConfigError("--set expert_neck=true mixes each expert's BN'd feature by the fusion's weights; --fusion concat "
                          "is not a weighted mix of experts")
    if fusion not in GATED and set_for_gate:  # what trains the experts applies to every fusion; the rest needs a gate
        raise ConfigError(f"--fusion {fusion} has no gate, so {', '.join(set_for_gate)} cannot apply "
                          "(they tune a gated fusion: moe-top1, moe-top2, moe-soft)")
    if r.gate_freeze and not r.warmup:
        raise ConfigError("--set gate_freeze=true keeps the routing learned during the warm-up, so it needs --set warmup above 0")
    if r.load and not r.gate_noise:
        raise ConfigError(f"--set load={r.load} estimates how the noise moves each expert's load, so it needs "
                          "--set gate_noise above 0 (Shazeer et al. 2017, Appendix A)")
    if r.load and fusion == "moe-soft":
        raise ConfigError("--set load balances top-k routing; --fusion moe-soft sends every image to every expert")
    if fusion == "moe-soft" and r.train_routing != "dense" and "train_routing" in explicit:
        raise ConfigError(f"train_routing {r.train_routing} picks top-k experts; --fusion moe-soft mixes all of them densely")
