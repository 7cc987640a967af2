"""A training run's directory: resolved config, metadata, per-epoch log, atomic checkpoints, final weights.

Layout (the same for every trained stage)::

    RUN/config.yaml        the resolved config, as {command: {...}} (featcache --config reads it back)
    RUN/run.json           what the run was trained from (cache identity, experts, labels, ...)
    RUN/log.csv            one row per finished epoch
    RUN/ckpt/weights-NNNN.safetensors, RUN/ckpt/state-NNNN.pt, RUN/ckpt/last
    RUN/model.safetensors  the final weights, written once, when the run has finished

After each epoch the weights (safetensors) and the optimizer and RNG state
(plain tensors and numbers, read back with ``weights_only=True``: nothing is
unpickled) go to ``ckpt/`` under epoch-numbered names, then the pointer
``ckpt/last`` is renamed into place, so a crash or a NaN never leaves a torn
or poisoned checkpoint and ``--resume`` continues exactly from the last one.
``model.safetensors`` has one meaning: the finished model. A run without it
is unfinished, and evaluating it is refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from featcache.config import StageConfig, save_resolved
from featcache.errors import InputError
from featcache.faults import fault_point
from featcache.fileio import atomic_write, check_output

logger = logging.getLogger(__name__)

CONFIG, META, LOG, FINAL, CKPT = "config.yaml", "run.json", "log.csv", "model.safetensors", "ckpt"
#: the stage files a run may hold beside those (read and written through ``RunDir.artifact`` and friends)
VAL, GATE_STATS = "val.json", "gate_stats.json"
#: config keys that may differ when a run is resumed (where the files are, where it runs)
#: the folder of TensorBoard event files
TENSORBOARD = "tb"
#: run.json's record of ``--resume --epochs N`` extensions (not compared on resume)
EXTENDED = "extended"
RESUME_FREE = ("cache", "out", "device", "root", "pixel_cache", "workers", "input_path", "allow_partial", "tensorboard")


@dataclass
class Checkpoint:
    epoch: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, rng, device: torch.device | None = None) -> int:
        """Put the model, optimizer and RNGs (torch's, the numpy generator ``rng`` and, training on a GPU, that
        GPU's) back; returns the epoch."""
        model.load_state_dict(self.weights)
        built = [g.get("fused") for g in opt.param_groups]
        opt.load_state_dict(self.state["optimizer"])  # the optimizer continues as it was saved (fused or not) ...
        moved = ("cuda_rng" in self.state) != (device is not None and device.type == "cuda")
        for group, fused in zip(opt.param_groups, built):
            if moved:  # ... unless the run moved between CPU and GPU: then as this device's optimizer is built
                group["fused"] = fused
            for p in group["params"]:  # moments in their weight's layout: a GPU run saves them channels_last, and fused
                for k, v in opt.state.get(p, {}).items():  # Adam on the CPU would pair them with the wrong elements
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                        opt.state[p][k] = torch.empty_like(p).copy_(v)
        torch.set_rng_state(self.state["torch_rng"])
        if "cuda_rng" in self.state and device is not None and device.type == "cuda":  # dropout, gate noise
            torch.cuda.set_rng_state(self.state["cuda_rng"], device)
        rng.bit_generator.state = self.state["numpy_rng"]
        return self.epoch


def state_digest(weights: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of a state dict (names, dtypes, shapes, values): which weights a derived file came from."""
    h = hashlib.sha256()
    for k in sorted(weights):
        v = weights[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def training_state(opt: torch.optim.Optimizer, rng, device: torch.device | None = None) -> dict[str, Any]:
    """What a checkpoint needs beyond the weights to continue exactly: optimizer and RNG states (the training
    GPU's too: dropout and gate noise draw from it)."""
    state = {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state}
    if device is not None and device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


class RunDir:
    """One run directory; create it with ``start`` (new or resumed) or read a finished one with ``open``."""

    def __init__(self, path: Path, command: str = "") -> None:
        self.path, self.command = Path(path), command

    # ------------------------------------------------------------------ its files
    @property
    def config_file(self) -> Path:
        """The resolved config (``featcache --config`` reads it back)."""
        return self.path / CONFIG

    @property
    def meta_file(self) -> Path:
        """What the run was trained from (``meta``)."""
        return self.path / META

    @property
    def weights_file(self) -> Path:
        """The finished model's weights: present once the run has finished, and only then."""
        return self.path / FINAL

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    def is_started(self) -> bool:
        return self.config_file.is_file()

    def is_finished(self) -> bool:
        return self.weights_file.is_file()

    def artifact(self, name: str) -> Path:
        """A stage's own file in the run (``VAL``, ``GATE_STATS``, the teacher's targets, plots)."""
        return self.path / name

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON artifact (``VAL``, ``GATE_STATS``), or None where the run has none."""
        f = self.artifact(name)
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{f}: cannot read it ({exc})") from None

    def write_json(self, name: str, value: dict[str, Any]) -> Path:
        """Write a JSON artifact atomically."""
        f = self.artifact(name)
        atomic_write(f, lambda p: p.write_text(json.dumps(value, indent=2)))
        return f

    def val(self) -> dict[str, Any] | None:
        """The run's validation metrics (``--set val_ids=N``), or None."""
        return self.read_json(VAL)

    def gate_stats(self) -> dict[str, Any] | None:
        """A train-gate run's routing statistics, or None."""
        return self.read_json(GATE_STATS)

    def weights(self) -> dict[str, torch.Tensor]:
        """The finished model's weights (refused, with the epoch reached, for an unfinished run)."""
        if not self.is_finished():
            raise InputError(f"{self.path} is an unfinished run (it reached epoch {self.last_epoch()}): no {FINAL}")
        return load_file(self.weights_file)

    def log_rows(self) -> list[dict[str, str]]:
        """The per-epoch log, a dict per finished epoch (empty before the first)."""
        if not self.log_file.is_file():
            return []
        with self.log_file.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def saved_config(self) -> dict[str, Any]:
        """The whole saved config file, ``{command: {...}}`` (``read_config`` reads this run's section)."""
        try:
            return yaml.safe_load(self.config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"{self.config_file}: cannot read it ({exc})") from None

    # ------------------------------------------------------------------ starting
    @staticmethod
    def refuse_existing(path: Path, resume: bool) -> None:
        """An existing run without --resume is refused, and so is a --out that cannot be created (``start`` checks
        it too; stages call this first, to fail before their work)."""
        check_output(path, "--out", folder=True)
        if (Path(path) / CONFIG).is_file() and not resume:
            raise InputError(f"{path} already holds a run; pass --resume to continue it or choose another --out")

    @classmethod
    def start(cls, path: Path, cfg: StageConfig, meta: dict[str, Any], resume: bool) -> tuple["RunDir", Checkpoint | None]:
        """Create the run directory, or check that the one to resume belongs to the same inputs and config."""
        rd = cls(path, cfg.command)
        if (rd.path / CONFIG).is_file():
            cls.refuse_existing(rd.path, resume)
            saved_cfg, saved_meta = cfg.upgrade(rd.read_config()), rd.meta()  # in today's form: keys added since
            extended = saved_meta.pop(EXTENDED, [])
            if saved_meta != meta:
                diff = sorted(k for k in set(saved_meta) | set(meta) if saved_meta.get(k) != meta.get(k))
                if "partial" in diff:  # the cache's training images are not those the run started from
                    was, now = (m.get("partial") or {} for m in (saved_meta, meta))
                    raise InputError(f"{rd.path} started from {was.get('images_used', 'all')} of "
                                     f"{was.get('images_total', 'the')} training images and the cache now holds "
                                     f"{now.get('images_used', 'all')} of them: its extraction progressed or changed "
                                     "since; start a new --out")
                if "world_size" in diff:  # data-parallel: each rank's share of an epoch depends on the number of ranks
                    was = saved_meta.get("world_size", 1)
                    raise InputError(f"{rd.path} was trained on {was} rank(s), this launch has {meta.get('world_size', 1)}: "
                                     f"resume it with torchrun --nproc-per-node {was}" + (" (or without torchrun)" if was == 1 else ""))
                raise InputError(f"{rd.path} was trained from other inputs ({', '.join(diff)} differ: another cache or "
                                 "experts); use another --out")
            mine = cfg.to_dict()
            changed = sorted(k for k in set(saved_cfg) | set(mine) if k not in RESUME_FREE and saved_cfg.get(k) != mine.get(k))
            more = "epochs" in changed and int(mine["epochs"]) > int(saved_cfg["epochs"])
            if "epochs" in changed and not more:
                raise InputError(f"{rd.path}: --epochs {mine['epochs']} is fewer than the run's {saved_cfg['epochs']}: a run "
                                 "is extended, never shortened; choose another --out")
            changed = [k for k in changed if not (k == "epochs" and more)]
            if changed:
                raise InputError(f"{rd.path}: --resume with another config ({', '.join(f'{k}: {saved_cfg.get(k)!r} -> {mine.get(k)!r}' for k in changed)}); "
                                 "resume with the run's own options or choose another --out")
            if more:
                rd._extend(cfg, {**meta, EXTENDED: extended}, int(saved_cfg["epochs"]))
            return rd, rd._load_checkpoint()
        rd.path.mkdir(parents=True, exist_ok=True)
        atomic_write(rd.path / META, lambda p: p.write_text(json.dumps(meta, indent=1)))
        save_resolved(rd.path / CONFIG, cfg)
        (rd.path / LOG).unlink(missing_ok=True)
        return rd, None

    def _extend(self, cfg: StageConfig, meta: dict[str, Any], was: int) -> None:
        """``--resume --epochs N`` above the run's epochs: the config records the new total, ``run.json`` the
        extension, and final weights written before are removed (the run is unfinished until it reaches N)."""
        meta[EXTENDED] = [*meta[EXTENDED], {"from_epochs": was, "to_epochs": int(cfg.epochs), "after_epoch": self.last_epoch()}]
        atomic_write(self.path / META, lambda p: p.write_text(json.dumps(meta, indent=1)))
        save_resolved(self.path / CONFIG, cfg)
        (self.path / FINAL).unlink(missing_ok=True)
        logger.info("%s: extended from %d to %d epochs; the cosine schedule is planned over %d from here", self.path, was,
                    cfg.epochs, cfg.epochs)

    def read_checkpoint(self) -> Checkpoint | None:
        """The last checkpoint, read only (the other ranks of a data-parallel run, once rank 0 has started it)."""
        return self._load_checkpoint(trim=False)

    def _load_checkpoint(self, trim: bool = True) -> Checkpoint | None:
        last = self.path / CKPT / "last"
        if not last.is_file():
            if trim:
                self._trim_log(0)  # killed after logging epoch 1, before its checkpoint: start over, log included
            return None
        epoch = int(last.read_text())
        ck = self.path / CKPT
        try:
            weights = load_file(ck / f"weights-{epoch:04d}.safetensors")
            state = torch.load(ck / f"state-{epoch:04d}.pt", weights_only=True, map_location="cpu")
        except Exception as exc:  # a corrupt or planted file: say which, never run it
            raise InputError(f"{ck}: the checkpoint of epoch {epoch} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); start a new run") from None
        if trim:
            self._trim_log(epoch)
        logger.info("resuming %s after epoch %d", self.path, epoch)
        return Checkpoint(epoch, weights, state)

    # ------------------------------------------------------------------ during training
    def log_epoch(self, row: dict[str, Any]) -> None:
        """Append the epoch's row by rewriting the log under a temporary name (a kill mid-append never tears it).
        A log begun by another featcache version with other columns (a resumed run) is rewritten under the union
        of both headers, its rows empty in the columns they lack, so no value lands under another's name."""
        log = self.path / LOG
        old = log.read_text() if log.exists() else ""
        header = next(csv.reader([old.splitlines()[0]])) if old else []
        rows: list[dict[str, Any]] | None = None
        if old and header != list(row):
            with log.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            header += [k for k in row if k not in header]

        def write(p: Path) -> None:
            with p.open("w", newline="") as fh:
                if rows is None:
                    fh.write(old)
                w = csv.DictWriter(fh, fieldnames=header or list(row), restval="")
                if rows is not None or not old:
                    w.writeheader()
                w.writerows([*(rows or []), row])
        atomic_write(log, write)

    def checkpoint(self, epoch: int, weights: dict[str, torch.Tensor], state: dict[str, Any], row: dict[str, Any]) -> None:
        """Log the epoch, then weights and state under epoch-numbered names, then the pointer (one atomic rename)."""
        self.log_epoch(row)
        fault_point("train.after_log")
        ck = self.path / CKPT
        ck.mkdir(exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        atomic_write(ck / f"weights-{epoch:04d}.safetensors", lambda p: save_file(weights, str(p), metadata={"epoch": str(epoch)}))
        atomic_write(ck / f"state-{epoch:04d}.pt", lambda p: torch.save({"epoch": epoch, **state}, p))
        atomic_write(ck / "last", lambda p: p.write_text(f"{epoch}\n"))
        fault_point("train.after_checkpoint")
        for old in ck.glob("*-*.*"):
            if not old.name.endswith(f"-{epoch:04d}{old.suffix}"):
                old.unlink()

    def finish(self, weights: dict[str, torch.Tensor], note: str = "") -> Path:
        """Write the final weights: from now on the run counts as finished."""
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        # one metadata key: safetensors orders several keys differently from run to run, and runs must be byte-equal
        atomic_write(self.path / FINAL, lambda p: save_file(weights, str(p), metadata={"featcache": f"final weights; {note}"}))
        return self.path / FINAL

    # ------------------------------------------------------------------ reading
    def read_config(self) -> dict[str, Any]:
        try:
            saved = yaml.safe_load((self.path / CONFIG).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"{self.path / CONFIG}: cannot read it ({exc})") from None
        if not isinstance(saved, dict) or self.command not in saved:
            raise InputError(f"{self.path} is not a {self.command} run directory ({CONFIG} has no {self.command!r} section; "
                             "runs made by featcache 0.1 must be trained again)")
        return saved[self.command]

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / META).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.path / META}: cannot read it ({exc})") from None

    def last_epoch(self) -> int:
        last = self.path / CKPT / "last"
        return int(last.read_text()) if last.is_file() else 0

    @staticmethod
    def command_of(path: Path) -> str:
        """The command that made the run in ``path`` (``distill``, ``train-gate``, ...), from its saved config."""
        path = Path(path)
        saved = path / CONFIG
        if not path.exists():
            raise InputError(f"{path} does not exist: give the --out folder of a finished train-gate or distill run")
        if not saved.is_file():
            raise InputError(f"{path} is not a featcache run folder (it holds no {CONFIG}): give the --out folder of a "
                             "finished train-gate or distill run")
        data = RunDir(path).saved_config()
        if not isinstance(data, dict) or len(data) != 1:
            raise InputError(f"{saved}: expected one command's section, as featcache writes it")
        return str(next(iter(data)))

    @classmethod
    def open(cls, path: Path, command: str, purpose: str = "using it") -> tuple["RunDir", dict[str, Any], dict[str, Any],
                                                                             dict[str, torch.Tensor]]:
        """A finished run: (run dir, config, metadata, final weights); an unfinished one is refused, saying what it
        must be finished before (``purpose``: "evaluating it", "distilling from it", ...)."""
        rd = cls(path, command)
        if not (rd.path / CONFIG).is_file():
            raise InputError(f"{rd.path} is not a {command} run directory (no {CONFIG})")
        cfg, meta = rd.read_config(), rd.meta()
        if not (rd.path / FINAL).is_file():
            raise InputError(f"{rd.path} is an unfinished run (it reached epoch {rd.last_epoch()} of {cfg.get('epochs')}): "
                             f"finish it with `featcache {command} --resume --out {rd.path} ...` before {purpose}")
        return rd, cfg, meta, load_file(rd.path / FINAL)

    def _trim_log(self, epoch: int) -> None:
        """Drop log rows of epochs after the checkpoint (a run killed after logging, before its pointer)."""
        log = self.path / LOG
        if not log.is_file():
            return
        with log.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if int(r["epoch"]) <= epoch]
        if not keep:
            log.unlink()
        elif len(keep) != len(rows):
            def write(p: Path) -> None:
                with p.open("w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(keep)
            atomic_write(log, write)
