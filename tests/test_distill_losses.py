"""The distillation losses (Eq. 10-12, 16) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from featcache.distill.losses import attention_loss, feature_loss, kd_loss, mixed_teacher_map, relation_loss


def test_kd_loss_by_hand():
    zs, zt = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    ps = torch.softmax(zs / 4, 1)[0]
    pt = torch.softmax(zt / 4, 1)[0]
    want = 16 * float((pt * (pt / ps).log()).sum())
    assert kd_loss(zs, zt).item() == pytest.approx(want, rel=1e-5)
    assert kd_loss(zt, zt).item() == pytest.approx(0.0, abs=1e-5)
    two = kd_loss(torch.cat([zs, zt]), torch.cat([zt, zt]))
    assert two.item() == pytest.approx(want / 2, rel=1e-5)  # batch mean


def test_feature_loss_by_hand():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    assert feature_loss(s, t).item() == pytest.approx((4 + 2) / 2)


def test_relation_loss_by_hand_and_scale_free():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    gs = torch.eye(2) / math.sqrt(2)
    gt = torch.ones(2, 2) / 2
    assert relation_loss(s, t).item() == pytest.approx(float((gs - gt).pow(2).sum()))
    assert relation_loss(3 * s, 5 * s).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_pairs_resizes_and_mixes_by_gate():
    torch.manual_seed(0)
    a = torch.rand(2, 8, 4)          # expert 0's map at the teacher's grid
    b = torch.rand(2, 8, 4)          # expert 1's
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # image 0 routed to expert 0, image 1 to expert 1
    student = torch.rand(2, 4, 2)
    m = mixed_teacher_map([a, b], gates, (4, 2))
    ra = torch.nn.functional.interpolate(a[:, None], size=(4, 2), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    rb = torch.nn.functional.interpolate(b[:, None], size=(4, 2), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    torch.testing.assert_close(m[0], ra[0] / ra[0].norm())
    torch.testing.assert_close(m[1], rb[1] / rb[1].norm())
    s = student.flatten(1)
    want = ((s[0] / s[0].norm() - m[0]).norm() + (s[1] / s[1].norm() - m[1]).norm()) / 2
    got = attention_loss([student, student * 2], [[a, b], [a, b]], gates)  # two stages; scale of a map does not matter
    assert got.item() == pytest.approx(2 * want.item(), rel=1e-5)
    same = attention_loss([ra.view(2, 4, 2)], [[a, a]], torch.full((2, 2), 0.5))
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_soft_gates_mix_each_images_experts_with_that_images_weights():
    """Asymmetric gates, so mixing by the wrong axis (images for experts) gives another map."""
    torch.manual_seed(1)
    a, b = torch.rand(2, 8, 4), torch.rand(2, 8, 4)
    gates = torch.tensor([[0.7, 0.3], [0.2, 0.8]])  # rows: images; columns: experts
    m = mixed_teacher_map([a, b], gates, (8, 4))
    ua, ub = a.flatten(1) / a.flatten(1).norm(dim=1, keepdim=True), b.flatten(1) / b.flatten(1).norm(dim=1, keepdim=True)
    for i in range(2):
        want = gates[i, 0] * ua[i] + gates[i, 1] * ub[i]
        torch.testing.assert_close(m[i], want / want.norm())
