"""gpu_check's extraction sections: the library models alone, JPEG files to a cache, whether decoding keeps up, and
the overlapped path's cache against the plain one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from featcache.backbones import build_backbone
from featcache.cache import CacheReader
from featcache.extract.config import ExtractConfig
from featcache.extract.mapper import uses_channels_last
from featcache.extract.runner import run_extract
from featcache.runtime import loader_options, resolve_workers
from featcache.synth import SynthConfig, generate
from gpucheck.common import Context, Setup, Table, autocast, timed, verdict


def library_rate(name: str, size: tuple[int, int], s: Setup, table: Table) -> float:
    """Views/s of the library's own model (pooled output) at its best memory format; featcache's forward beside."""
    dev = s.device
    bb = build_backbone(name, size, random_init=True).to(dev).eval()
    lib = bb.visual if bb.family == "open_clip" else bb.model
    x = torch.randint(0, 256, (s.rows, 3, *size), dtype=torch.uint8, device=dev)
    rates = {}
    with torch.inference_mode(), autocast(dev):
        rates["contiguous"] = s.rows / timed(lambda v: lib(bb.normalize(v)), x, dev, s.iters)
        if uses_channels_last(bb, dev):  # featcache's forward in the format extraction runs it in
            bb = bb.to(memory_format=torch.channels_last)
            ours = s.rows / timed(lambda v: bb(bb.normalize(v).contiguous(memory_format=torch.channels_last)), x, dev, s.iters)
        else:
            ours = s.rows / timed(lambda v: bb(bb.normalize(v)), x, dev, s.iters)
        if dev.type == "cuda":
            lib_cl = lib.to(memory_format=torch.channels_last)
            rates["channels_last"] = s.rows / timed(lambda v: lib_cl(bb.normalize(v).contiguous(memory_format=torch.channels_last)), x, dev, s.iters)
    best = max(rates, key=rates.get)
    label = f"{name} {size[0]}x{size[1]}"
    table.add(f"model side, {label}: featcache's forward (every output, extraction's memory format) / library model ({best}), views/s",
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


def section_models(c: Context) -> None:
    """The library models alone, at fixed shapes: the one place cuDNN's autotuner is on (``cudnn.benchmark``
    re-tunes every convolution for each new batch shape, which extraction's last batches would pay)."""
    s, table, rates = c.setup, c.table, c.rates
    torch.backends.cudnn.benchmark = s.gpu
    try:
        rates["clip-small"] = library_rate(s.clip, s.small, s, table)
        rates["clip-large"] = library_rate(s.clip, s.large, s, table)
        rates["align-large"] = library_rate(s.align, s.large, s, table)
    finally:
        torch.backends.cudnn.benchmark = False


def section_pipeline(c: Context) -> None:
    """JPEG files to a finished cache, against the library models' rates (the models section runs first if needed)."""
    s, table, rates, tmp = c.setup, c.table, c.rates, c.tmp
    if "clip-small" not in rates:
        section_models(c)
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
    batch_bytes = s.batch_size * 4 * size[0] * size[1] * 3
    loader = torch.utils.data.DataLoader(reader, batch_sampler=sampler, collate_fn=collate,
                                         **loader_options(s.device, workers, batch_bytes))  # as extraction's loader
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


def section_decode(c: Context) -> None:
    """Whether decoding keeps up: the input path alone, and JPEG decoding alone on the GPU and in processes."""
    s, table, rates, tmp = c.setup, c.table, c.rates, c.tmp
    if "clip-small" not in rates:
        section_models(c)
    root = tmp / "market"
    if not root.exists():
        generate(SynthConfig(root, "market1501", ids=s.ids, cams=4, seed=0))
    rate, workers = input_path_rate(root, s.small, s)
    table.add(f"input path alone ({workers} workers, {s.small[0]}x{s.small[1]}) / {s.clip} library model, views/s",
              f"{rate:,.0f}", f"{rates['clip-small']:,.0f}", f"{rate / rates['clip-small']:.2f}", ">= 1 keeps up")
    cpu, gpu = decode_rates(root, s)
    table.add(f"JPEG decode alone: GPU batched decode_jpeg / PIL on {max(1, resolve_workers(None, s.device))} processes, images/s",
              f"{gpu:,.0f}" if gpu else "no CUDA", f"{cpu:,.0f}", f"{gpu / cpu:.2f}" if gpu else "", "")


def section_equal(c: Context) -> None:
    """The overlapped path's cache equals the plain path's, array for array."""
    s, table, tmp = c.setup, c.table, c.tmp
    root = tmp / "small"
    generate(SynthConfig(root, "market1501", ids=s.equal_ids, cams=3, seed=1))
    paths = {}
    for mapper in ("plain", "overlapped"):
        extract(root, tmp / f"{mapper}.h5", (s.clip, s.align), s.large, s, mapper=mapper, workers=0)
        paths[mapper] = tmp / f"{mapper}.h5"
    diff = differing(paths["plain"], paths["overlapped"])
    table.add(f"overlapped path's cache = plain path's, array for array ({s.clip} + {s.align}, {s.device.type})",
              "equal" if not diff else f"differs: {', '.join(diff[:4])}", "plain path", "", "PASS" if not diff else "FAIL")
