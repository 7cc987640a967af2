"""Query and gallery features for ``--model KIND:REF``: a registry of feature sources.

Evaluation defines the kinds that read cached backbone features
(``backbone:PRESET``, ``concat:PRESET,PRESET``); each training stage
registers its own kind from its own package (``featcache.gate.features``
registers ``gate``). The command line imports those modules, and library
users get them through the ``featcache.model_kinds`` entry points (setup.cfg),
loaded on the first unknown name. Evaluation knows no stage by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from featcache.cache import CacheSplit
from featcache.errors import ConfigError
from featcache.evaluation.search import DEFAULT_BUDGET, l2_normalize
from featcache.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureContext:
    """How features are computed: the device, whether to average the flipped view, and the memory budget."""

    device: str = "auto"
    flip: bool = False
    budget: int = DEFAULT_BUDGET  # bytes for one block of intermediate work

    def rows_per_block(self, bytes_per_row: int) -> int:
        return max(1, self.budget // max(1, bytes_per_row))


class FeatureSource(Protocol):
    """What a model kind provides: features of a split, the backbones it reads, a description for the report."""

    def features(self, split: CacheSplit, ctx: FeatureContext) -> np.ndarray: ...

    def backbones(self) -> list[str]: ...

    def describe(self) -> dict: ...


KINDS: Registry[Callable[[str], FeatureSource]] = Registry("--model kind", entry_points="featcache.model_kinds")


@dataclass
class RunFeatures:
    """A model kind backed by a trained run (``gate:``, ``student:``), loaded on first use: query and gallery share
    one load. Subclasses say how a run is loaded (``load``) and what it computes (``features``)."""

    run: Path
    _loaded: Any = field(default=None, init=False, repr=False)

    def load(self, device: str) -> Any:
        raise NotImplementedError

    def _load(self, device) -> Any:
        if self._loaded is None:
            self._loaded = self.load(str(device))
        return self._loaded


#: loaders of trained runs by the command that made them (``distill``, ``train-gate``), for ``featcache.load_model``:
#: ``fn(run, device) -> Embedder`` (``evaluation.embedder``); registered beside each stage's kind, and loaded with them
RUN_MODELS: Registry[Callable[[Path, str], Any]] = Registry("trained run of", entry_points="featcache.model_kinds")


def register_run_model(command: str, help: str) -> Callable:
    """Register ``fn(run, device) -> Embedder`` for the runs ``featcache <command>`` makes."""
    return RUN_MODELS.register(command, help)


def register_kind(name: str, help: str) -> Callable:
    """Register a ``--model`` kind: ``fn(ref) -> FeatureSource``, with a line of help for ``eval --help``."""
    return KINDS.register(name, help)


def known_kinds() -> list[str]:
    return sorted(KINDS.names())


def kinds_help() -> str:
    return "; ".join(f"{name}:{KINDS.help(name)}" for name in KINDS.names())


def parse_model(spec: str) -> FeatureSource:
    kind, sep, ref = spec.partition(":")
    if not sep or not ref:
        raise ConfigError(f"--model {spec!r}: expected KIND:REF, with KIND one of {', '.join(known_kinds())}")
    return KINDS.get(kind)(ref)


def pooled(split: CacheSplit, backbone: str, flip: bool) -> np.ndarray:
    """A backbone's pooled feature; with ``flip``, the mean of the clean and flipped views."""
    x = split.read(backbone, "pooled", 0).astype(np.float32)
    if flip:
        x = (x + split.read(backbone, "pooled", 1)) / 2
    return x


@dataclass
class BackboneFeatures:
    preset: str

    def features(self, split: CacheSplit, ctx: FeatureContext) -> np.ndarray:
        return l2_normalize(pooled(split, self.preset, ctx.flip))

    def backbones(self) -> list[str]:
        return [self.preset]

    def describe(self) -> dict:
        return {"kind": "backbone", "preset": self.preset, "array": "pooled"}


@dataclass
class ConcatFeatures:
    presets: tuple[str, ...]

    def features(self, split: CacheSplit, ctx: FeatureContext) -> np.ndarray:
        return l2_normalize(np.concatenate([l2_normalize(pooled(split, p, ctx.flip)) for p in self.presets], axis=1))

    def backbones(self) -> list[str]:
        return list(self.presets)

    def describe(self) -> dict:
        return {"kind": "concat", "presets": list(self.presets), "array": "pooled", "normalisation": "each L2, then the concatenation"}


@register_kind("backbone", "PRESET (a backbone's cached pooled feature)")
def _backbone(ref: str) -> FeatureSource:
    return BackboneFeatures(ref)


@register_kind("concat", "PRESET,PRESET (each L2-normalised, concatenated)")
def _concat(ref: str) -> FeatureSource:
    presets = tuple(p.strip() for p in ref.split(",") if p.strip())
    if len(presets) < 2:
        raise ConfigError(f"--model concat:{ref}: expected two or more presets separated by commas")
    return ConcatFeatures(presets)
