"""Cost of a model at inference: the columns of the paper's Tables 2 and 3, measured here, never assumed.

``profile_model("student:RUN")`` measures a distilled student; ``profile_model("gate:RUN")`` the whole
teacher it replaces: every expert backbone (built from its preset at the image size, with random
weights, which cost exactly what trained ones do) feeding the run's adapters, gate and BN neck, since
the gate reads all experts for every image. Reported per model:

* parameters: all of the model's (the unused ID classifier included, and shown apart), and per part;
* FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` on a batch of one, i.e. 2 per
  multiply-accumulate (FLOPs, not MACs) of convolutions, matrix products and attention; elementwise
  ops, normalisation and pooling are not counted;
* latency: median of ``repeats`` timed runs after ``WARMUP`` untimed ones, under
  ``torch.inference_mode`` (CUDA synchronised), per batch size, and images/s at each;
* peak memory in MiB, per batch size: on CUDA ``torch.cuda.max_memory_allocated`` (weights
  included), reset before each batch size; on CPU the process's peak resident set
  (``resource.getrusage``), which covers the whole process so far (Python, torch, anything profiled
  before in the same process), so it never falls;
* where it ran: device name, torch threads, image size and where the size came from.

The teacher is timed through the backbones' extraction forward, which also computes the attention maps
and tokens the cache stores (a few percent at most over the pooled feature alone).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from featcache.errors import ConfigError, FeatcacheError, InputError, check_choice
from featcache.runtime import resolve_device

logger = logging.getLogger(__name__)

KINDS = ("student", "gate", "backbone")
WARMUP = 2  # untimed runs before timing: first-call allocation, oneDNN/cuDNN set-up
DEFAULT_IMAGE_SIZE = (256, 256)
FLOPS_NOTE = ("FLOPs (2 per multiply-accumulate, not MACs) per image, FlopCounterMode on a batch of 1: "
              "convolutions, matrix products and attention; elementwise, normalisation and pooling not counted")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def profile_model(spec: str, device: str = "auto", image_size: tuple[int, int] | None = None,
                  batch_sizes: tuple[int, ...] = (1, 64), repeats: int = 10, precision: str = "fp32") -> dict:
    """Parameters, FLOPs, latency, throughput and peak memory of ``student:RUN`` or ``gate:RUN``.

    ``image_size`` (H, W) is a fallback: a student runs at its run's size, the teacher at its cache's;
    only when the teacher's cache is gone is ``image_size`` (else 256x256) used. The result says which.
    """
    kind, _, ref = spec.partition(":")
    if kind not in KINDS or not ref:
        raise ConfigError(f"model {spec!r}: expected student:RUN_DIR, gate:RUN_DIR or backbone:PRESET")
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError(f"batch sizes {list(sizes)}: expected one or more positive integers")
    if repeats < 1:
        raise ConfigError(f"repeats {repeats}: expected at least 1")
    check_choice(precision, PRECISIONS, "--precision", what=f"--precision {precision}")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise ConfigError(f"--image-size {image_size}: expected H and W, both positive")
    dev = resolve_device(device)
    build = {"student": _student, "gate": _teacher, "backbone": _backbone}[kind]
    model, make_input, info = build(Path(ref), dev, image_size)
    model.requires_grad_(False).eval()
    h, w = info["image_size"]
    flops_parts = info.pop("flops_parts_fn", None)
    row = {"model": spec, "kind": kind, "run": ref, **info,
           "parameters": sum(info["parameters_parts"].values()),
           "flops_per_image": _flops(model, make_input(1)), "flops_note": FLOPS_NOTE}
    if flops_parts is not None:
        row["flops_parts"] = flops_parts()
    row["parameters_used"] = row["parameters"] - info["parameters_parts"].get("classifier", 0)
    latency, memory = {}, {}
    for b in sizes:
        latency[b], memory[b] = _time(model, make_input(b), dev, repeats, PRECISIONS[precision])
    cpu = dev.type == "cpu"
    row.update({
        "latency_ms": latency, "images_per_s": {b: 1000.0 * b / ms for b, ms in latency.items()},
        "peak_memory_mib": memory,
        "peak_memory_kind": ("process peak RSS (resource.getrusage ru_maxrss) after each batch size, whole process so far" if cpu
                             else "torch.cuda.max_memory_allocated per batch size, weights included"),
        "device": _device_name(dev), "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "batch_sizes": list(sizes), "repeats": repeats, "pid": os.getpid(),
        "timing": f"median of {repeats} timed runs after {WARMUP} warm-up runs, torch.inference_mode"
                  + ("" if precision == "fp32" else f", {precision} autocast"),
        "precision": precision,
        "image_size": [h, w],
    })
    logger.info("profiled %s: %.2f M parameters, %.3f GFLOPs/image, %s", spec, row["parameters"] / 1e6,
                row["flops_per_image"] / 1e9, ", ".join(f"batch {b}: {ms:.2f} ms" for b, ms in latency.items()))
    return row


def profile_models(specs: list[str] | tuple[str, ...], device: str = "auto", **kw) -> list[dict]:
    """``profile_model`` of each spec. On CPU, with more than one model, each runs in a fresh process: peak
    memory there is the process's peak RSS, which never falls, so a model profiled after another would
    inherit its peak."""
    specs = list(specs)
    if len(specs) < 2 or resolve_device(device).type != "cpu":
        return [profile_model(s, device, **kw) for s in specs]
    import concurrent.futures
    import multiprocessing

    rows = []
    for s in specs:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(profile_model, s, device, **kw).result())
    return rows


# ---------------------------------------------------------------------- the two kinds
def _student(run: Path, dev: torch.device, fallback: tuple[int, int] | None):
    from featcache.distill.load import load_student
    from featcache.training.rundir import RunDir

    model, _, meta = load_student(run, str(dev))
    size = tuple(int(v) for v in meta.get("image_size") or ())
    source = str(RunDir(run).meta_file)
    if len(size) != 2:
        raise InputError(f"{source}: no image_size [H, W] (expected the size the student was trained at)")
    if fallback is not None and tuple(fallback) != size:
        logger.warning("%s was trained at %dx%d: profiling at that size, not the %dx%d given", run, *size, *fallback)
    parts = {"stages": _count(model.stages), "head": _count(model.fc) + _count(model.bn), "classifier": _count(model.classifier)}
    info = {"arch": model.arch, "image_size": size, "image_size_source": source, "parameters_parts": parts,
            "weights": "the run's final weights", "input": "ImageNet-normalised float32 NCHW"}

    def make_input(n: int) -> torch.Tensor:
        return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(0)).to(dev)

    return model, make_input, info


class Teacher(nn.Module):
    """The whole teacher at inference: uint8 images -> the pooled feature of every expert it uses -> adapters,
    gate, BN neck. A single-expert fusion (clip, align) runs only its expert; the other's input is zeros."""

    def __init__(self, experts: list[str], backbones: list[nn.Module], gate: nn.Module, dims: list[int] | None = None,
                 used: list[int] | None = None) -> None:
        super().__init__()
        self.experts = experts
        self.backbones = nn.ModuleList(backbones)
        self.gate = gate
        self.dims = dims or []
        self.used = used if used is not None else list(range(len(backbones)))

    def pooled(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = [images.new_zeros((images.shape[0], d), dtype=torch.float32) for d in self.dims] or [None] * len(self.backbones)
        for i, bb in zip(self.used, self.backbones):
            out[i] = bb(bb.normalize(images))["pooled"].float()
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.gate(self.pooled(images))[1]


def _teacher(run: Path, dev: torch.device, fallback: tuple[int, int] | None):
    from featcache.backbones import PresetError, build_backbone
    from featcache.gate.train import load_run

    gate, cfg, meta = load_run(run, str(dev))
    if cfg.fusion == "moe-oracle":
        raise InputError(f"{run}: fusion moe-oracle routes by labels the images do not carry; it has no cost to profile")
    size, source = _cache_image_size(Path(cfg.cache), fallback)
    from featcache.gate.train import single_expert_index

    single = single_expert_index(cfg.fusion, meta["families"])
    used = [single] if single is not None else list(range(len(meta["experts"])))
    backbones = []
    for name, dim in [(meta["experts"][i], meta["dims"][i]) for i in used]:
        try:
            bb = build_backbone(name, size, random_init=True).to(dev).eval()
        except PresetError as exc:
            raise InputError(f"{run}: expert {name} cannot be built as a backbone ({exc})") from None
        with torch.inference_mode():
            got = bb(bb.normalize(torch.zeros(1, 3, *size, dtype=torch.uint8, device=dev)))["pooled"].shape[-1]
        if got != dim:
            raise InputError(f"{run}: expert {name} gives {got}-d pooled features at {size[0]}x{size[1]}, "
                             f"but the gate was trained on {dim}-d ones")
        backbones.append(bb)
    names = [meta["experts"][i] for i in used]
    model = Teacher(list(meta["experts"]), backbones, gate, list(meta["dims"]), used)
    parts = {**{f"backbone {n}": _count(bb) for n, bb in zip(names, backbones)},
             "adapters": _count(gate.adapters), "fusion": _count(gate.fusion), "neck": _count(gate.bn),
             "classifier": _count(gate.classifier)}

    def make_input(n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8).to(dev)

    def flops_parts() -> dict[str, int]:
        x = make_input(1)
        out = {f"backbone {n}": _flops(lambda t, bb=bb: bb(bb.normalize(t)), x) for n, bb in zip(names, backbones)}
        with torch.no_grad():
            pooled = model.pooled(x)
        out["adapters+gate+neck"] = _flops(lambda xs: gate(xs)[1], pooled)
        return out

    info = {"arch": f"{cfg.fusion} over {'+'.join(names)}", "image_size": size, "image_size_source": source,
            "parameters_parts": parts, "flops_parts_fn": flops_parts,
            "weights": "backbones: random (timing only); adapters, gate and neck: the run's",
            "input": "uint8 NCHW (each backbone normalises its own way)"}
    return model, make_input, info


class BackboneAlone(nn.Module):
    """One frozen backbone at inference: uint8 images -> its pooled feature (the raw-expert rows of Table 3)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.backbone.normalize(images))["pooled"]


def _backbone(preset: Path, dev: torch.device, fallback: tuple[int, int] | None):
    from featcache.backbones import PresetError, build_backbone

    size = tuple(fallback) if fallback is not None else DEFAULT_IMAGE_SIZE
    try:
        bb = build_backbone(str(preset), size, random_init=True).to(dev).eval()
    except PresetError as exc:
        raise ConfigError(f"backbone:{preset}: {exc}") from None
    info = {"arch": f"{preset} alone", "image_size": size,
            "image_size_source": "the size given" if fallback is not None else "the default 256x256",
            "parameters_parts": {"backbone": _count(bb)}, "weights": "random (timing only)", "input": "uint8 NCHW"}

    def make_input(n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8).to(dev)

    return BackboneAlone(bb), make_input, info


def _cache_image_size(cache: Path, fallback: tuple[int, int] | None) -> tuple[tuple[int, int], str]:
    """The teacher's input size: its cache's preprocessing, else the size given, else 256x256."""
    from featcache.cache import cache_identity

    try:
        size = cache_identity(cache).preprocessing.get("image_size")
        if size and len(size) == 2:
            if fallback is not None and tuple(fallback) != tuple(size):
                logger.warning("the teacher's cache %s is at %dx%d: profiling at that size, not the %dx%d given", cache, *size, *fallback)
            return (int(size[0]), int(size[1])), f"cache {cache} (preprocessing image_size)"
        why = f"cache {cache} records no image_size"
    except FeatcacheError as exc:
        why = str(exc)
    if fallback is not None:
        return (int(fallback[0]), int(fallback[1])), f"--image-size given ({why})"
    return DEFAULT_IMAGE_SIZE, f"default 256x256 ({why})"


# ---------------------------------------------------------------------- measuring
def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _flops(fn: Callable, x) -> int:
    """FLOPs of one call; attention on CPU (``_scaled_dot_product_flash_attention_for_cpu``) counted as on CUDA."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        extra[cpu_sdpa] = sdpa
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with torch.no_grad(), counter:
        fn(x)
    return int(counter.get_total_flops())


def _time(model: nn.Module, x: torch.Tensor, dev: torch.device, repeats: int,
          dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(median latency in ms, peak memory in MiB) of ``repeats`` runs on the batch ``x``; with ``dtype``, under
    autocast to it (how a model is deployed on a GPU: bf16 or fp16)."""
    import contextlib

    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    times = []
    cast = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), cast:
        for _ in range(WARMUP):
            model(x)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _peak_rss_mib()
    return 1000.0 * statistics.median(times), peak


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({name or platform.machine()})"


# ---------------------------------------------------------------------- the table
def format_profile(rows: list[dict]) -> str:
    """A plain-text table, one row per profiled model, and the notes that say what each column measured."""
    if not rows:
        return "(no models profiled)"
    sizes = sorted({b for r in rows for b in r["latency_ms"]})
    top = max(sizes) if sizes else None
    head = ["model", "params (M)", "GFLOPs/img", *(f"ms@b{b}" for b in sizes), f"img/s@b{top}", "peak MiB", "device", "threads", "image"]
    table = [head]
    for r in rows:
        mem = max(r["peak_memory_mib"].values())
        table.append([r["model"], f"{r['parameters'] / 1e6:.2f}", f"{r['flops_per_image'] / 1e9:.3f}",
                      *(f"{r['latency_ms'][b]:.2f}" if b in r["latency_ms"] else "-" for b in sizes),
                      f"{r['images_per_s'][top]:.1f}" if top in r["images_per_s"] else "-",
                      f"{mem:.0f}", r["device"], str(r["torch_threads"]), "x".join(map(str, r["image_size"]))])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, len(head) - 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"FLOPs: {FLOPS_NOTE}."]
    for r in rows:
        notes.append(f"{r['model']}: {r['arch']}; weights: {r['weights']}; image size from {r['image_size_source']}; "
                     f"memory: {r['peak_memory_kind']}; {r['timing']}; parameters used at inference {r['parameters_used'] / 1e6:.2f} M "
                     f"(of {r['parameters'] / 1e6:.2f} M)")
    return "\n".join(lines + [""] + notes)
