"""gpu_check's training sections: a train-gate epoch and the student's training on the device input path, with the
host syncs inside their steps counted by a training-loop hook (nothing patched)."""

from __future__ import annotations

import time

from featcache.cache.pixelcache import build_pixel_cache
from featcache.training.rundir import RunDir
from featcache.cache.describe import split_stats
from featcache.distill.config import DistillConfig
from featcache.distill.runner import run_distill
from featcache.distill.train import input_path_rate
from featcache.extract.config import ExtractConfig
from featcache.extract.runner import run_extract
from featcache.gate.config import GateConfig
from featcache.gate.runner import run_train_gate
from featcache.gate.train import train
from featcache.synth import SynthConfig, generate
from featcache.synth_cache import write_feature_cache
from featcache.training.hooks import added
from gpucheck.common import Context, HostSyncs, at_most, verdict


def section_gate(c: Context) -> None:
    """A Market-size train-gate epoch after a warm-up epoch (< 1 s), the host syncs inside its steps, and the
    step's time at 8x the batch (launch-bound or arithmetic-bound)."""
    s, table, tmp = c.setup, c.table, c.tmp
    gpu = s.gpu
    ids, per_id = s.gate_ids
    cache = write_feature_cache(tmp / "gate-cache.h5", ids=ids, per_id=per_id, cams=6, views=4)

    def epochs(batch: int, out: str) -> tuple[float, float, int]:
        train(GateConfig.from_dict(dict(cache=cache, out=tmp / out, experts=("clip-sim", "align-sim"), fusion="moe-top1", epochs=2, seed=42, batch_size=batch, device=s.device.type)))
        rows = RunDir(tmp / out).log_rows()
        steps = round(float(rows[1]["images_per_s"]) * float(rows[1]["seconds"]) / batch)  # the epoch's PK batches
        return float(rows[0]["seconds"]), float(rows[1]["seconds"]), steps

    syncs = HostSyncs(s.device)
    with added(syncs):
        first, second, steps = epochs(32, "gate-run")
    table.notes.append(syncs.note("train-gate, 2 epochs"))
    table.add(f"train-gate epoch after warm-up ({ids} identities x {per_id} images, 4 views, batch 32), s",
              f"{second:.2f}", "1 s", f"{second:.2f}", at_most(second, 1.0, s, " s"))
    table.notes.append(f"train-gate: first epoch (warm-up, the routed recipe's averaging phase) {first:.2f} s")
    # are launches what an epoch waits for? Then a step 8x (CPU mode 4x) larger costs about the same: CUDA graphs'
    # case (one launch a step). If it costs about 8x, the device's arithmetic is the limit and graphs would not help.
    big = 256 if gpu else 128
    _, second_big, steps_big = epochs(big, "gate-run-big")
    per, per_big = second / steps, second_big / steps_big
    table.notes.append(f"train-gate step after warm-up: {1000 * per:.2f} ms at batch 32, {1000 * per_big:.2f} ms at batch "
                       f"{big} ({per_big / per:.1f}x the time for {big // 32}x the images; near 1x: launch-bound)")


def section_distill(c: Context) -> None:
    """The student (ResNet-18, six losses) on the device input path: its second epoch's images/s against 3,000, or
    against the input path's own rate when that is lower, and the host syncs inside its steps."""
    s, table, tmp = c.setup, c.table, c.tmp
    ids, size, batch = s.distill
    root, cache = tmp / "distill-data", tmp / "distill.h5"
    t0 = time.perf_counter()
    generate(SynthConfig(root, "market1501", ids=ids, cams=6, seed=2))
    run_extract(ExtractConfig(dataset="market1501", root=root, backbones=("clip-tiny", "align-tiny"), out=cache, views=2,
                              batch_size=128 if s.gpu else 16, device=s.device.type, image_size=size, tokens="none"))
    gate = run_train_gate(GateConfig.from_dict(dict(cache=cache, out=tmp / "distill-gate", epochs=1, batch_size=batch, device=s.device.type))).run
    pixels = tmp / "distill-pixels.h5"
    build_pixel_cache(pixels, cache)
    setup_s = time.perf_counter() - t0
    cfg = DistillConfig(cache=cache, gate=gate, out=tmp / "distill-run", student="resnet18", student_init="random", epochs=2,
                        batch_size=batch, device=s.device.type, pixel_cache=pixels, input_path="device")
    syncs = HostSyncs(s.device)
    with added(syncs):
        res = run_distill(cfg)
    rows = RunDir(res.run).log_rows()
    rate = float(rows[-1]["images_per_s"])
    input_rate = input_path_rate(cfg)
    n_images = split_stats(cache)["train"]["images"]
    table.notes.append(syncs.note("distill, 2 epochs"))
    target = min(3000.0, input_rate)
    table.add(f"distill ResNet-18 {size[0]}x{size[1]}, six losses, batch {batch}, device input path: epoch 2 / "
              f"{'3,000 images/s' if target == 3000.0 else 'the input path alone'}, images/s ({n_images:,} training images)",
              f"{rate:,.0f}", f"{target:,.0f}", f"{rate / target:.2f}", verdict(rate / target, 1.0, s))
    table.notes.append(f"distill: the device-resident input path alone replays {input_rate:,.0f} images/s; setup (synth, "
                       f"extract, gate, pixel cache) {setup_s:.0f} s")
