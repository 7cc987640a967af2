"""``featcache pretrain-standins``: train each stand-in once per machine, keyed by its recipe; the default recipe's
are shipped with featcache (featcache/standins/shipped.py) and used as they are."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from featcache import __version__
from featcache.fileio import give_umask_mode
from featcache.standins.config import StandinConfig
from featcache.standins.shipped import RECIPE_VERSION, SHIPPED_DIR, architecture, recipe_options, shipped_weights

logger = logging.getLogger(__name__)


def standin_key(cfg: StandinConfig, name: str) -> str:
    """A digest of what the weights depend on: the recipe version, the options and the preset's architecture.

    Not the device (weights made on a CPU serve a GPU) nor the code: a change that alters what the recipe trains
    raises :data:`~featcache.standins.shipped.RECIPE_VERSION` instead."""
    import hashlib

    data = {"version": RECIPE_VERSION, "options": recipe_options(cfg), "preset": architecture(name)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def standin_paths(cfg: StandinConfig) -> dict[str, Path]:
    """Where each preset's weights are (or will be): the shipped ones for their recipe, else ``ROOT/NAME-KEY``."""
    return {name: shipped_weights(cfg, name) or cfg.where() / f"{name}-{standin_key(cfg, name)}" for name in cfg.presets}


def shipped_of(paths: dict[str, Path]) -> list[str]:
    """The presets whose weights in ``paths`` are the shipped ones."""
    return sorted(n for n, p in paths.items() if p.parent == SHIPPED_DIR)


def run_pretrain_standins(cfg: StandinConfig) -> dict[str, Path]:
    """Train the stand-ins that are not there yet; returns preset -> the path to pass as ``--weights``."""
    from featcache.runtime import resolve_device

    paths = standin_paths(cfg)
    todo = [n for n, p in paths.items() if cfg.force or not (p / "standin.json").is_file()]
    shipped = shipped_of(paths)
    if shipped:
        logger.info("%s: the shipped stand-ins are used (made with this recipe): nothing to train", ", ".join(shipped))
    for name in sorted(set(paths) - set(todo) - set(shipped)):
        logger.info("%s: trained weights found at %s (same recipe and preset): reused", name, paths[name])
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
