"""``featcache train-gate``'s config: the only place its defaults live (torch-free, so the CLI starts fast)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping

from featcache.config import StageConfig, convert
from featcache.errors import ConfigError
from featcache.gate.routing import ROUTING_FIELDS, SINGLE_EXPERT, Routing, resolve_routing
from featcache.registry import nearest
from featcache.runtime import check_device_name
from featcache.training.options import check_training


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
    tensorboard: bool | None = None      # curves in RUN/tb as training goes; None: when the package is installed
    gate_recipe: str = "routed"          # paper: Eq. 7-9 exactly; routed: the default (docs/train-gate.md)
    routing: Routing | None = None       # the recipe's values with the remedies given on top (built by ``build``)
    # moe-oracle on rendered data: each camera condition's expert, "condition=expert" (night=align-mini, ...); the
    # cache records each view's condition (synthetic datasets); synthetic feature caches record the route itself
    oracle_route: tuple[str, ...] = ()

    @classmethod
    def keys(cls) -> list[str]:
        """The fields, with each remedy by its own name (an override of the recipe's value) in ``routing``'s place."""
        out = super().keys()
        i = out.index("routing")
        return out[:i] + list(ROUTING_FIELDS) + out[i + 1:]

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
        checked = cls(**merged, routing=Routing())  # every other field's checks first, as before routing was a field
        return dataclasses.replace(checked, routing=resolve_routing(checked.gate_recipe, checked.fusion, overrides))

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
        from featcache.gate.model import FUSIONS  # the registry lives with the fusions (torch)

        FUSIONS.get(self.fusion)
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


def check_experts(fusion: str, experts: tuple[str, ...] | list[str]) -> None:
    """Fusions that combine experts need at least two (a gate over one expert routes nothing)."""
    if len(experts) < 2 and fusion not in SINGLE_EXPERT:
        raise ConfigError(f"--fusion {fusion} combines experts and needs at least two; got {', '.join(experts) or 'none'} "
                          "(use --fusion clip or align for one expert alone)")
