"""Training loop: PK batches of cached views, ID + triplet (+ load balancing), Adam with cosine decay.

After each good epoch the weights (safetensors) and the optimizer and RNG
state go to ``ckpt/`` under epoch-numbered names, then the pointer
``ckpt/last`` is renamed into place: a crash or a NaN never leaves a torn or
poisoned checkpoint, and ``--resume`` continues exactly from the last one.
``model.safetensors`` is the latest weights, for evaluation.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from featcache.fileio import atomic_write
from featcache.gate.data import TrainData, identity_digest, load_train, pk_batches
from featcache.gate.losses import batch_hard_triplet
from featcache.gate.model import GateModel, fusion_names

logger = logging.getLogger(__name__)

WEIGHTS, CONFIG, LOG = "model.safetensors", "config.yaml", "log.csv"


class TrainError(ValueError):
    """Training cannot start or go on (bad input, a run directory from another cache, a NaN loss)."""


@dataclass(frozen=True)
class GateConfig:
    cache: str
    out: str
    experts: tuple[str, ...] = ()
    fusion: str = "moe-top1"
    epochs: int = 60
    seed: int = 42
    device: str = "auto"
    batch_size: int = 32
    instances: int = 4
    lr: float = 3e-4
    lr_min: float = 3e-6
    weight_decay: float = 5e-4
    beta: float = 0.5
    margin: float = 0.3
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.fusion not in fusion_names():
            raise TrainError(f"--fusion {self.fusion!r}: expected one of {', '.join(fusion_names())}")
        if self.batch_size % self.instances:
            raise TrainError(f"batch size {self.batch_size} is not a multiple of {self.instances} instances per identity")
        if self.epochs < 1:
            raise TrainError("--epochs must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainError(f"--device {self.device!r}: expected auto, cpu or cuda")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**{**data, "experts": tuple(data.get("experts", ()))})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["experts"] = list(self.experts)
        return d


def default_experts(cache: Path) -> tuple[str, ...]:
    from featcache.cache import open_cache

    with open_cache(cache) as f:
        return tuple(sorted(f["backbones"]))


def single_expert_index(fusion: str, families: list[str]) -> int | None:
    if fusion not in ("clip", "align"):
        return None
    family = "open_clip" if fusion == "clip" else "align"
    if family not in families:
        raise TrainError(f"--fusion {fusion} needs an expert of the {family} family; experts are {families}")
    return families.index(family)


def build_model(cfg: GateConfig, data_dims: list[int], families: list[str], n_classes: int) -> GateModel:
    return GateModel(families, data_dims, cfg.fusion, n_classes, single_expert_index(cfg.fusion, families))


def _lr(cfg: GateConfig, step: int, total: int) -> float:
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * step / max(1, total)))


def train(cfg: GateConfig, resume: bool = False) -> tuple[GateModel, TrainData]:
    """Train the adapters and fusion from the cache; returns the model and the data it saw."""
    out = Path(cfg.out)
    data = load_train(Path(cfg.cache), list(cfg.experts))
    p = cfg.batch_size // cfg.instances
    if len(data.pids) < p:
        raise TrainError(f"{cfg.cache}: {len(data.pids)} training identities, fewer than P = {p} needed for P x K = {p} x {cfg.instances} batches")
    meta = {"cache_identity": identity_digest(data.identity), "experts": list(cfg.experts), "families": data.families,
            "expert_weights": data.weights, "dims": data.dims, "n_classes": int(len(data.pids)), "pids": data.pids.tolist()}
    state = _prepare_dir(out, cfg, meta, resume)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    from featcache.extract.runner import resolve_device

    device = resolve_device(cfg.device)
    model = build_model(cfg, data.dims, data.families, len(data.pids)).to(device)
    # fused Adam: one kernel for all parameters (the foreach default spends 5x longer on the step here)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        start_epoch = state["epoch"]
        logger.info("resuming %s after epoch %d", out, start_epoch)
    steps_per_epoch = len(pk_batches(data.labels, p, cfg.instances, np.random.default_rng(0)))
    total = steps_per_epoch * cfg.epochs
    feats = [torch.from_numpy(f).to(device) for f in data.feats]
    labels_t = torch.from_numpy(data.labels).to(device)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        sums = {"loss": 0.0, "id": 0.0, "triplet": 0.0, "balance": 0.0, "acc": 0.0}
        batches = pk_batches(data.labels, p, cfg.instances, rng)
        for i, imgs in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)):
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, epoch * steps_per_epoch + i, total)
            views = rng.integers(0, data.n_views[imgs])  # the cached views are the augmentation
            rows = torch.from_numpy(data.row_start[imgs] + views).to(device)
            y = labels_t[torch.from_numpy(imgs).to(device)]
            fo, _, logits = model([f[rows] for f in feats])
            l_id = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            l_tri = batch_hard_triplet(fo.feature, y, cfg.margin)
            loss = l_id + cfg.beta * l_tri + fo.aux_loss
            if not torch.isfinite(loss):
                raise TrainError(f"loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}: stopped; "
                                 f"the last good checkpoint (after epoch {epoch}) is kept in {out}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for key, v in (("loss", loss), ("id", l_id), ("triplet", l_tri), ("balance", fo.aux_loss)):
                sums[key] += float(v.detach())
            sums["acc"] += float((logits.argmax(1) == y).float().mean())
        n = max(1, len(batches))
        row = {"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        _checkpoint(out, model, opt, rng, epoch + 1, row)
        logger.info("epoch %d: loss %.4f (id %.4f, triplet %.4f) acc %.3f", epoch + 1, row["loss"], row["id"], row["triplet"], row["acc"])
    model.eval()
    return model, data


def _prepare_dir(out: Path, cfg: GateConfig, meta: dict, resume: bool) -> dict | None:
    """Create the run directory, or check that a resumed one belongs to the same cache and config."""
    cfg_file = out / CONFIG
    if cfg_file.is_file():
        saved = yaml.safe_load(cfg_file.read_text())
        if not resume:
            raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        if saved.get("meta", {}).get("cache_identity") != meta["cache_identity"]:
            raise TrainError(f"{out} was trained from another cache (identity {saved.get('meta', {}).get('cache_identity')}, "
                             f"this cache {meta['cache_identity']}); use another --out")
        if saved.get("config") != {**cfg.to_dict(), "cache": saved["config"]["cache"], "out": saved["config"]["out"]}:
            raise TrainError(f"{out}: its config {saved.get('config')} differs from this one {cfg.to_dict()}")
        last = out / "ckpt" / "last"
        if not last.is_file():
            return None
        epoch = int(last.read_text())
        state = torch.load(out / "ckpt" / f"state-{epoch:04d}.pt", weights_only=False)
        state["weights"] = load_file(out / "ckpt" / f"weights-{epoch:04d}.safetensors")
        _trim_log(out / LOG, epoch)
        return state
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg_file, lambda p: p.write_text(yaml.safe_dump({"config": cfg.to_dict(), "meta": meta}, sort_keys=False)))
    return None


def _trim_log(log: Path, epoch: int) -> None:
    """Drop log rows of epochs after the checkpoint (a run killed after logging, before its pointer)."""
    if not log.is_file():
        return
    with log.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if int(r["epoch"]) <= epoch]
    if len(keep) != len(rows) and rows:
        def write(p: Path) -> None:
            with p.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(keep)
        atomic_write(log, write)


def _checkpoint(out: Path, model: GateModel, opt, rng: np.random.Generator, epoch: int, row: dict) -> None:
    """Weights and state under epoch-numbered names, then the pointer ``ckpt/last`` (one atomic rename)."""
    log = out / LOG
    new = not log.exists()
    with log.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    ck = out / "ckpt"
    ck.mkdir(exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(ck / f"weights-{epoch:04d}.safetensors", lambda p: save_file(weights, str(p), metadata={"epoch": str(epoch)}))
    state = {"epoch": epoch, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state}
    atomic_write(ck / f"state-{epoch:04d}.pt", lambda p: torch.save(state, p))
    atomic_write(ck / "last", lambda p: p.write_text(f"{epoch}\n"))
    atomic_write(out / WEIGHTS, lambda p: save_file(weights, str(p), metadata={"epoch": str(epoch)}))
    for old in ck.glob("*-*.*"):
        if not old.name.endswith(f"-{epoch:04d}{old.suffix}"):
            old.unlink()


def load_run(run: Path, device: str = "cpu") -> tuple[GateModel, GateConfig, dict]:
    """A trained run: its model in eval mode, its config and the metadata (experts, weights, labels)."""
    cfg_file = run / CONFIG
    if not (cfg_file.is_file() and (run / WEIGHTS).is_file()):
        raise TrainError(f"{run} is not a train-gate run directory (no {CONFIG} and {WEIGHTS})")
    saved = yaml.safe_load(cfg_file.read_text())
    cfg = GateConfig.from_dict(saved["config"])
    meta = saved["meta"]
    model = build_model(cfg, meta["dims"], meta["families"], meta["n_classes"])
    model.load_state_dict(load_file(run / WEIGHTS, device=device))
    return model.eval(), cfg, meta

