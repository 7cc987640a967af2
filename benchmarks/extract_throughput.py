"""Extraction throughput: the whole pipeline against the backbones' forward pass alone.

Both sides see the same images, grouped into the same batches, on the same
device: the backbone-only side runs the mapper (normalise, forward, copy to
host) on views decoded beforehand; the pipeline side is ``run_extract``
(decoding workers, inference, background HDF5 writes) into a fresh cache.
The backbone-only side is timed before and after the pipeline, every batch
shape warmed first, and the faster time is the reference. Prints images/s for each and the ratio (target: pipeline >= 0.85 x backbone-only).

    python benchmarks/extract_throughput.py --backbone clip-vit-b16 --backbone align-b7 --random-init --ids 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchkit import device_line  # noqa: E402  (first: offline hubs)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from featcache.backbones import build_backbone  # noqa: E402
from featcache.datasets import load_listing  # noqa: E402
from featcache.extract.mapper import Mapper, stored_from_specs  # noqa: E402
from featcache.extract.reader import BlockSampler, ImageReader, collate  # noqa: E402
from featcache.extract.config import ExtractConfig  # noqa: E402
from featcache.extract.runner import run_extract  # noqa: E402
from featcache.runtime import resolve_device, resolve_workers  # noqa: E402
from featcache.synth import SynthConfig, generate  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
        run(Path(tmp))


def run(tmp: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", required=True)
    ap.add_argument("--root", type=Path, help="a Market-1501-layout dataset (default: a synthetic one)")
    ap.add_argument("--ids", type=int, default=4, help="identities of the synthetic dataset")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: featcache's auto)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--random-init", action="store_true", help="full-size presets with random weights (speed only)")
    args = ap.parse_args()

    root = args.root or tmp / "market"
    if args.root is None:
        generate(SynthConfig(root, "market1501", ids=args.ids, cams=4, seed=0))
    size = (args.image_size, args.image_size)
    device = resolve_device(args.device)
    listing = load_listing("market1501", root)
    n_views = {"train": args.views, "query": min(args.views, 2), "gallery": min(args.views, 2)}

    # backbone only: decode everything first, then time the mapper on the same blocks
    backbones = {n: build_backbone(n, size, random_init=args.random_init) for n in args.backbone}
    specs = {n: b.output_specs() for n, b in backbones.items()}
    mapper = Mapper(backbones, stored_from_specs(specs, "view0"), device)
    reader = ImageReader(listing.root, listing.items, size, n_views, 0)
    blocks = BlockSampler(len(listing.items), args.batch_size, np.ones(len(listing.items), dtype=bool)).blocks
    batches = [collate([reader[i] for i in b]) for b in blocks]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]

    def run_mapper(b) -> None:
        m = mapper(b.nchw(), b.first_view)
        m.wait()
        m.release()

    for shape in {tuple(b.views.shape) for b in batches}:  # warm every batch shape (allocator, kernel caches)
        run_mapper(next(b for b in batches if tuple(b.views.shape) == shape))

    def time_backbones() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for b in batches:
            run_mapper(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    t_before = time_backbones()
    n_img = len(listing.items)

    # the whole pipeline into a fresh cache
    cfg = ExtractConfig(dataset="market1501", root=root, backbones=tuple(args.backbone), out=tmp / "bench.h5", views=args.views,
                        batch_size=args.batch_size, workers=args.workers, device=args.device, image_size=size, random_init=args.random_init)
    res = run_extract(cfg)
    t_after = time_backbones()  # again after the pipeline: the faster of the two is the reference
    t_backbone = min(t_before, t_after)
    if res.processed != n_img:
        raise SystemExit(f"pipeline processed {res.processed} of {n_img} images")

    bb, pipe = n_img / t_backbone, res.images_per_second
    print(f"device: {device_line(device)}")
    print(f"backbones: {', '.join(args.backbone)}; {n_img} images, {sum(b.views.shape[0] for b in batches)} views; batch {args.batch_size}; workers {resolve_workers(args.workers, device)}; input {size}")
    print(f"backbone only : {bb:8.2f} img/s (best of {t_before:.1f} s before and {t_after:.1f} s after the pipeline)")
    print(f"pipeline      : {pipe:8.2f} img/s ({res.seconds:.1f} s)")
    print(f"ratio pipeline/backbone-only: {pipe / bb:.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main()
