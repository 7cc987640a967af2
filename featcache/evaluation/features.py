"""Query and gallery features for ``--model KIND:REF``: a small registry of feature sources.

This issue registers ``backbone:PRESET`` and ``concat:PRESET,PRESET``; the gate
and student stages register ``gate`` and ``student`` with ``register_kind``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from featcache.cache import DONE, open_cache, read_rows
from featcache.datasets import SPLITS
from featcache.evaluation.search import l2_normalize
from featcache.registry import Registry

logger = logging.getLogger(__name__)


class EvalInputError(ValueError):
    """The caches or the model cannot be evaluated as asked."""


@dataclass
class CacheSplit:
    """The cached images of one split: identities, cameras, names and their view rows."""

    cache: Path
    split: str
    images: np.ndarray      # indices into images/
    pids: np.ndarray
    camids: np.ndarray
    names: np.ndarray       # paths relative to the dataset root
    view_start: np.ndarray
    n_views: np.ndarray
    identity: dict

    @classmethod
    def load(cls, cache: Path, split: str) -> "CacheSplit":
        with open_cache(cache) as f:
            g = f["images"]
            keep = (g["split"][...] == SPLITS.index(split)) & (g["status"][...] == DONE)
            idx = np.flatnonzero(keep)
            out = cls(
                cache, split, idx, g["pid"][...][idx], g["camid"][...][idx], g["path"].asstr()[...][idx],
                g["view_start"][...][idx], g["n_views"][...][idx], json.loads(f.attrs["identity"]),
            )
        if idx.size == 0:
            raise EvalInputError(f"{cache} holds no cached {split} images: nothing to evaluate")
        return out

    @property
    def root(self) -> Path:
        return Path(self.identity["dataset_root"])

    def read(self, backbone: str, array: str, view: int) -> np.ndarray:
        """Rows of ``backbones/<backbone>/<array>`` for view ``view`` of each image of the split."""
        if (self.n_views <= view).any():
            raise EvalInputError(f"{self.cache}: some {self.split} images have no view {view} (extracted with --views 1?)")
        rows = self.view_start + view
        with open_cache(self.cache) as f:
            if backbone not in f["backbones"]:
                raise EvalInputError(f"{self.cache} has no backbone {backbone!r}; it holds: {', '.join(f['backbones'])}")
            ds = f["backbones"][backbone][array]
            return read_rows(ds, rows)


class FeatureSource(Protocol):
    """What a model kind provides: features of a split and a description for the report."""

    def features(self, split: CacheSplit, flip: bool) -> np.ndarray: ...

    def describe(self) -> dict: ...


KINDS: Registry[Callable[[str], FeatureSource]] = Registry("--model kind", EvalInputError)
#: Register a ``--model`` kind: ``fn(ref) -> FeatureSource``.
register_kind = KINDS.register


def known_kinds() -> list[str]:
    return sorted(KINDS.names())


def parse_model(spec: str) -> FeatureSource:
    kind, sep, ref = spec.partition(":")
    if not sep or not ref:
        raise EvalInputError(f"--model {spec!r}: expected KIND:REF, with KIND one of {', '.join(known_kinds())}")
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

    def features(self, split: CacheSplit, flip: bool) -> np.ndarray:
        return l2_normalize(pooled(split, self.preset, flip))

    def describe(self) -> dict:
        return {"kind": "backbone", "preset": self.preset, "array": "pooled"}


@dataclass
class ConcatFeatures:
    presets: tuple[str, ...]

    def features(self, split: CacheSplit, flip: bool) -> np.ndarray:
        return l2_normalize(np.concatenate([l2_normalize(pooled(split, p, flip)) for p in self.presets], axis=1))

    def describe(self) -> dict:
        return {"kind": "concat", "presets": list(self.presets), "array": "pooled", "normalisation": "each L2, then the concatenation"}


@register_kind("backbone")
def _backbone(ref: str) -> FeatureSource:
    return BackboneFeatures(ref)


@register_kind("concat")
def _concat(ref: str) -> FeatureSource:
    presets = tuple(p.strip() for p in ref.split(",") if p.strip())
    if len(presets) < 2:
        raise EvalInputError(f"concat:{ref}: expected two or more presets separated by commas")
    return ConcatFeatures(presets)


@dataclass
class GateFeatures:
    """A trained teacher (``gate:RUN_DIR``): the BN feature of the fused experts, from cached pooled features."""

    run: Path
    _loaded: tuple | None = field(default=None, init=False, repr=False)

    def features(self, split: CacheSplit, flip: bool) -> np.ndarray:
        import torch

        from featcache.gate.train import load_run

        if self._loaded is None:  # query and gallery share one load
            self._loaded = load_run(self.run)
        model, _, meta = self._loaded
        have = {n: b["weights"] for n, b in split.identity["backbones"].items()}
        for name, w in zip(meta["experts"], meta["expert_weights"]):
            if have.get(name) != w:
                raise EvalInputError(f"{split.cache}: expert {name} has weights {have.get(name)!r}, but {self.run} was trained on {w!r}")
        views = (0, 1) if flip else (0,)
        out = 0
        with torch.inference_mode():
            for v in views:
                xs = [torch.from_numpy(split.read(e, "pooled", v).astype(np.float32)) for e in meta["experts"]]
                out = out + model(xs)[1].numpy()
        return l2_normalize(out / len(views))

    def describe(self) -> dict:
        return {"kind": "gate", "run": str(self.run), "feature": "BN-neck feature of the fused experts"}


@register_kind("gate")
def _gate(ref: str) -> FeatureSource:
    return GateFeatures(Path(ref))
