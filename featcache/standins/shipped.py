"""The demo's stand-ins, shipped: float32 weights made once with the default recipe, in the package.

A new machine would otherwise spend minutes pre-training the same two tiny experts. The shipped weights are
used wherever the recipe asked for is the one they were made with: the same :data:`RECIPE_VERSION`, the same
options (``featcache pretrain-standins``'s defaults, which the demo uses) and the same architectures (the presets'
``model_cfg``). Any other recipe, or ``--force``, trains its own as before.

:data:`RECIPE_VERSION` stands for what the options do not show: the renderer, the views, the training code. Raise
it when the recipe's result changes, then regenerate (``python -m featcache.standins.ship``, docs/development.md).
``recipe.json`` beside the weights records the version, the options, the architectures and where they were made;
``probe.npz`` holds two rendered pre-training images and what each view makes of them, so that a test notices a
renderer or a view that changed while the version stayed. The weights are made on a CPU and used on any device.

On a CPU, stand-ins train in the fixed arithmetic of :data:`ARITHMETIC` (one thread, AVX2 kernels in torch, MKL
and oneDNN), so that retraining the default recipe gives the shipped weights bit for bit whatever the machine's
core count, with the same torch build (measured on one CPU model; meant for any x86-64 CPU with AVX2:
docs/notes/shipped-standins.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import InputError
from featcache.standins.config import META_FILE, StandinConfig

logger = logging.getLogger(__name__)

#: raise when the stand-ins the default recipe trains would change (renderer, views, loop, losses, sampling)
RECIPE_VERSION = 2
#: the environment each stand-in trains in on a CPU (``featcache.standins.worker``): torch, MKL and oneDNN fix their
#: kernels and threads when a process starts, and training carries any rounding difference on into other weights
ARITHMETIC = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
              "ONEDNN_MAX_CPU_ISA": "AVX2"}
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
RECIPE_FILE = "recipe.json"
PROBE_FILE = "probe.npz"
#: config fields that do not change the weights: where they go, whether to train again, which presets, the device
HOW = ("root", "device", "force", "presets")
PROBE_IMAGES = 2


def recipe_options(cfg: StandinConfig) -> dict[str, Any]:
    """The options that shape a stand-in's weights, as plain values."""
    return {k: v for k, v in cfg.to_dict().items() if k not in HOW}


def architecture(name: str) -> dict[str, Any]:
    """What a preset builds: its file's entries but the description."""
    from featcache.backbones.presets import get_preset

    return {k: v for k, v in get_preset(name).to_dict().items() if k != "description"}


def recipe_record(cfg: StandinConfig) -> dict[str, Any]:
    """What the shipped weights were made with, as ``recipe.json`` records it (less where they were made), in the
    values JSON gives back (lists for tuples), so that it compares with what the file holds."""
    record = {"version": RECIPE_VERSION, "options": recipe_options(cfg), "arithmetic": ARITHMETIC,
              "presets": {name: architecture(name) for name in sorted(cfg.presets)}}
    return json.loads(json.dumps(record))


def read_recipe(folder: Path = SHIPPED_DIR) -> dict[str, Any] | None:
    """What ``recipe.json`` records (None where no weights are shipped); a damaged file is one line naming it."""
    path = folder / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        rec["version"], rec["options"], rec["presets"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a readable recipe of shipped stand-ins ({type(exc).__name__}: {exc}); "
                         "reinstall featcache") from None
    return rec


def shipped_weights(cfg: StandinConfig, name: str, folder: Path = SHIPPED_DIR) -> Path | None:
    """The shipped weights of preset ``name`` when ``cfg`` asks for the recipe they were made with, else None."""
    rec = read_recipe(folder)
    if rec is None or cfg.force or name not in rec["presets"]:
        return None
    files = [folder / name / META_FILE, *(folder / name).glob("*.safetensors")]
    if len(files) < 2 or not all(f.is_file() for f in files):
        raise InputError(f"{folder / name}: the shipped {name} is incomplete (standin.json and its weights expected); "
                         "reinstall featcache")
    want = recipe_record(cfg)
    same = rec["version"] == want["version"] and rec["options"] == want["options"]
    return folder / name if same and rec["presets"][name] == want["presets"][name] else None


def probe(cfg: StandinConfig) -> dict[str, np.ndarray]:
    """The first rendered pre-training images and each view's output on them (fixed generator), as stored."""
    import torch

    from featcache.standins.data import render_pretraining_set
    from featcache.standins.views import VIEWS

    images, _ = render_pretraining_set(1, cfg.cams, max(cfg.per_id, PROBE_IMAGES), cfg.seed, cfg.image_size, quiet=True)
    images = images[:PROBE_IMAGES]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    out = {"images": images}
    for view in VIEWS.names():
        out[f"view:{view}"] = VIEWS.get(view)(x, torch.Generator().manual_seed(0)).numpy().astype(np.float16)
    return out
