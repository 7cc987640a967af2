"""Every GPU figure of featcache from one run, each with both sides of its comparison and their ratio.

    benchmarks/gpu_check                      # on a GPU machine: several minutes (not yet timed on a GPU), table to gpu_check.md
    benchmarks/gpu_check --section models     # one section alone (repeatable)
    benchmarks/gpu_check --cpu                # tiny presets and sizes on CPU: checks the script, not the speed

Extraction:

- ``models``: the libraries' own models alone (open_clip's visual tower, transformers' ALIGN vision model),
  pooled output, at their best memory format (channels_last where faster), bf16 autocast, input already on
  the device, batch ``--rows`` views; beside them featcache's backbone forward with every output.
- ``pipeline``: JPEG files to a finished cache (``featcache extract``, decoding workers, inference, writes),
  at least 5,000 synthetic JPEGs in the Market-1501 layout, default views. CLIP ViT-B/16 alone at 224x224
  with ``--tokens none`` against the library model's rate (target >= 0.8); CLIP ViT-B/16 + ALIGN-B7 at
  256x256 with the default outputs against their combined rate 1 / (1/r1 + 1/r2) (target >= 0.7), or against
  the disk's write rate where that is lower (shown beside). Also the bytes that left the device per image,
  counted at the copy calls, against the bytes the cache stores per image (they must be equal).
- ``decode``: whether decoding keeps up: featcache's input path alone (read, hash, decode, letterbox, views,
  with the auto workers, no inference) in views/s against the library model's rate; and JPEG decoding alone,
  batched on the GPU (``torchvision.io.decode_jpeg(device="cuda")``) against PIL across the same workers.
- ``equal``: on a small set, the overlapped path's cache equals the plain path's (forward, cast, copy),
  array for array.

Evaluation and training:

- ``eval``: exact evaluation at Market-1501 size (3,368 x 15,913 x 2048-d) against the bare product, defined
  as the on-device product of the same query blocks against the resident gallery, synchronised, TF32 off
  (target <= 1.3x); 10,000 queries x 1,000,000 gallery x 512-d exact (target under 3 s), with the GPU memory it
  took beside the gallery plus ``--budget-mb``; and the metrics of the GPU path equal to the CPU path on
  integer-valued features (as ``eval_speed.py`` draws them) at a size the CPU computes within the check.

- ``gate``: a Market-size train-gate epoch (12,767 training images, 4 cached views, CLIP's and ALIGN-B7's
  widths, batch 32, about 400 steps) after a first, warm-up epoch, CUDA start-up excluded (target under 1 s);
  beside it the step's time at batch 256: about the same time for 8x the images means launches dominate (the
  case for CUDA graphs), about 8x that the arithmetic does.
- ``distill``: the student (ResNet-18, 256x256, all six losses, random init) trained from a cache of at least
  10,000 distinct training images with the device input path (pixels, view replay, teacher targets and maps
  resident on the GPU, bf16 autocast): images/s of its second epoch (steady state), against the rate of the
  device-resident input path alone (replaying the same batches); target 3,000 images/s, or that rate if lower.

Both training sections note how often the host waited for the GPU during the run (``torch.cuda.set_sync_debug_mode``):
the shared training loop waits a few times an epoch (the epoch's indices, its log row), not once a step.

Random weights throughout (``--random-init``): speed and equality only, never results.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from featcache.backbones import build_backbone  # noqa: E402
from featcache.cache import CacheReader  # noqa: E402
from featcache.extract.config import ExtractConfig  # noqa: E402
from featcache.extract.runner import run_extract  # noqa: E402
from featcache.runtime import resolve_workers  # noqa: E402
from featcache.synth import SynthConfig, generate  # noqa: E402

SECTIONS = ("models", "pipeline", "decode", "equal", "eval", "gate", "distill")


@dataclass(frozen=True)
class Setup:
    """Sizes of one mode: the GPU figures, or the CPU check of the script itself."""

    device: torch.device
    clip: str
    align: str
    small: tuple[int, int]      # CLIP alone
    large: tuple[int, int]      # CLIP + ALIGN
    rows: int                   # views per timed batch
    iters: int
    ids: int                    # identities of the pipeline's synthetic dataset
    batch_size: int             # images per extraction batch
    equal_ids: int
    disk_mib: int


GPU = dict(clip="clip-vit-b16", align="align-b7", small=(224, 224), large=(256, 256), rows=256, iters=10, ids=600,
           batch_size=64, equal_ids=6, disk_mib=1024)
CPU = dict(clip="clip-tiny", align="align-tiny", small=(64, 32), large=(64, 64), rows=16, iters=2, ids=6,
           batch_size=8, equal_ids=4, disk_mib=16)


@dataclass
class Table:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, what: str, ours: str, ref: str, ratio: str = "", verdict: str = "") -> None:
        self.rows.append((what, ours, ref, ratio, verdict))
        print(f"| {what} | {ours} | {ref} | {ratio} | {verdict} |", flush=True)
        if verdict.startswith("FAIL"):
            self.failed.append(what)

    def markdown(self, header: list[str]) -> str:
        out = header + ["", "| check | featcache | reference | ratio | target |", "|---|---|---|---|---|"]
        out += [f"| {' | '.join(r)} |" for r in self.rows]
        return "\n".join(out + [""] + [f"- {n}" for n in self.notes]) + "\n"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, x, device: torch.device, iters: int) -> float:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    sync(device)
    return (time.perf_counter() - t0) / iters


def autocast(device: torch.device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def library_rate(name: str, size: tuple[int, int], s: Setup, table: Table) -> float:
    """Views/s of the library's own model (pooled output) at its best memory format; featcache's forward beside."""
    dev = s.device
    bb = build_backbone(name, size, random_init=True).to(dev).eval()
    lib = bb.visual if bb.family == "open_clip" else bb.model
    x = torch.randint(0, 256, (s.rows, 3, *size), dtype=torch.uint8, device=dev)
    rates = {}
    with torch.inference_mode(), autocast(dev):
        rates["contiguous"] = s.rows / timed(lambda v: lib(bb.normalize(v)), x, dev, s.iters)
        ours = s.rows / timed(lambda v: bb(bb.normalize(v)), x, dev, s.iters)
        if dev.type == "cuda":
            lib_cl = lib.to(memory_format=torch.channels_last)
            rates["channels_last"] = s.rows / timed(lambda v: lib_cl(bb.normalize(v).contiguous(memory_format=torch.channels_last)), x, dev, s.iters)
    best = max(rates, key=rates.get)
    label = f"{name} {size[0]}x{size[1]}"
    table.add(f"model side, {label}: featcache's forward (every output) / library model ({best}), views/s",
              f"{ours:,.0f}", f"{rates[best]:,.0f}", f"{ours / rates[best]:.2f}", "")
    if len(rates) > 1:
        table.notes.append(f"{label} library model: " + ", ".join(f"{k} {v:,.0f} views/s" for k, v in rates.items()))
    bb = lib = None  # free the model before the next one is built
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rates[best]


def disk_rate(folder: Path, mib: int) -> float:
    """Bytes/s of a sequential write of ``mib`` MiB, fsync'd (the cache's disk, page cache flushed)."""
    block = np.random.default_rng(0).bytes(16 * 2**20)
    path = folder / "disk-rate.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, mib // 16)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    n = path.stat().st_size
    path.unlink()
    return n / seconds


def extract(root: Path, out: Path, backbones: tuple[str, ...], size: tuple[int, int], s: Setup, **kw):
    cfg = ExtractConfig(dataset="market1501", root=root, backbones=backbones, out=out, batch_size=s.batch_size,
                        device=s.device.type, image_size=size, random_init=True, overwrite=True, **kw)
    res = run_extract(cfg)
    with CacheReader(out) as c:
        views = int(c.table("n_views")[c.table("status") == 1].sum())
    return res, views


def section_models(s: Setup, table: Table, rates: dict) -> None:
    rates["clip-small"] = library_rate(s.clip, s.small, s, table)
    rates["clip-large"] = library_rate(s.clip, s.large, s, table)
    rates["align-large"] = library_rate(s.align, s.large, s, table)


def section_pipeline(s: Setup, table: Table, rates: dict, tmp: Path) -> None:
    if "clip-small" not in rates:
        section_models(s, table, rates)
    root = tmp / "market"
    t0 = time.perf_counter()
    generate(SynthConfig(root, "market1501", ids=s.ids, cams=4, seed=0))
    n_files = sum(1 for _ in root.rglob("*.jpg"))
    table.notes.append(f"pipeline input: {n_files:,} synthetic JPEGs (Market-1501 layout, {s.ids} identities), written in "
                       f"{time.perf_counter() - t0:.0f} s; default views (4 per training image, 2 per query/gallery image); "
                       f"batch {s.batch_size} images; workers {resolve_workers(None, s.device)} (auto)")
    res, views = extract(root, tmp / "clip.h5", (s.clip,), s.small, s, tokens="none")
    rate = views / res.seconds
    ref = rates["clip-small"]
    table.add(f"pipeline, {s.clip} {s.small[0]}x{s.small[1]} --tokens none: JPEG to cache / library model, views/s",
              f"{rate:,.0f}", f"{ref:,.0f}", f"{rate / ref:.2f}", verdict(rate / ref, 0.8, s))
    res2, views2 = extract(root, tmp / "both.h5", (s.clip, s.align), s.large, s)
    rate2 = views2 / res2.seconds
    combined = 1 / (1 / rates["clip-large"] + 1 / rates["align-large"])
    disk = disk_rate(tmp, s.disk_mib)
    per_view = res2.stored_bytes / max(1, views2)
    disk_views = disk / per_view if per_view else float("inf")
    ref2, which = (combined, "combined rate") if combined <= disk_views else (disk_views, "disk write rate")
    table.add(f"pipeline, {s.clip} + {s.align} {s.large[0]}x{s.large[1]}, default outputs: JPEG to cache / {which}, views/s",
              f"{rate2:,.0f}", f"{ref2:,.0f}", f"{rate2 / ref2:.2f}", verdict(rate2 / ref2, 0.7, s))
    table.notes.append(f"disk: {disk / 2**20:,.0f} MiB/s sequential fsync'd write, {per_view / 1024:.1f} KiB stored per view: "
                       f"{disk_views:,.0f} views/s; combined model rate {combined:,.0f} views/s")
    for label, r in ((f"{s.clip} alone", res), (f"{s.clip} + {s.align}", res2)):
        ok = r.bytes_out == r.stored_bytes
        table.add(f"bytes off the device per image, {label} (counted at the copies) / bytes the cache stores per image",
                  f"{r.bytes_out / max(1, r.processed):,.0f}", f"{r.stored_bytes / max(1, r.processed):,.0f}",
                  f"{r.bytes_out / max(1, r.stored_bytes):.3f}", "PASS (equal)" if ok else "FAIL (must be equal)")
        table.notes.append(f"{label}: plus {r.check_bytes / max(1, r.processed):.0f} bytes an image of value-check codes")


def verdict(ratio: float, target: float, s: Setup) -> str:
    if s.device.type != "cuda":
        return f">= {target} (CPU mode: not judged)"
    return f"{'PASS' if ratio >= target else 'FAIL'} (>= {target})"


def at_most(value: float, limit: float, s: Setup, unit: str = "") -> str:
    if s.device.type != "cuda":
        return f"<= {limit}{unit} (CPU mode: not judged)"
    return f"{'PASS' if value <= limit else 'FAIL'} (<= {limit}{unit})"


def differing(a: Path, b: Path) -> list[str]:
    """Arrays that differ between two caches (attributes such as creation time aside)."""
    out = []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names: list[str] = []
        fa.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in names:
            x, y = fa[n][...], fb[n][...] if n in fb else None
            if y is None or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
                out.append(n)
    return out


def input_path_rate(root: Path, size: tuple[int, int], s: Setup) -> tuple[float, int]:
    """Views/s of featcache's loader alone (decoding workers, views, stacking, pinning), no inference."""
    from featcache.datasets import load_listing
    from featcache.extract.reader import BlockSampler, ImageReader, collate

    listing = load_listing("market1501", root)
    n_views = {"train": 4, "query": 2, "gallery": 2}
    workers = resolve_workers(None, s.device)
    reader = ImageReader(listing.root, listing.items, size, n_views, 0)
    sampler = BlockSampler(len(listing.items), s.batch_size, np.ones(len(listing.items), bool))
    loader = torch.utils.data.DataLoader(reader, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                         pin_memory=s.device.type == "cuda", prefetch_factor=4 if workers else None)
    t0, views = time.perf_counter(), 0
    for batch in loader:
        views += batch.views.shape[0]
    return views / (time.perf_counter() - t0), workers


