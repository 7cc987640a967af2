"""``featcache pretrain-standins``: train each stand-in once per machine, keyed by its recipe; the default recipe's
are shipped with featcache (featcache/standins/shipped.py) and used as they are."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from featcache.errors import RunError
from featcache.fileio import give_umask_mode
from featcache.processes import sigterm_as_interrupt
from featcache.standins.config import META_FILE, StandinConfig
from featcache.standins.shipped import RECIPE_VERSION, SHIPPED_DIR, architecture, recipe_options, shipped_weights
from featcache.standins.worker import Job, worker_env

if TYPE_CHECKING:
    import torch

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
    todo = [n for n, p in paths.items() if cfg.force or not (p / META_FILE).is_file()]
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
    jobs = [Job(name, paths[name].name.rsplit("-", 1)[1], paths[name].with_name(f".{paths[name].name}.tmp-{os.getpid()}"))
            for name in todo]
    with sigterm_as_interrupt():  # a SIGTERM stops the workers and removes their folders, as Ctrl-C does
        train_in_workers(cfg, jobs, device, lambda job: publish(job.out, paths[job.name]))
    return paths


def train_in_workers(cfg: StandinConfig, jobs: list[Job], device: torch.device, done: Callable[[Job], None]) -> None:
    """Render the pre-training set once, train each job in a worker process (as many at once as there are cores to
    give each one thread; one at a time on a GPU) and call ``done`` with each job as its weights are complete. On
    any failure or interruption the other workers are stopped and their folders removed."""
    import tempfile

    import numpy as np

    from featcache.standins.data import render_pretraining_set

    if device.type != "cpu":
        logger.warning("pre-training on %s: stand-ins of the same quality as on a CPU but other weights (another "
                       "arithmetic); --device cpu trains those of CPUs with AVX2, as the shipped ones were", device)
    env = worker_env(device.type)
    images, labels = render_pretraining_set(cfg.ids, cfg.cams, cfg.per_id, cfg.seed, cfg.image_size)
    slots = max(1, min(len(jobs), usable_cores())) if device.type == "cpu" else 1
    with tempfile.TemporaryDirectory(prefix="featcache-standins-") as tmp:
        data = Path(tmp) / "set.npz"
        np.savez(data, images=images, labels=labels)
        waiting, running = list(jobs), []
        try:
            while waiting or running:
                while waiting and len(running) < slots:
                    running.append(start(waiting.pop(0), cfg, data, str(device), env))
                finished = next((r for r in running if r[0].proc.poll() is not None), None)
                if finished is None:
                    time.sleep(0.2)
                    continue
                running.remove(finished)
                job, relay = finished
                relay.join()
                if job.proc.returncode != 0:
                    shutil.rmtree(job.out, ignore_errors=True)
                    raise RunError(f"pretrain-standins {job.failure()}")
                done(job)
        finally:
            for job, relay in running:
                job.proc.kill()
                job.proc.wait()
                relay.join()
                shutil.rmtree(job.out, ignore_errors=True)


def start(job: Job, cfg: StandinConfig, data: Path, device: str, env: dict[str, str]) -> tuple[Job, threading.Thread]:
    """Start ``job``'s worker and the thread that passes its output on."""
    shutil.rmtree(job.out, ignore_errors=True)
    job.start(cfg, data, device, env)
    relay = threading.Thread(target=job.relay, daemon=True)
    relay.start()
    return job, relay


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system says, else the CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def publish(tmp: Path, final: Path) -> None:
    """Move a worker's complete folder to ``final`` with the umask's modes; another run's complete copy is kept."""
    name = final.name.rsplit("-", 1)[0]
    for f in tmp.iterdir():  # safetensors writes 0600 through a private temporary file: the umask's mode instead
        give_umask_mode(f)
    if final.exists():  # --force: the old weights go only once the new ones are complete
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)  # published whole: a killed run leaves only a temporary folder
    except OSError:
        if not (final / META_FILE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another run published the same key meanwhile: same recipe, kept
        logger.info("%s: another run published %s first; kept it", name, final)
        return
    log = json.loads((final / META_FILE).read_text())["log"]
    logger.info("%s: trained in %.0f s, saved to %s", name, sum(r["seconds"] for r in log), final)
