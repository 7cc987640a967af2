"""Distillation's objective: L_total = L_id + beta L_tri + lambda_kd L_KD + lambda_feat L_feat + lambda_att L_att
+ lambda_rel L_rel (Eq. 13-16, with the readings of ``featcache.distill.losses``), and its measurement.

Every term is computed each step, also when ``--losses`` switches it off (then without gradient), so runs with
and without a term compare in their logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from featcache.distill.config import DistillConfig
from featcache.distill.data import Teacher, ViewDataset, attention_names
from featcache.distill.inputs import HostTeacher, TeacherBatch
from featcache.distill.losses import attention_loss, feature_loss, kd_loss, relation_loss
from featcache.distill.students import Student, StudentOutputs, normalize
from featcache.training.losses import batch_hard_triplet, id_loss


def loss_terms(out: StudentOutputs, b: TeacherBatch, cfg: DistillConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """Each term of L_total, computed on demand (so a switched-off term can run without gradient).

    With ``kd_space`` retrieval, L_feat and L_rel compare the L2-normalised retrieval features (the student's BN
    output, the teacher's ranked feature); with literal, the student's FC output and the teacher's raw F_t."""
    emb, logits = out.embedding.float(), out.logits.float()
    s_kd = F.normalize(out.feature.float(), dim=1) if cfg.kd_space == "retrieval" else emb
    t_kd = b.f_t
    terms = {
        "id": lambda: id_loss(logits, b.y),
        "tri": lambda: batch_hard_triplet(emb, b.y, cfg.margin),
        "kd": lambda: kd_loss(logits, b.z_t, cfg.kd_temperature),
    }
    if t_kd is not None:  # None: version-1 targets, no retrieval feature (then feat and rel are off, checked at load)
        terms["feat"] = lambda: feature_loss(s_kd, t_kd)
        terms["rel"] = lambda: relation_loss(s_kd, t_kd)
    if b.maps is not None:
        terms["att"] = lambda: attention_loss([m.float() for m in out.maps], b.maps, b.gates)
    return terms


def total_loss(out: StudentOutputs, b: TeacherBatch, cfg: DistillConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_total over the terms switched on, and every term's value (a switched-off one without gradient), with the
    batch's training accuracy."""
    values = {}
    loss = b.z_t.new_zeros(())
    for name, fn in loss_terms(out, b, cfg).items():
        w = cfg.weight(name)
        if w:
            values[name] = fn()
            loss = loss + w * values[name]
        else:  # switched off: logged, not trained
            with torch.no_grad():
                values[name] = fn()
    values["acc"] = (out.logits.argmax(1) == b.y).float().mean()
    return loss, values


@torch.inference_mode()
def measure_terms(model: Student, teacher: Teacher, dataset: ViewDataset, cache: Path, cfg: DistillConfig, device: torch.device,
                  batch: int = 32) -> dict[str, float]:
    """Each term's mean over every cached training view, in eval mode, in fixed batches: comparable between
    models (before and after training, with and without a term), unlike the training log's running means."""
    model.eval()
    imgs = np.repeat(np.arange(len(teacher.images)), teacher.n_views)
    views = np.concatenate([np.arange(n) for n in teacher.n_views])
    starts = range(0, len(imgs), batch)
    batches, batch_views = [imgs[s: s + batch] for s in starts], [views[s: s + batch] for s in starts]
    host = HostTeacher(teacher, cache, attention_names(cache, teacher.experts, required=False), device, cfg.kd_space)  # chunked reads
    sums: dict[str, float] = {}
    n = 0
    for i, v, b in zip(batches, batch_views, host.epoch(batches, batch_views)):
        pixels = torch.stack([dataset[(int(teacher.images[a]), int(c))] for a, c in zip(i, v)])
        out = model.outputs(normalize(pixels.to(device)))
        for name, fn in loss_terms(out, b, cfg).items():
            sums[name] = sums.get(name, 0.0) + float(fn()) * len(i)
        n += len(i)
    return {k: v / n for k, v in sums.items()}
