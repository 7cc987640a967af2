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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.backbones.base import Backbone, family_builder
from featcache.backbones.presets import get_preset
from featcache.standins.config import StandinConfig
from featcache.standins.views import VIEWS
from featcache.training.loop import Epoch, Loop, Schedule, Step
from featcache.training.losses import batch_hard_triplet, id_loss
from featcache.training.sampling import pk_batches, steps_per_epoch

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
    model = ReidHead(backbone, dim, int(labels.max()) + 1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    p = cfg.batch_size // cfg.instances
    schedule = Schedule(epochs, steps_per_epoch(labels, p, cfg.instances), lr, cfg.lr_min)
    stage = StandinStage(model, view, images, labels, p, cfg.instances, cfg.seed, device)
    log = Loop(model, opt, schedule, rng, device, desc=f"pretrain-standins {name}").fit(stage)
    return backbone.eval().requires_grad_(False), log


class ReidHead(nn.Module):
    """A stand-in's backbone with the BN neck and ID classifier it is trained through (only the backbone is kept)."""

    def __init__(self, backbone: Backbone, dim: int, n_classes: int) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = backbone, nn.BatchNorm1d(dim), nn.Linear(dim, n_classes, bias=False)


class StandinStage:
    """Pre-training's side of the shared loop: PK batches of the rendered set, seen through the preset's view, and
    the ID (label-smoothed) and batch-hard triplet losses."""

    columns = ("loss", "id", "triplet", "acc")

    def __init__(self, model: ReidHead, view, images: np.ndarray, labels: np.ndarray, p: int, k: int, seed: int,
                 device: torch.device) -> None:
        self.model, self.view, self.p, self.k, self.device = model, view, p, k, device
        self.labels = labels
        self.pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W), shared
        self.y = torch.from_numpy(labels)
        self.g = torch.Generator().manual_seed(seed)  # the views' randomness, apart from the batch order's

    def begin_epoch(self, epoch: int, rng: np.random.Generator) -> Epoch:
        batches = pk_batches(self.labels, self.p, self.k, rng)
        return Epoch(batches, len(batches), sum(map(len, batches)))

    def step(self, idx: np.ndarray) -> Step:
        m = self.model
        x = self.view(self.pixels[torch.from_numpy(idx)].float() / 255.0, self.g).to(self.device)
        y = self.y[torch.from_numpy(idx)].to(self.device)
        f = m.backbone((x - m.backbone.mean) / m.backbone.std)["pooled"]
        logits = m.head(m.neck(f))
        l_id, l_tri = id_loss(logits, y, 0.1), batch_hard_triplet(f, y, 0.3)
        return Step(l_id + l_tri, {"id": l_id, "triplet": l_tri, "acc": (logits.argmax(1) == y).float().mean()})

    def end_epoch(self, epoch: int) -> dict:
        return {}


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
