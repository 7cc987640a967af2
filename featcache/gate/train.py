"""train-gate's training: PK batches of cached views, ID + triplet (+ load balancing and the routing recipe's
expert losses), Adam with cosine decay.

The loop, run directory, checkpoints, resume and the NaN stop are the
shared training core's (``featcache.training``); this module holds what is
the gate's own: its config, its model, its batches and its step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from featcache.errors import ConfigError, InputError
from featcache.gate.config import GateConfig, check_experts
from featcache.gate.routing import SINGLE_EXPERT, Routing
from featcache.gate.data import TrainData, load_train
from featcache.gate.model import TAU_TEST, TAU_TRAIN, GateModel, Gated
from featcache.gate.objective import balance_losses, expert_losses, route_loss
from featcache.gate.route_targets import retrieval_targets
from featcache.gate.outputs import routing_row
from featcache.runtime import resolve_device
from featcache.training.hooks import tensorboard_available
from featcache.training.loop import Epoch, Loop, Schedule, Step, adam, per_batch_on_device
from featcache.training.losses import batch_hard_triplet, id_loss
from featcache.training.options import check_identities
from featcache.training.rundir import RunDir
from featcache.training.sampling import pk_batches, steps_per_epoch

logger = logging.getLogger(__name__)


def default_experts(cache: Path) -> tuple[str, ...]:
    from featcache.cache import CacheReader

    with CacheReader(cache) as c:
        return tuple(sorted(c.backbones))


def single_expert_index(fusion: str, families: list[str]) -> int | None:
    if fusion not in SINGLE_EXPERT:
        return None
    family = SINGLE_EXPERT[fusion]
    if family not in families:
        raise ConfigError(f"--fusion {fusion} needs an expert of the {family} family; experts are {families}")
    return families.index(family)


def build_model(fusion: str, dims: list[int], families: list[str], n_classes: int, routing: Routing | None = None) -> GateModel:
    return GateModel(families, dims, fusion, n_classes, single_expert_index(fusion, families), routing)


def run_meta(data: TrainData, experts: list[str]) -> dict:
    """What the run was trained from: a resumed run must match it, evaluation checks the experts' weights."""
    return {"cache_identity": data.identity.digest(), "experts": experts, "families": data.families,
            "expert_weights": data.weights, "dims": data.dims, "n_classes": int(len(data.pids)), "pids": data.pids.tolist(),
            **({"val_pids": np.unique(data.val.pids).tolist()} if data.val is not None else {}),
            **({"partial": data.partial} if data.partial else {})}  # absent for a whole cache: older runs resume


def train(cfg: GateConfig, resume: bool = False) -> tuple[GateModel, TrainData, RunDir]:
    """Train the adapters and fusion from the cache; returns the model, the data it saw and its run directory."""
    RunDir.refuse_existing(cfg.out, resume)  # before the cache is read
    data = load_train(cfg.cache, list(cfg.experts), cfg.val_ids, cfg.allow_partial, cfg.oracle_by_condition())
    check_identities(len(data.pids), cfg.batch_size, cfg.instances, cfg.cache)
    p = cfg.batch_size // cfg.instances
    device = resolve_device(cfg.device)  # configuration errors before the run directory exists
    single_expert_index(cfg.fusion, data.families)
    if cfg.fusion == "moe-oracle" and (data.route is None or (data.route < 0).any()):
        raise InputError(f"--fusion moe-oracle routes by the known reliable expert of each image, which {cfg.cache} "
                         "does not record (synthetic feature caches of the camera or dominant kind do; a rendered "
                         "synthetic dataset's cache does with --set oracle_route=day=EXPERT,night=EXPERT,blur=EXPERT)")
    rd, ckpt = RunDir.start(cfg.out, cfg, run_meta(data, list(cfg.experts)), resume)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg.fusion, data.dims, data.families, len(data.pids), cfg.routing).to(device)
    # fused Adam on every device: one kernel for all parameters (the foreach default spends 5x longer on the step here)
    opt = adam([q for q in model.parameters() if q.requires_grad], cfg.lr, cfg.weight_decay, device, fused=True)
    schedule = Schedule(cfg.epochs, steps_per_epoch(data.labels, p, cfg.instances), cfg.lr, cfg.lr_min)
    loop = Loop(model, opt, schedule, rng, device, run=rd, checkpoint=ckpt, desc="train-gate",
                tensorboard=tensorboard_available(cfg.tensorboard))
    loop.fit(GateStage(cfg, model, data, device))
    return model, data, rd


