"""Synthetic feature caches in the real cache format, for train-gate tests and benchmarks without extraction.

Identity i has a latent z_i; expert e sees tanh(W_e z_i), scaled down on the
cameras where that expert is unreliable, plus a strong per-camera bias and
per-view noise. Raw features therefore match cameras more than identities,
and each expert is the better one on half of the cameras: something for
adapters and a gate to learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.cache import BatchResult, CacheWriter, create_cache, make_identity
from featcache.cache.spec import OutputSpec
from featcache.datasets import Item, Listing
from featcache.errors import check_choice
from featcache.preprocess import PARAMS

EXPERTS = {"clip-sim": ("open_clip", 768), "align-sim": ("align", 640)}
KINDS = ("camera", "dominant", "twin")


def write_feature_cache(path: Path, ids: int = 60, per_id: int = 8, cams: int = 6, views: int = 4, seed: int = 0,
                        experts: dict[str, tuple[str, int]] | None = None, latent: int = 32, kind: str = "camera") -> Path:
    """``kind``: ``camera`` (each expert reliable on half of the cameras), ``dominant`` (the first expert better
    everywhere), ``twin`` (equally good experts with independent noise). ``synthetic/route`` records, per view
    row, the expert known to be reliable (-1 for twin), for the oracle router."""
    check_choice(kind, KINDS, "kind", ValueError)
    path = Path(path)
    experts = experts or EXPERTS
    rng = np.random.default_rng(seed)
    items = []
    for split, pid_range in (("train", range(1, ids + 1)), ("query", range(ids + 1, ids + 1 + ids // 2)), ("gallery", range(ids + 1, ids + 1 + ids // 2))):
        for pid in pid_range:
            n = per_id if split != "query" else 2
            for k in range(n):
                cam = int(rng.integers(1, cams + 1)) if split != "query" else 1 + k % cams
                items.append(Item(f"{split}/{pid:04d}_{k}.jpg", pid, cam, split))
    listing = Listing("csv", path.parent / "synthetic", items)
    n_views = {"train": views, "query": 2, "gallery": 2}
    identity = make_identity(listing, {"synthetic": True, "image_size": [256, 256], "resize": "none", "views": n_views},
                             {e: {"family": f, "weights": f"synthetic:seed={seed}", "preset": {}} for e, (f, _) in experts.items()})
    specs = {e: {"pooled": OutputSpec((d,), "float32", "synthetic pooled feature")} for e, (_, d) in experts.items()}
    create_cache(path, listing, identity, n_views, specs, "none")
    z = rng.normal(size=(ids * 2 + 2, latent))
    n_img = len(items)
    nv = np.array([n_views[it.split] for it in items], dtype=np.int64)
    rows_img = np.repeat(np.arange(n_img), nv)
    view = np.arange(len(rows_img)) - np.repeat(np.cumsum(nv) - nv, nv)
    pid = np.array([it.pid for it in items])[rows_img]
    cam = np.array([it.camid for it in items])[rows_img]
    outputs = {}
    for e_i, (e, (_, d)) in enumerate(experts.items()):
        w = rng.normal(size=(latent, d)) / np.sqrt(latent)
        bias = rng.normal(scale=1.5, size=(cams + 1, d))
        if kind == "camera":
            good = (cam % 2) == e_i % 2  # each expert is reliable on half of the cameras
        else:
            good = np.full(len(cam), kind == "twin" or e_i == 0)
        signal = np.tanh(z[pid] @ w) * np.where(good, 1.0, 0.25)[:, None]
        x = signal + bias[cam] + rng.normal(scale=0.6, size=(len(pid), d))
        outputs[e] = {"pooled": x.astype(np.float32)}
    params = np.zeros((len(rows_img), len(PARAMS)), np.int16)
    params[:, 0] = params[:, 1] = 10  # no image files behind these rows: a fixed crop, flipped on odd views
    params[:, 2] = view % 2
    batch = BatchResult(
        images=list(range(n_img)), failed_mask=np.zeros(n_img, bool), reasons=[""] * n_img, ok_images=list(range(n_img)),
        widths=np.zeros(n_img, np.int32), heights=np.zeros(n_img, np.int32), sha1=np.full(n_img, b"", dtype="S40"),
        params=params, first_view_index=np.cumsum(nv) - nv, outputs=outputs,
    )
    route = {"camera": (cam % 2) % len(experts), "dominant": np.zeros(len(cam), np.int64),
             "twin": np.full(len(cam), -1)}[kind]
    writer = CacheWriter(path)
    try:
        writer.write(batch)
        writer.annotate_route(route, kind, list(experts))
    finally:
        writer.close()
    return path
