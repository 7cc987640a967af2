"""``featcache pretrain-standins``: train each stand-in once per machine, keyed by everything that shapes it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from featcache import __version__
from featcache.fileio import give_umask_mode
from featcache.backbones.presets import PRESET_DIR
from featcache.standins.config import StandinConfig

logger = logging.getLogger(__name__)

#: config keys that do not change the weights (where they go, whether to train again, which presets); the device
#: does (CPU and CUDA kernels differ), so its resolved type is part of the key
HOW = ("root", "device", "force", "presets")
#: the code that shapes the weights: an edit to any of these trains anew (the package version alone would not see it)
RECIPE_CODE = ("standins/data.py", "standins/views.py", "standins/train.py", "synth_render.py", "training/loop.py",
               "training/hooks.py", "training/losses.py", "training/sampling.py", "training/schedule.py")


def standin_key(cfg: StandinConfig, name: str) -> str:
    """A digest of what the weights depend on: the recipe, the preset file, the featcache version."""
    import hashlib

    from featcache.backbones.base import sha256_file
    from featcache.runtime import resolve_device

    recipe = {k: v for k, v in cfg.to_dict(absolute=True).items() if k not in HOW}
    root = Path(__file__).resolve().parents[1]
    code = {f: sha256_file(root / f) for f in RECIPE_CODE}
    data = {"recipe": recipe, "preset": (PRESET_DIR / f"{name}.json").read_text(), "version": __version__, "code": code,
            "device": resolve_device(cfg.device).type}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def standin_paths(cfg: StandinConfig) -> dict[str, Path]:
    """Where each preset's weights are (or will be): ``ROOT/NAME-KEY``."""
    return {name: cfg.where() / f"{name}-{standin_key(cfg, name)}" for name in cfg.presets}


def run_pretrain_standins(cfg: StandinConfig) -> dict[str, Path]:
    """Train the stand-ins that are not there yet; returns preset -> the path to pass as ``--weights``."""
    from featcache.runtime import resolve_device

    paths = standin_paths(cfg)
    todo = [n for n, p in paths.items() if cfg.force or not (p / "standin.json").is_file()]
    for name in sorted(set(paths) - set(todo)):
        logger.info("%s: trained weights found at %s (same recipe, preset and version): reused", name, paths[name])
    if not todo:
        return paths
    device = resolve_device(cfg.device)
    from featcache.backbones.presets import get_preset
    from featcache.standins.views import VIEWS

    for name in todo:  # a preset naming no known view fails now, not after rendering the set
        VIEWS.get(get_preset(name).standin.get("view", "(none)"))
    from featcache.standins.data import render_pretraining_set
    from featcache.standins.train import save_standin, train_standin

    images, labels = render_pretraining_set(cfg.ids, cfg.cams, cfg.per_id, cfg.seed, cfg.image_size)
    for name in todo:
        final = paths[name]
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        backbone, log = train_standin(name, cfg, images, labels, device)
        save_standin(backbone, tmp)
        meta = {"preset": name, "key": final.name.rsplit("-", 1)[1], "featcache": __version__, "config": cfg.to_dict(absolute=True),
                "images": int(len(labels)), "identities": int(labels.max() + 1), "log": log}
        (tmp / "standin.json").write_text(json.dumps(meta, indent=1, default=str))
        for f in tmp.iterdir():  # safetensors writes 0600 through a private temporary file: the umask's mode instead
            give_umask_mode(f)
        if final.exists():  # --force: the old weights go only once the new ones are complete
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)  # published whole: a killed run leaves only a temporary folder
        except OSError:
            if not (final / "standin.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another run published the same key meanwhile: same recipe, kept
            logger.info("%s: another run published %s first; kept it", name, final)
            continue
        logger.info("%s: trained in %.0f s, saved to %s", name, sum(r["seconds"] for r in log), final)
    return paths
