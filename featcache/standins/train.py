"""Pre-training one stand-in: its tiny architecture, trained for re-ID on the pre-training set seen through its view.

The backbone is built exactly as extraction builds it (the family's own class and its fixed seed-0 random init; the
config's seed sets the batch order and the views) and trained
on the output extraction caches (``pooled``), through a BN neck and an ID classifier with label-smoothed
cross-entropy and a batch-hard triplet loss. It is then saved in its family's own checkpoint format (an open_clip
state dict in safetensors; a transformers ``save_pretrained`` directory), so that extraction loads it through
``--weights`` like any real checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.backbones.base import Backbone, family_builder
from featcache.backbones.presets import get_preset
from featcache.progress import progress
from featcache.standins.config import StandinConfig
from featcache.standins.views import VIEWS
from featcache.training.losses import batch_hard_triplet, id_loss
from featcache.training.sampling import pk_batches, steps_per_epoch
from featcache.training.schedule import cosine_lr, set_lr

logger = logging.getLogger(__name__)


def train_standin(name: str, cfg: StandinConfig, images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[Backbone, list[dict]]:
    """The trained backbone (eval mode, frozen) and its per-epoch log."""
    preset = get_preset(name)
    view = VIEWS.get(preset.standin.get("view", ""))
    epochs, lr = cfg.schedule(name)
    torch.manual_seed(cfg.seed)
    backbone = family_builder(preset.family)(preset, cfg.image_size, None, True).to(device)
    backbone.train().requires_grad_(True)
    dim = backbone.output_specs()["pooled"].shape[0]
    backbone.train()
    neck = nn.BatchNorm1d(dim).to(device)
    head = nn.Linear(dim, int(labels.max()) + 1, bias=False).to(device)
    params = [*backbone.parameters(), *neck.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    p = cfg.batch_size // cfg.instances
    per_epoch = steps_per_epoch(labels, p, cfg.instances)
    total = per_epoch * epochs
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W), shared
    y_all = torch.from_numpy(labels)
    log: list[dict] = []
    for epoch in range(epochs):
        t0, sums, n = time.perf_counter(), {"id": 0.0, "triplet": 0.0, "acc": 0.0}, 0
        for i, idx in enumerate(progress(pk_batches(labels, p, cfg.instances, rng), leave=False, unit="batch",
                                         desc=f"pretrain-standins {name} epoch {epoch + 1}/{epochs}")):
            set_lr(opt, cosine_lr(lr, cfg.lr_min, epoch * per_epoch + i, total))
            x = view(pixels[torch.from_numpy(idx)].float() / 255.0, g).to(device)
            y = y_all[torch.from_numpy(idx)].to(device)
            f = backbone((x - backbone.mean) / backbone.std)["pooled"]
            logits = head(neck(f))
            l_id, l_tri = id_loss(logits, y, 0.1), batch_hard_triplet(f, y, 0.3)
            opt.zero_grad(set_to_none=True)
            (l_id + l_tri).backward()
            opt.step()
            sums["id"] += float(l_id.detach())
            sums["triplet"] += float(l_tri.detach())
            sums["acc"] += float((logits.argmax(1) == y).float().mean())
            n += 1
        row = {"epoch": epoch + 1, **{k: v / max(1, n) for k, v in sums.items()}, "seconds": time.perf_counter() - t0}
        log.append(row)
        logger.info("%s epoch %d: id %.3f triplet %.3f acc %.3f (%.0f s)", name, epoch + 1, row["id"], row["triplet"], row["acc"], row["seconds"])
    return backbone.eval().requires_grad_(False), log


def save_standin(backbone: Backbone, folder: Path) -> Path:
    """Write the trained weights in the family's checkpoint format under ``folder``; returns what --weights takes."""
    folder.mkdir(parents=True, exist_ok=True)
    if backbone.family == "open_clip":
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in backbone.clip_model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        return folder
    from featcache.backbones.align import quiet_transformers

    quiet_transformers()
    backbone.model.save_pretrained(folder, safe_serialization=True)
    return folder
