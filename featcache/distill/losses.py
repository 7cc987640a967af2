"""The distillation losses of Eq. 10-12 and 16, as featcache reads them (docs/distill.md states each choice).

- ``kd_loss`` (Eq. 16): T^2 * KL(p_t || p_s) of the temperature-T softmaxes (T = 4), mean over the batch,
  against the cached teacher logits z_t.
- ``feature_loss`` (Eq. 10): mean over the batch of the squared L2 distance between a student feature and the
  teacher's. Which features is the trainer's choice (``kd_space``): by default both L2-normalised retrieval
  features (the student's BN output, the teacher's ranked feature), so that the term lies in [0, 4] whatever the
  teacher's scale; literally, the student's FC output and the teacher's raw fused F_t (norms of 12-40 at a
  gate's initialisation, so that no fixed weight means the same from one teacher to the next).
- ``attention_loss`` (Eq. 11): for each of the student's stages, the L2 distance between its L2-normalised
  spatial attention map and the teacher's. The teacher's map for an image is each expert's cached map, resized
  to the student's grid and L2-normalised, mixed by that image's gate weights and normalised again; the sum is
  over stages of the batch mean. Scale-free as written: each stage's term lies in [0, 2].
- ``relation_loss`` (Eq. 12): squared Frobenius distance between the Frobenius-normalised N x N Gram matrices
  of the batch's student and teacher features (relations between samples), the same features as
  ``feature_loss``: free of the features' global scale as written, and of each row's scale on the unit features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

T_KD = 4.0


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float = T_KD) -> torch.Tensor:
    """Eq. 16: T^2 KL(softmax(z_t / T) || softmax(z_s / T)), batch mean."""
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1), reduction="batchmean") * t * t


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 10: (1/N) sum_i ||F_s(x_i) - F_t(x_i)||_2^2."""
    return (student - teacher).pow(2).sum(1).mean()


def _unit(a: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.flatten(1), dim=1)


def mixed_teacher_map(maps: list[torch.Tensor], gates: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h*w) unit vectors: each expert's (N, H, W) map resized to ``size`` and normalised, mixed by ``gates`` (N, K)."""
    resized = [_unit(F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]) for m in maps]
    mixed = sum(g[:, None] * r for g, r in zip(gates.T, resized))
    return F.normalize(mixed, dim=1)


def attention_loss(student_maps: list[torch.Tensor], teacher_maps: list[list[torch.Tensor]], gates: torch.Tensor) -> torch.Tensor:
    """Eq. 11: sum over stages j of the batch mean of || A_s / ||A_s|| - A_t / ||A_t|| ||_2.

    ``student_maps[j]``: (N, h, w); ``teacher_maps[j][k]``: expert k's (N, H, W) map paired with stage j.
    """
    total = student_maps[0].new_zeros(())
    for a_s, experts in zip(student_maps, teacher_maps, strict=True):
        a_t = mixed_teacher_map(experts, gates, tuple(a_s.shape[-2:]))
        total = total + (_unit(a_s) - a_t).norm(dim=1).mean()
    return total


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 12: || G_s / ||G_s||_F - G_t / ||G_t||_F ||_F^2 with G = F F^T over the batch (N x N)."""
    gs, gt = student @ student.T, teacher @ teacher.T
    return (gs / gs.norm() - gt / gt.norm()).pow(2).sum()
