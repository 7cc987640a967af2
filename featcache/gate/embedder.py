"""A trained teacher as a model in the user's own code (``featcache.load_model`` of a train-gate run): its experts'
backbones, loaded the standard way from the weights its cache was made with, then the adapters, the gate and the
BN neck, from images to the feature ``featcache eval --model gate:RUN`` ranks.

The cache holds each expert's pooled feature as float32, computed under bf16 autocast on CUDA and in float32 on
the CPU; this model computes it the same way on the same device, so on the CPU its features equal evaluation's
up to float rounding, and on CUDA up to bf16's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from featcache.backbones import build_backbone
from featcache.backbones.base import Backbone
from featcache.cache import cache_identity
from featcache.config import read_resolved
from featcache.errors import FeatcacheError, InputError
from featcache.evaluation.embedder import Embedder
from featcache.gate.model import GateModel


class TeacherModel(Embedder):
    """A finished train-gate run with its experts' backbones: the gated fusion's BN-neck feature of each image's
    view 0, L2-normalised."""

    def __init__(self, gate: GateModel, backbones: dict[str, Backbone], image_size: tuple[int, int], run: Path,
                 device: torch.device) -> None:
        super().__init__(image_size, device)
        self.gate, self.run = gate, run
        self.experts = list(backbones)
        self.backbones = torch.nn.ModuleDict(backbones)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        xs = []
        for name in self.experts:
            bb = self.backbones[name]
            with _autocast(self.device):  # as extraction ran the backbones
                xs.append(bb(bb.normalize(pixels))["pooled"].float())
        return self.gate(xs, None)[1]


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def expert_backbone(run: Path, name: str, recorded: str, image_size: tuple[int, int], weights: str | None) -> Backbone:
    """Expert ``name`` built as its cache's extraction built it (``weights``: the local file or folder it was given,
    else the preset's published or seeded random weights), refused unless its weights are those recorded."""
    try:
        bb = build_backbone(name, image_size, weights, random_init=str(recorded).startswith("random-init"))
    except FeatcacheError as exc:
        raise InputError(f"load_model({run}): expert {name}: {exc}") from None
    if bb.weights_id != recorded:
        where = f"from {weights}" if weights else "the preset's own"
        raise InputError(f"load_model({run}): expert {name} was extracted with weights {recorded}, but {where} are "
                         f"{bb.weights_id}")
    return bb


def load_teacher_model(run: Path, device: str) -> TeacherModel:
    """A finished train-gate run with its backbones, as a ``TeacherModel`` in eval mode on ``device``."""
    from featcache.gate.train import load_run

    model, cfg, meta = load_run(run, device=device)
    if cfg.fusion == "moe-oracle":
        raise InputError(f"{run} routes by each image's known expert (moe-oracle), which an image alone does not say")
    cache = Path(cfg.cache)
    if not cache.is_file():
        raise InputError(f"load_model({run}): the cache it was trained on, {cache}, is gone: it holds the input size and "
                         "the backbones' weights the teacher needs")
    size = tuple(cache_identity(cache).preprocessing["image_size"])
    given = (read_resolved(cache, "extract") or {}).get("weights") or {}  # the --weights extraction was given
    backbones = {e: expert_backbone(run, e, w, size, given.get(e)) for e, w in zip(meta["experts"], meta["expert_weights"])}
    teacher = TeacherModel(model, backbones, size, Path(run), torch.device(device))
    return teacher.to(device).eval()
