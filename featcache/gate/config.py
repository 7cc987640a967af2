"""``featcache train-gate``'s config: the only place its defaults live (torch-free, so the CLI starts fast)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping

from featcache.config import StageConfig, convert
from featcache.errors import ConfigError, check_choice
from featcache.registry import nearest
from featcache.runtime import check_device_name
from featcache.training.options import check_training


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
    from featcache.gate.model import FUSIONS  # the registry lives with the fusions (torch)

    FUSIONS.get(fusion)
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


@dataclasses.dataclass(frozen=True)
class GateConfig(StageConfig):
    """``featcache train-gate``: the teacher's adapters and gate (paper §3.1, §3.3).

    ``routing`` is built once, by ``build``, from ``gate_recipe`` and the remedies given: as keys of their own
    (``--set balance=0.02``, a pipeline's ``balance: 0.02``) or as a ``routing:`` map, the form a run's
    config.yaml saves. Build a config with ``GateConfig.from_dict`` or ``build``, which resolve it."""

    command = "train-gate"
    legacy = {"val_ids": 0, "allow_partial": False, "oracle_route": []}  # fields added since: how older runs trained

    cache: Path
    out: Path
    experts: tuple[str, ...] = ()        # empty: every backbone in the cache
    fusion: str = "moe-top1"
    epochs: int = 60
    seed: int = 42
    device: str = "auto"
    batch_size: int = 32                 # P x K with K = instances
    instances: int = 4
    lr: float = 3e-4
    lr_min: float = 3e-6
    weight_decay: float = 5e-4
    beta: float = 0.5                    # weight of the triplet loss
    margin: float = 0.3
    label_smoothing: float = 0.0
    val_ids: int = 0                     # training identities held out for validation (featcache.training.validation)
    allow_partial: bool = False          # train on a cache whose extraction has not finished (recorded in run.json)
    gate_recipe: str = "routed"          # paper: Eq. 7-9 exactly; routed: the default (docs/train-gate.md)
    routing: Routing | None = None       # the recipe's values with the remedies given on top (built by ``build``)
    # moe-oracle on rendered data: each camera condition's expert, "condition=expert" (night=align-mini, ...); the
    # cache records each view's condition (synthetic datasets); synthetic feature caches record the route itself
    oracle_route: tuple[str, ...] = ()

    @classmethod
    def keys(cls) -> list[str]:
        """The fields, and each remedy by its own name (an override of the recipe's value)."""
        return super().keys() + list(ROUTING_FIELDS)

    @classmethod
    def build(cls, *layers: tuple[str, Mapping[str, Any]]) -> "GateConfig":
        """The config from layers of values; the remedies, flat or under ``routing:``, override the recipe's."""
        overrides: dict[str, Any] = {}
        rest = []
        for source, values in layers:
            values = dict(values)
            for key, value in _remedies(values, source).items():
                overrides[key] = _convert_remedy(key, value, source)
            rest.append((source, values))
        merged = cls.merge(*rest)
        merged["routing"] = resolve_routing(merged.get("gate_recipe", "routed"), merged.get("fusion", "moe-top1"), overrides)
        return cls(**merged)

    @classmethod
    def upgrade(cls, saved: Mapping[str, Any]) -> dict[str, Any]:
        """A saved config in today's form: runs saved before recipes existed trained with Eq. 7-9; a resolved config
        of the flat form lacking a remedy trained without it; the remedies go under ``routing:``."""
        out = super().upgrade(saved)
        out.setdefault("gate_recipe", "paper")
        if "gate_input" in out:
            for k in ROUTING_FIELDS:
                out.setdefault(k, getattr(Routing(), k))
        flat = {k: out.pop(k) for k in ROUTING_FIELDS if k in out}
        if flat:
            out["routing"] = {**flat, **(out.get("routing") or {})}
        return out

    def __post_init__(self) -> None:
        if not isinstance(self.routing, Routing):
            raise ConfigError("GateConfig: build it with GateConfig.from_dict or GateConfig.build, which resolve "
                              "its routing from gate_recipe")
        check_device_name(self.device)
        check_training(self.epochs, self.batch_size, self.instances, self.lr, self.lr_min)
        if self.weight_decay < 0 or self.beta < 0 or self.margin < 0:
            raise ConfigError("weight_decay, beta and margin must not be negative")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing {self.label_smoothing}: expected 0 <= value < 1")
        if self.val_ids < 0:
            raise ConfigError(f"--set val_ids={self.val_ids}: expected 0 or more training identities to hold out")
        if len(set(self.experts)) != len(self.experts):
            raise ConfigError(f"--experts names an expert twice: {','.join(self.experts)}")
        if self.experts:
            check_experts(self.fusion, self.experts)
        if self.oracle_route and self.fusion != "moe-oracle":
            raise ConfigError(f"--set oracle_route={','.join(self.oracle_route)}: only --fusion moe-oracle routes by it")
        self.oracle_by_condition()  # checked now

    def oracle_by_condition(self) -> dict[str, str] | None:
        """``oracle_route`` as {condition: expert}, or None."""
        from featcache.datasets.base import CONDITIONS

        out = {}
        for pair in self.oracle_route:
            cond, _, expert = str(pair).partition("=")
            if cond not in CONDITIONS or not expert:
                raise ConfigError(f"--set oracle_route: {pair!r}: expected CONDITION=EXPERT with a condition of "
                                  f"{', '.join(CONDITIONS)}")
            out[cond] = expert
        return out or None


def _remedies(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Take the remedies out of one layer of values: the flat keys, then a ``routing:`` map (or a ``Routing``)."""
    nested = values.pop("routing", None)
    if isinstance(nested, Routing):
        nested = dataclasses.asdict(nested)
    if nested is not None and not isinstance(nested, Mapping):
        raise ConfigError(f"{source}: routing: expected a mapping of remedies ({', '.join(ROUTING_FIELDS)}), got {nested!r}")
    out = {k: values.pop(k) for k in ROUTING_FIELDS if k in values}
    for key, value in (nested or {}).items():
        if key not in ROUTING_FIELDS:
            raise ConfigError(f"{source}: routing: unknown key {key!r}{nearest(key, ROUTING_FIELDS)}; "
                              f"valid keys: {', '.join(ROUTING_FIELDS)}")
        out[key] = value
    return out


def _convert_remedy(key: str, value: Any, source: str) -> Any:
    """One remedy's value as its field's type; None keeps the recipe's value."""
    if value is None or isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    field = next(f for f in dataclasses.fields(Routing) if f.name == key)
    return convert(value, typing.get_type_hints(Routing)[key], field, f"{source}: {key}")


#: fusions that use one expert alone, and the family of that expert
SINGLE_EXPERT = {"clip": "open_clip", "align": "align"}


def check_experts(fusion: str, experts: tuple[str, ...] | list[str]) -> None:
    """Fusions that combine experts need at least two (a gate over one expert routes nothing)."""
    if len(experts) < 2 and fusion not in SINGLE_EXPERT:
        raise ConfigError(f"--fusion {fusion} combines experts and needs at least two; got {', '.join(experts) or 'none'} "
                          "(use --fusion clip or align for one expert alone)")
