"""Letterboxing and the stored view parameters rebuild exact pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featcache.preprocess import AUG_PAD, apply_view, letterbox, parse_size, view_params


def test_letterbox_keeps_aspect_and_pads_with_zeros():
    img = Image.new("RGB", (64, 128), (200, 100, 50))
    out = letterbox(img, (256, 256))
    assert out.shape == (256, 256, 3)
    assert (out[:, :64] == 0).all() and (out[:, -64:] == 0).all()  # 64x128 -> 128x256, centred
    assert (out[:, 64:192] == (200, 100, 50)).all()
    assert letterbox(img, (256, 128)).min() > 0  # same aspect: no padding


def test_view_params_are_seeded_per_image_and_view():
    p = view_params(6, seed=0, index=7)
    assert p.shape == (6, 10) and tuple(p[0]) == (AUG_PAD, AUG_PAD, 0, *[0] * 7) and tuple(p[1]) == (AUG_PAD, AUG_PAD, 1, *[0] * 7)
    assert np.array_equal(p, view_params(6, 0, 7))
    assert not np.array_equal(p[2:], view_params(6, 0, 8)[2:])
    assert ((p[2:, :2] >= 0) & (p[2:, :2] <= 2 * AUG_PAD)).all()


def test_apply_view():
    base = np.random.default_rng(0).integers(0, 255, (32, 16, 3), dtype=np.uint8)
    assert np.array_equal(apply_view(base, AUG_PAD, AUG_PAD, 0), base)
    assert np.array_equal(apply_view(base, AUG_PAD, AUG_PAD, 1), base[:, ::-1])
    shifted = apply_view(base, AUG_PAD + 3, AUG_PAD - 2, 0)  # content moves left 3, down 2
    assert np.array_equal(shifted[2:, :-3], base[:-2, 3:]) and (shifted[:2] == 0).all()


def test_parse_size():
    assert parse_size("256") == (256, 256) and parse_size("256x128") == (256, 128)
    with pytest.raises(ValueError, match="HxW"):
        parse_size("big")


def test_random_erasing_draws_replay_to_the_same_pixels():
    from featcache.preprocess import ERASE_FILL, render_views
    from PIL import Image

    per_image = np.stack([view_params(12, seed=3, index=i, size=(64, 32)) for i in range(40)])
    assert (per_image[:, :2, 3:] == 0).all()  # views 0 and 1 are never erased
    aug = per_image[:, 2:].reshape(-1, 10)
    erased = aug[aug[:, 5] > 0]
    assert 0.35 < len(erased) / len(aug) < 0.65  # p = 0.5
    h, w = 64, 32
    assert ((erased[:, 3] + erased[:, 5] <= w) & (erased[:, 4] + erased[:, 6] <= h)).all()
    assert (erased[:, 7:] == ERASE_FILL).all()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 40, 3), dtype=np.uint8))
    v = render_views(img, (h, w), erased[:3])
    ex, ey, ew, eh = map(int, erased[0, 3:7])
    assert (v[0, ey: ey + eh, ex: ex + ew] == ERASE_FILL).all()
    assert np.array_equal(v, render_views(img, (h, w), erased[:3]))  # the stored parameters replay exactly