def _pil_decode(chunk: list[bytes]) -> None:
    import io

    from PIL import Image

    for b in chunk:
        Image.open(io.BytesIO(b)).convert("RGB").load()


def decode_rates(root: Path, s: Setup, n: int = 2000) -> tuple[float, float | None]:
    """Images/s of JPEG decoding alone: PIL in a pool of the auto workers, and batched on the GPU."""
    import concurrent.futures

    files = sorted(root.rglob("*.jpg"))[:n]
    data = [f.read_bytes() for f in files]
    workers = max(1, resolve_workers(None, s.device))

    chunks = [data[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(_pil_decode, chunks))
    cpu = len(data) / (time.perf_counter() - t0)
    if s.device.type != "cuda":
        return cpu, None
    from torchvision.io import decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    decode_jpeg(tensors[:64], device="cuda")  # warm-up (nvJPEG handles)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(tensors), 256):
        decode_jpeg(tensors[i: i + 256], device="cuda")
    torch.cuda.synchronize()
    return cpu, len(data) / (time.perf_counter() - t0)


def section_decode(s: Setup, table: Table, rates: dict, tmp: Path) -> None:
    if "clip-small" not in rates:
        section_models(s, table, rates)
    root = tmp / "market"
    if not root.exists():
        generate(SynthConfig(root, "market1501", ids=s.ids, cams=4, seed=0))
    rate, workers = input_path_rate(root, s.small, s)
    table.add(f"input path alone ({workers} workers, {s.small[0]}x{s.small[1]}) / {s.clip} library model, views/s",
              f"{rate:,.0f}", f"{rates['clip-small']:,.0f}", f"{rate / rates['clip-small']:.2f}", ">= 1 keeps up")
    cpu, gpu = decode_rates(root, s)
    table.add(f"JPEG decode alone: GPU batched decode_jpeg / PIL on {max(1, resolve_workers(None, s.device))} processes, images/s",
              f"{gpu:,.0f}" if gpu else "no CUDA", f"{cpu:,.0f}", f"{gpu / cpu:.2f}" if gpu else "", "")


def section_eval(s: Setup, table: Table) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_speed import market_like

    from featcache.evaluation.runner import evaluate
    from featcache.evaluation.search import DEFAULT_BUDGET, block_size

    dev = s.device
    sizes = (3368, 15913, 2048) if dev.type == "cuda" else (200, 1500, 64)
    qf, gf, qp, qc, gp, gc = market_like(*sizes)
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    qn, gn = norm(qf).astype(np.float32), norm(gf).astype(np.float32)
    device = "cuda" if dev.type == "cuda" else "cpu"
    ranking = "device"  # on CPU too: the check of the device path's code

    def bare() -> float:
        g = torch.from_numpy(gn).to(dev)
        block = block_size(len(gn), DEFAULT_BUDGET)
        sync(dev)
        t0 = time.perf_counter()
        for a in range(0, len(qn), block):
            g.new_tensor(qn[a: a + block]) @ g.T
        sync(dev)
        return time.perf_counter() - t0

    def ours() -> tuple[float, dict]:
        sync(dev)
        t0 = time.perf_counter()
        res = evaluate(qn, gn, qp, qc, gp, gc, device=device, ranking=ranking)[0]
        sync(dev)
        return time.perf_counter() - t0, res

    bare(), ours()  # warm-up
    t_bare = min(bare() for _ in range(3))
    t_ours, res = min((ours() for _ in range(3)), key=lambda r: r[0])
    table.add(f"eval {sizes[0]:,} x {sizes[1]:,} x {sizes[2]}-d: evaluation / bare product on the device, s",
              f"{t_ours:.3f}", f"{t_bare:.3f}", f"{t_ours / t_bare:.2f}", at_most(t_ours / t_bare, 1.3, s, "x"))
    # the GPU path's metrics against the CPU path's, integer-valued features: every score exact on both
    small = market_like(*((1000, 8000, 256) if dev.type == "cuda" else (100, 800, 32)), seed=1)
    cpu = evaluate(*small, device="cpu", ranking="sort")[0]
    gpu = evaluate(*small, device=device, ranking=ranking)[0]
    same = cpu == gpu
    table.add(f"eval metrics, {device} device path = CPU path (integer-valued features)", "equal" if same else f"{gpu}",
              "CPU path", "", "PASS" if same else "FAIL")
    if dev.type == "cuda":
        rng = np.random.default_rng(0)
        big_q = rng.standard_normal((10_000, 512), dtype=np.float32)
        big_g = rng.standard_normal((1_000_000, 512), dtype=np.float32)
        bq, bg = rng.integers(0, 50_000, 10_000), rng.integers(0, 50_000, 1_000_000)
        bqc, bgc = rng.integers(0, 6, 10_000), rng.integers(0, 6, 1_000_000)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        evaluate(norm(big_q).astype(np.float32), norm(big_g).astype(np.float32), bq, bqc, bg, bgc, device="cuda", ranking=ranking)
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        gallery = big_g.nbytes / 2**30
        table.add("eval 10,000 x 1,000,000 x 512-d exact, s (GPU memory: peak, gallery + budget)", f"{t:.2f} ({peak:.2f} GiB)",
                  f"3 s ({gallery + DEFAULT_BUDGET / 2**30:.2f} GiB)", f"{t / 3:.2f}", at_most(t, 3.0, s, " s"))


class HostSyncs:
    """Counts the operations that make the host wait for the GPU (``torch.cuda.set_sync_debug_mode``) inside the
    training steps: the stage's step (forward and losses), backward and the optimizer step of every step the
    shared loop runs; also the steps themselves. Set-up, epoch ends and checkpoints are not counted: they wait a
    few times an epoch, by design. Nothing to count on CPU (the CPU tests count host reads instead)."""

    def __init__(self, device: torch.device) -> None:
        self.on, self.count, self.steps = device.type == "cuda", 0, 0

    def __enter__(self) -> "HostSyncs":
        import warnings

        from featcache.training import loop

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")
        self._fit, self._backward = loop.Loop.fit, torch.Tensor.backward
        me = self

        mode = torch.cuda.set_sync_debug_mode if self.on else (lambda _: None)  # CPU mode: the steps only

        def watched(fn):
            def call(*a, **k):
                mode("warn")
                try:
                    return fn(*a, **k)
                finally:
                    mode("default")
            return call

        def fit(loop_self, stage):
            step = stage.step

            def counted_step(batch):
                me.steps += 1
                return watched(step)(batch)
            stage.step = counted_step
            loop_self.opt.step = watched(loop_self.opt.step)
            torch.Tensor.backward = watched(me._backward)
            try:
                return me._fit(loop_self, stage)
            finally:
                torch.Tensor.backward = me._backward
        loop.Loop.fit = fit
        return self

    def __exit__(self, *exc) -> None:
        from featcache.training import loop

        loop.Loop.fit, torch.Tensor.backward = self._fit, self._backward
        self.count = sum("synchronizing" in str(w.message) for w in self._seen)
        self._catch.__exit__(*exc)

    def note(self, what: str) -> str:
        if not self.on:
            return f"{what}: host syncs not counted on CPU ({self.steps} training steps watched)"
        return (f"{what}: {self.count} host syncs inside {self.steps} training steps (forward, losses, backward, "
                f"optimizer; {self.count / max(1, self.steps):.2f} a step)")


def section_gate(s: Setup, table: Table, tmp: Path) -> None:
    import csv

    from featcache.gate.config import GateConfig
    from featcache.gate.train import train
    from featcache.synth_cache import write_feature_cache

    gpu = s.device.type == "cuda"
    ids, per_id = (751, 17) if gpu else (40, 6)
    cache = write_feature_cache(tmp / "gate-cache.h5", ids=ids, per_id=per_id, cams=6, views=4)

    def epochs(batch: int, out: str) -> tuple[float, float, int]:
        train(GateConfig(cache, tmp / out, ("clip-sim", "align-sim"), "moe-top1", epochs=2, seed=42, batch_size=batch,
                         device=s.device.type))
        with open(tmp / out / "log.csv") as fh:
            rows = list(csv.DictReader(fh))
        steps = round(float(rows[1]["images_per_s"]) * float(rows[1]["seconds"]) / batch)  # the epoch's PK batches
        return float(rows[0]["seconds"]), float(rows[1]["seconds"]), steps

    with HostSyncs(s.device) as syncs:
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


def section_distill(s: Setup, table: Table, tmp: Path) -> None:
    import csv

    from featcache.cache.pixelcache import build_pixel_cache
    from featcache.distill.config import DistillConfig
    from featcache.distill.runner import run_distill
    from featcache.distill.train import ResidentViews, load_inputs, with_pixel_cache
    from featcache.gate.config import GateConfig
    from featcache.gate.runner import run_train_gate
    from featcache.training.sampling import pk_batches

    gpu = s.device.type == "cuda"
    ids, size, batch = (2400, (256, 256), 128) if gpu else (12, (64, 32), 16)
    root, cache = tmp / "distill-data", tmp / "distill.h5"
    t0 = time.perf_counter()
    generate(SynthConfig(root, "market1501", ids=ids, cams=6, seed=2))
    run_extract(ExtractConfig(dataset="market1501", root=root, backbones=("clip-tiny", "align-tiny"), out=cache, views=2,
                              batch_size=128 if gpu else 16, device=s.device.type, image_size=size, tokens="none"))
    gate = run_train_gate(GateConfig(cache=cache, out=tmp / "distill-gate", epochs=1, batch_size=batch, device=s.device.type)).run
    pixels = tmp / "distill-pixels.h5"
    build_pixel_cache(pixels, cache)
    setup_s = time.perf_counter() - t0
    cfg = DistillConfig(cache=cache, gate=gate, out=tmp / "distill-run", student="resnet18", student_init="random", epochs=2,
                        batch_size=batch, device=s.device.type, pixel_cache=pixels, input_path="device")
    with HostSyncs(s.device) as syncs:
        res = run_distill(cfg)
    with open(res.run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    rate = float(rows[-1]["images_per_s"])
    teacher, dataset = load_inputs(cfg)
    views = ResidentViews(with_pixel_cache(cfg, dataset), teacher.images, s.device)
    rng = np.random.default_rng(0)
    keys = [[(int(teacher.images[i]), int(rng.integers(0, teacher.n_views[i]))) for i in b]
            for b in pk_batches(teacher.labels, batch // 4, 4, rng)]
    for _ in views.epoch(keys[:1]):
        pass
    sync(s.device)
    t0 = time.perf_counter()
    for _ in views.epoch(keys):
        pass
    sync(s.device)
    input_rate = sum(map(len, keys)) / (time.perf_counter() - t0)
    n_images = len(teacher.images)
    table.notes.append(syncs.note("distill, 2 epochs"))
    target = min(3000.0, input_rate)
    table.add(f"distill ResNet-18 {size[0]}x{size[1]}, six losses, batch {batch}, device input path: epoch 2 / "
              f"{'3,000 images/s' if target == 3000.0 else 'the input path alone'}, images/s ({n_images:,} training images)",
              f"{rate:,.0f}", f"{target:,.0f}", f"{rate / target:.2f}", verdict(rate / target, 1.0, s))
    table.notes.append(f"distill: the device-resident input path alone replays {input_rate:,.0f} images/s; setup (synth, "
                       f"extract, gate, pixel cache) {setup_s:.0f} s" + ("" if n_images >= 10_000 or not gpu else
                                                                        f"; FEWER than 10,000 training images ({n_images})"))


def section_equal(s: Setup, table: Table, tmp: Path) -> None:
    root = tmp / "small"
    generate(SynthConfig(root, "market1501", ids=s.equal_ids, cams=3, seed=1))
    paths = {}
    for mapper in ("plain", "overlapped"):
        extract(root, tmp / f"{mapper}.h5", (s.clip, s.align), s.large, s, mapper=mapper, workers=0)
        paths[mapper] = tmp / f"{mapper}.h5"
    diff = differing(paths["plain"], paths["overlapped"])
    table.add(f"overlapped path's cache = plain path's, array for array ({s.clip} + {s.align}, {s.device.type})",
              "equal" if not diff else f"differs: {', '.join(diff[:4])}", "plain path", "", "PASS" if not diff else "FAIL")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    ap.add_argument("--cpu", action="store_true", help="tiny presets and sizes on CPU: checks the script, not the speed")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="where the table goes (markdown)")
    ap.add_argument("--ids", type=int, help="identities of the pipeline's dataset (default 600: 5,600 JPEGs)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device here: run on a GPU machine, or --cpu to check the script itself")
    sizes = dict(CPU if args.cpu else GPU)
    if args.ids:
        sizes["ids"] = args.ids
    s = Setup(torch.device("cpu" if args.cpu else "cuda"), **sizes)
    if s.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
    sections = args.section or list(SECTIONS)
    dev = torch.cuda.get_device_name() if s.device.type == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    header = [f"# gpu_check, {datetime.date.today().isoformat()}", "",
              f"device: {dev}; torch {torch.__version__}; bf16 autocast on CUDA; batch {s.rows} views (models), "
              f"{s.batch_size} images (pipeline); random weights; sections: {', '.join(sections)}"]
    print("\n".join(header), flush=True)
    table, rates = Table(), {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featcache-gpu-check-") as tmp:
        for name in sections:
            ts = time.perf_counter()
            if name == "models":
                section_models(s, table, rates)
            elif name == "pipeline":
                section_pipeline(s, table, rates, Path(tmp))
            elif name == "decode":
                section_decode(s, table, rates, Path(tmp))
            elif name == "equal":
                section_equal(s, table, Path(tmp))
            elif name == "eval":
                section_eval(s, table)
            elif name == "gate":
                section_gate(s, table, Path(tmp))
            elif name == "distill":
                section_distill(s, table, Path(tmp))
            print(f"(section {name}: {time.perf_counter() - ts:.0f} s)", flush=True)
    table.notes.append(f"whole run {time.perf_counter() - t0:.0f} s")
    args.out.write_text(table.markdown(header))
    print(f"table written to {args.out}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
