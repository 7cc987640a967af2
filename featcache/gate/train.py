"""Training loop: PK batches of cached views, ID + triplet (+ load balancing), Adam with cosine decay.

The run directory, checkpoints, resume and the NaN stop are the shared
training core's (``featcache.training``); this module holds what is the
gate's own: its config, its model and its step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featcache.errors import ConfigError, InputError
from featcache.gate.config import ROUTING_FIELDS, SINGLE_EXPERT, GateConfig, Routing, check_experts
from featcache.gate.data import TrainData, load_train
from featcache.gate.model import TAU_TEST, TAU_TRAIN, GateModel, Gated, agreement_loss
from featcache.gate.route_targets import NO_TARGET, retrieval_targets
from featcache.gate.outputs import routing_row
from featcache.progress import progress
from featcache.runtime import resolve_device
from featcache.training.losses import batch_hard_triplet, id_loss
from featcache.training.rundir import RunDir, training_state
from featcache.training.sampling import pk_batches, steps_per_epoch
from featcache.training.schedule import cosine_lr, set_lr

logger = logging.getLogger(__name__)

#: check the loss for NaN at the end of each epoch instead of each step (no per-step wait for the GPU); None: on
#: every device but the CPU. Either way the run stops naming the first bad batch, before that epoch's checkpoint.
DEFER_NAN_CHECK: bool | None = None


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
            **({"val_pids": np.unique(data.val.pids).tolist()} if data.val is not None else {})}


def train(cfg: GateConfig, resume: bool = False) -> tuple[GateModel, TrainData, RunDir]:
    """Train the adapters and fusion from the cache; returns the model, the data it saw and its run directory."""
    data = load_train(cfg.cache, list(cfg.experts), cfg.val_ids)
    p = cfg.batch_size // cfg.instances
    if len(data.pids) < p:
        raise InputError(f"{cfg.cache}: {len(data.pids)} training identities, fewer than P = {p} needed for "
                         f"P x K = {p} x {cfg.instances} batches (a batch is P identities x K images, K = --instances): lower --batch-size to at most "
                         f"{len(data.pids) * cfg.instances}, or --instances")
    device = resolve_device(cfg.device)  # configuration errors before the run directory exists
    single_expert_index(cfg.fusion, data.families)
    if cfg.fusion == "moe-oracle" and (data.route is None or (data.route < 0).any()):
        raise InputError(f"--fusion moe-oracle routes by the known reliable expert of each image, which {cfg.cache} "
                         "does not record (only synthetic caches of the camera or dominant kind do)")
    rd, ckpt = RunDir.start(cfg.out, cfg, run_meta(data, list(cfg.experts)), resume)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    routing = cfg.routing()
    model = build_model(cfg.fusion, data.dims, data.families, len(data.pids), routing).to(device)
    # fused Adam: one kernel for all parameters (the foreach default spends 5x longer on the step here)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start_epoch = ckpt.restore(model, opt, rng) if ckpt else 0
    total = steps_per_epoch(data.labels, p, cfg.instances) * cfg.epochs
    per_epoch = total // cfg.epochs
    feats = [torch.from_numpy(f).to(device) for f in data.feats]
    labels_t = torch.from_numpy(data.labels).to(device)
    route_t = torch.from_numpy(data.route).to(device) if data.route is not None and cfg.fusion == "moe-oracle" else None
    route_targets = None
    if routing.route_by_loss and routing.route_target == "retrieval" and isinstance(model.fusion, Gated):
        route_targets = torch.from_numpy(retrieval_targets(data)).to(device)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        gate_learns = True
        if hasattr(model.fusion, "averaging"):
            model.fusion.averaging = epoch < routing.warmup * cfg.epochs
            gate_learns = not (routing.gate_freeze and not model.fusion.averaging)
            if routing.gate_freeze:
                model.fusion.freeze(not gate_learns)
        if routing.tau_anneal and hasattr(model.fusion, "tau_train"):  # 1.0 -> 0.5 over the run
            model.fusion.tau_train = TAU_TRAIN + (TAU_TEST - TAU_TRAIN) * epoch / max(1, cfg.epochs - 1)
        # running sums stay on the device (float64, as Python floats would add them): no host round trip per step
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "id", "triplet", "balance", "expert", "acc")}
        bad = torch.full((), -1, dtype=torch.int64, device=device)       # the first batch whose loss was not finite
        bad_value = torch.zeros((), dtype=torch.float32, device=device)
        batches = pk_batches(data.labels, p, cfg.instances, rng)
        for i, imgs in enumerate(progress(batches, desc=f"train-gate epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)):
            set_lr(opt, cosine_lr(cfg.lr, cfg.lr_min, epoch * per_epoch + i, total))
            views = rng.integers(0, data.n_views[imgs])  # the cached views are the augmentation
            rows = torch.from_numpy(data.row_start[imgs] + views).to(device)
            y = labels_t[torch.from_numpy(imgs).to(device)]
            fo, _, logits = model([f[rows] for f in feats], route_t[rows] if route_t is not None else None)
            l_id = id_loss(logits, y, cfg.label_smoothing)
            l_tri = batch_hard_triplet(fo.feature, y, cfg.margin)
            l_exp = logits.new_zeros(())
            if routing.expert_loss:  # each expert's adapted feature must stand alone, so the gate has real choices
                l_exp = routing.expert_loss * torch.stack([batch_hard_triplet(e, y, cfg.margin) for e in fo.experts]).mean()
            if routing.agreement:  # one space for every expert's feature, so routed images compare
                l_exp = l_exp + routing.agreement * agreement_loss(fo.experts)
            l_exp = l_exp + alignment_losses(model, fo.experts, y, routing, cfg.margin)
            if routing.route_by_loss and fo.gate_logits is not None and gate_learns:  # the gate learns which expert explains each image best
                if route_targets is not None:
                    target = route_targets[torch.from_numpy(imgs).to(device)]
                else:
                    target = model.expert_id_losses(fo.experts, y).detach().argmin(1)
                if (target != NO_TARGET).any():  # a batch with no target at all would give a NaN mean
                    l_exp = l_exp + routing.route_by_loss * F.cross_entropy(fo.gate_logits, target, ignore_index=NO_TARGET)
            loss = l_id + cfg.beta * l_tri + fo.aux_loss + l_exp
            if not (DEFER_NAN_CHECK if DEFER_NAN_CHECK is not None else device.type != "cpu"):
                rd.check_finite(loss, epoch, i)  # on CPU a check costs nothing: stop at once
            else:  # on a GPU, remember the first bad batch without waiting for it; the epoch's end stops the run
                first = (bad < 0) & ~torch.isfinite(loss.detach())
                bad = torch.where(first, torch.full_like(bad, i), bad)
                bad_value = torch.where(first, loss.detach().float(), bad_value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for key, v in (("loss", loss), ("id", l_id), ("triplet", l_tri), ("balance", fo.aux_loss), ("expert", l_exp)):
                sums[key] += v.detach().double()
            sums["acc"] += (logits.argmax(1) == y).float().mean().double()
        if int(bad) >= 0:  # raised before this epoch's checkpoint: the last good one stays
            rd.check_finite(bad_value, epoch, int(bad))
        n = max(1, len(batches))
        row = {"epoch": epoch + 1, **{k: float(v) / n for k, v in sums.items()}, "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0, **routing_row(model, data)}
        state = training_state(opt, rng)
        rd.checkpoint(epoch + 1, model.state_dict(), state, row)
        logger.info("epoch %d: loss %.4f (id %.4f, triplet %.4f) acc %.3f", epoch + 1, row["loss"], row["id"], row["triplet"], row["acc"])
    model.eval()
    return model, data, rd



def alignment_losses(model: GateModel, experts: list[torch.Tensor], y: torch.Tensor, routing: Routing, margin: float) -> torch.Tensor:
    """What puts every expert's retrieval feature in one space (docs/train-gate.md): each expert's own ID loss
    through the shared classifier, and a cross-expert triplet on BN'd, L2-normalised features, anchors embedded
    by one expert and positives and negatives by another, optionally moving only each image's unreliable expert."""
    loss = experts[0].new_zeros(())
    if not (routing.expert_id or routing.cross_expert):
        return loss
    necked = model.expert_necked(experts)
    own = torch.stack([F.cross_entropy(model.classifier(z), y, reduction="none") for z in necked], 1)  # (N, K)
    if routing.expert_id:
        loss = loss + routing.expert_id * own.mean()
    if routing.cross_expert and len(experts) > 1:
        unit = [F.normalize(z, dim=1) for z in necked]
        if routing.cross_detach:  # the image's reliable expert is the target, not the one that moves
            reliable = own.detach().argmin(1)
            unit = [F.normalize(z, dim=1) for z in model.expert_necked(experts, constant_stats=True)]  # no leak through BN
            unit = [torch.where((reliable == e)[:, None], u.detach(), u) for e, u in enumerate(unit)]
        pairs = [batch_hard_triplet(unit[a], y, margin, others=unit[b]) for a in range(len(unit)) for b in range(len(unit)) if a != b]
        loss = loss + routing.cross_expert * torch.stack(pairs).mean()
    return loss


def load_run(run: Path, device: str = "cpu") -> tuple[GateModel, GateConfig, dict]:
    """A finished run: its model in eval mode on ``device``, its config and the metadata (experts, weights, labels)."""
    rd, saved, meta, weights = RunDir.open(Path(run), GateConfig.command)
    saved.setdefault("gate_recipe", "paper")  # runs saved before routing recipes existed were trained with Eq. 7-9
    if "gate_input" in saved:  # a resolved config: a field it lacks did not exist, and the run trained without it
        for k in ROUTING_FIELDS:
            saved.setdefault(k, getattr(Routing(), k))
    cfg = GateConfig.from_dict(saved, f"{rd.path}/config.yaml")
    model = build_model(cfg.fusion, meta["dims"], meta["families"], meta["n_classes"], cfg.routing())
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, meta


__all__ = ["GateConfig", "build_model", "check_experts", "default_experts", "load_run", "train"]