class GateStage:
    """The gate's side of the shared loop: PK batches of cached views (a random cached view of each image is the
    augmentation), the routing schedule of each epoch, and the step's ID, triplet, balancing and expert losses.
    Everything a step reads is on the device: the cached features, and the epoch's indices, copied there once."""

    columns = ("loss", "id", "triplet", "balance", "expert", "acc")

    def __init__(self, cfg: GateConfig, model: GateModel, data: TrainData, device: torch.device) -> None:
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.routing = cfg.routing
        self.gate = model.fusion if isinstance(model.fusion, Gated) else None  # the gate the schedule steers, if any
        self.warmup_epochs = self.routing.warmup * cfg.epochs  # the experts are averaged before this epoch
        self.p = cfg.batch_size // cfg.instances
        self.feats = [torch.from_numpy(f).to(device) for f in data.feats]
        self.labels = torch.from_numpy(data.labels).to(device)
        self.route = torch.from_numpy(data.route).to(device) if data.route is not None and cfg.fusion == "moe-oracle" else None
        self.route_targets = None
        if self.routing.route_by_loss and self.routing.route_target == "retrieval" and self.gate is not None:
            self.route_targets = torch.from_numpy(retrieval_targets(data)).to(device)
        self.gate_learns = True

    def begin_epoch(self, epoch: int, rng: np.random.Generator) -> Epoch:
        cfg, routing, gate = self.cfg, self.routing, self.gate
        self.gate_learns = True
        if gate is not None:
            gate.averaging = epoch < self.warmup_epochs
            self.gate_learns = not (routing.gate_freeze and not gate.averaging)
            if routing.gate_freeze:
                gate.freeze(not self.gate_learns)
            if routing.tau_anneal:  # 1.0 -> 0.5 over the run
                gate.tau_train = TAU_TRAIN + (TAU_TEST - TAU_TRAIN) * epoch / max(1, cfg.epochs - 1)
        batches = pk_batches(self.data.labels, self.p, cfg.instances, rng)
        views = [rng.integers(0, self.data.n_views[b]) for b in batches]  # the cached views are the augmentation
        imgs = np.concatenate(batches)
        rows = self.data.row_start[imgs] + np.concatenate(views)
        return Epoch(per_batch_on_device(self.device, [len(b) for b in batches], imgs, rows), len(batches), len(imgs))

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Step:
        imgs, rows = batch
        cfg, routing, model = self.cfg, self.routing, self.model
        y = self.labels[imgs]
        fo, _, logits = model([f[rows] for f in self.feats], self.route[rows] if self.route is not None else None)
        l_id = id_loss(logits, y, cfg.label_smoothing)
        l_tri = batch_hard_triplet(fo.feature, y, cfg.margin)
        l_exp = expert_losses(model, fo.experts, y, routing, cfg.margin)
        if routing.route_by_loss and fo.gate_logits is not None and self.gate_learns:  # the gate learns which expert explains each image best
            if self.route_targets is not None:
                target = self.route_targets[imgs]
            else:
                target = model.expert_id_losses(fo.experts, y).detach().argmin(1)
            l_exp = l_exp + routing.route_by_loss * route_loss(fo.gate_logits, target)
        l_bal = balance_losses(model, fo, routing)
        loss = l_id + cfg.beta * l_tri + l_bal + l_exp
        acc = (logits.argmax(1) == y).float().mean()
        return Step(loss, {"id": l_id, "triplet": l_tri, "balance": l_bal, "expert": l_exp, "acc": acc})

    def end_epoch(self, epoch: int) -> dict:
        return routing_row(self.model, self.data)


def load_run(run: Path, device: str = "cpu") -> tuple[GateModel, GateConfig, dict]:
    """A finished run: its model in eval mode on ``device``, its config and the metadata (experts, weights, labels)."""
    rd, saved, meta, weights = RunDir.open(Path(run), GateConfig.command)
    cfg = GateConfig.from_dict(GateConfig.upgrade(saved), str(rd.config_file))
    model = build_model(cfg.fusion, meta["dims"], meta["families"], meta["n_classes"], cfg.routing)
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, meta


__all__ = ["GateConfig", "build_model", "check_experts", "default_experts", "load_run", "train"]
