"""Two speed targets of ``featcache distill``, each side measured in the same run.

1. Pixel cache vs. JPEG decoding (target: at least 2x). A synthetic
   Market-1501 (real JPEGs) is extracted at 256x256 with the tiny presets and
   a gate is trained; then the student's input path is timed both ways over the
   same epoch of PK batches: (a) the DataLoader alone (read, check and rebuild
   each cached view: SHA-1 + JPEG decode + letterbox vs. an HDF5 row + CRC-32),
   and (b) whole training epochs of ``featcache distill`` (ResNet-18, random
   init), whose images/s the training log records.

2. Student vs. teacher inference (target: at least 10x for ResNet-18 against
   both backbones). ``featcache profile`` on the distilled ResNet-18 and on the
   whole teacher: CLIP ViT-B/16 and ALIGN EfficientNet-B7 (full size, random
   weights: they cost what trained ones do), adapters and gate, at 256x256, on
   the chosen device. The teacher's gate run is trained on a synthetic feature
   cache with those presets' widths (768 and 640).

    python benchmarks/distill_speed.py [--device cpu|cuda] [--ids 40] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featcache.distill.config import DistillConfig  # noqa: E402
from featcache.training.rundir import RunDir  # noqa: E402
from featcache.distill.data import ViewDataset, load_teacher  # noqa: E402
from featcache.cache.pixelcache import build_pixel_cache  # noqa: E402
from featcache.distill.profile import profile_models  # noqa: E402
from featcache.distill.runner import run_distill  # noqa: E402
from featcache.extract.config import ExtractConfig  # noqa: E402
from featcache.extract.runner import run_extract  # noqa: E402
from featcache.gate.config import GateConfig  # noqa: E402
from featcache.gate.runner import run_train_gate  # noqa: E402
from featcache.synth import SynthConfig, generate  # noqa: E402
from featcache.synth_cache import write_feature_cache  # noqa: E402
from featcache.training.sampling import pk_batches  # noqa: E402


def loader_rate(ds: ViewDataset, keys: list[list[tuple[int, int]]], workers: int) -> float:
    """Images/s of one pass of the DataLoader over ``keys`` (batches of (image row, view))."""
    loader = torch.utils.data.DataLoader(ds, batch_sampler=keys, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - t0)


def epoch_rate(run: Path) -> list[float]:
    return [float(r["images_per_s"]) for r in RunDir(run).log_rows()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ids", type=int, default=40, help="identities of the synthetic Market-1501")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs timed on each side")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers on both sides")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=("pixels", "profile"), help="run one of the two parts")
    args = ap.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
        tmp = Path(tmp)
        root, cache, gate = tmp / "market", tmp / "market.h5", tmp / "gate"
        generate(SynthConfig(root, "market1501", ids=args.ids, cams=6, seed=0))
        run_extract(ExtractConfig(dataset="market1501", root=root, backbones=("clip-tiny", "align-tiny"), out=cache,
                                  views=4, image_size=(256, 256), device=args.device))
        run_train_gate(GateConfig.from_dict(dict(cache=cache, out=gate, epochs=2, device=args.device)))

        if args.only != "profile":
            pixels_part(tmp, cache, gate, args)
        if args.only != "pixels":
            profile_part(tmp, cache, gate, args)


def pixels_part(tmp: Path, cache: Path, gate: Path, args) -> None:
    # --- 1a: the input path alone
    t0 = time.perf_counter()
    built = build_pixel_cache(tmp / "px.h5", cache)
    build_s = time.perf_counter() - t0
    teacher = load_teacher(gate, cache)
    rng = np.random.default_rng(0)
    keys = []
    for _ in range(5):  # five epochs of PK batches
        for b in pk_batches(teacher.labels, 8, 4, rng):
            views = rng.integers(0, teacher.n_views[b])
            keys.append([(int(teacher.images[i]), int(v)) for i, v in zip(b, views)])
    n_img = sum(map(len, keys))
    jpeg, px = ViewDataset(cache, None, None), ViewDataset(cache, None, tmp / "px.h5")
    loader_rate(jpeg, keys[:2], args.workers), loader_rate(px, keys[:2], args.workers)  # warm the page cache
    r_jpeg = max(loader_rate(jpeg, keys, args.workers) for _ in range(3))
    r_px = max(loader_rate(px, keys, args.workers) for _ in range(3))
    print(f"\n1a. input path, five epochs of PK batches ({n_img} views at 256x256, {args.workers} workers; best of 3)")
    print(f"    JPEG decode each time: {r_jpeg:8.1f} img/s")
    print(f"    pixel cache:           {r_px:8.1f} img/s   ratio {r_px / r_jpeg:.2f}x")
    print(f"    (building the pixel cache: {built['images']} images in {build_s:.1f} s, "
          f"{(tmp / 'px.h5').stat().st_size / 2**20:.0f} MiB)")

    # --- 1b: whole training epochs
    rates = {}
    for name, pixels in (("jpeg", None), ("pixel cache", tmp / "px.h5")):
        cfg = DistillConfig(cache=cache, gate=gate, out=tmp / f"student-{name.replace(' ', '-')}", student_init="random",
                            epochs=args.epochs, device=args.device, pixel_cache=pixels, workers=args.workers)
        run_distill(cfg)
        rates[name] = epoch_rate(cfg.out)
    print(f"\n1b. distill training epochs (resnet18, all six loss terms, batch 32, device {args.device})")
    for name, r in rates.items():
        print(f"    {name:12s} {np.mean(r):8.1f} img/s  (epochs: {', '.join(f'{x:.1f}' for x in r)})")
    print(f"    ratio {np.mean(rates['pixel cache']) / np.mean(rates['jpeg']):.2f}x")


def profile_part(tmp: Path, cache: Path, gate: Path, args) -> None:
    student = tmp / "student-profiled"
    if not RunDir(student).is_finished():
        run_distill(DistillConfig(cache=cache, gate=gate, out=student, student_init="random", epochs=1, device=args.device))
    # --- 2: student vs. the whole teacher
    feat = write_feature_cache(tmp / "feat.h5", ids=16, per_id=4, cams=4, views=2,
                               experts={"clip-vit-b16": ("open_clip", 768), "align-b7": ("align", 640)})
    big_gate = tmp / "gate-full"
    run_train_gate(GateConfig.from_dict(dict(cache=feat, out=big_gate, epochs=1, device=args.device)))
    rows = profile_models([f"student:{student}", f"gate:{big_gate}"], args.device, image_size=(256, 256),
                          batch_sizes=(1, 64), repeats=args.repeats)  # on CPU each in its own process (RSS)
    s, t = rows
    print(f"\n2. inference at {s['image_size']} on {s['device']}, median of {args.repeats}")
    for r in rows:
        print(f"    {r['arch']:40s} params {r['parameters'] / 1e6:7.2f} M  GFLOPs/img {r['flops_per_image'] / 1e9:7.2f}  "
              f"ms@b1 {r['latency_ms'][1]:8.1f}  img/s@b64 {r['images_per_s'][64]:8.1f}  peak {r['peak_memory_mib'][64]:.0f} MiB")
    print(f"    student / teacher images/s at batch 64: {s['images_per_s'][64] / t['images_per_s'][64]:.1f}x; "
          f"at batch 1: {t['latency_ms'][1] / s['latency_ms'][1]:.1f}x; "
          f"FLOPs {t['flops_per_image'] / s['flops_per_image']:.1f}x")
    print(json.dumps({"teacher_image_size_source": t["image_size_source"], "teacher_weights": t["weights"]}))


if __name__ == "__main__":
    main()
