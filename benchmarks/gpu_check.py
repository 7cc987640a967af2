"""Every GPU figure of featcache from one run, each with both sides of its comparison and their ratio.

    benchmarks/gpu_check --budget 540          # on a GPU machine: every section that fits in 9 minutes
    benchmarks/gpu_check --section eval        # one section alone (repeatable)
    benchmarks/gpu_check --cpu                 # tiny presets and sizes on CPU: runs every timed block, checks the script

The table goes to gpu_check.md (``--out``). Random weights throughout: speed and equality only, never results.
Sections, in order (expected time on one H100-class GPU, an estimate until measured there; in --cpu mode):

{sections}

``--budget SECONDS`` skips, saying so in the table, each section whose expected time would end the run past the
budget. Both training sections count how often the host waited for the GPU inside each training step, through a
training-loop hook (``torch.cuda.set_sync_debug_mode``).

Several GPUs: this script times one. How distillation's images/s scale with the number of GPUs is
``benchmarks/distill_ranks.py --device cuda`` on a machine with two (one rank a GPU): not yet measured on GPUs;
on 2 CPU cores two ranks trained 1.81x the images/s of one (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gpucheck.common import CPU, GPU, Context, Setup, Table  # noqa: E402
from gpucheck.evaluation import section_eval  # noqa: E402
from gpucheck.extraction import section_decode, section_equal, section_models, section_pipeline  # noqa: E402
from gpucheck.training import section_distill, section_gate  # noqa: E402


@dataclass(frozen=True)
class Section:
    """One section: what it measures, the function that runs it, and its expected time in each mode."""

    name: str
    run: Callable[[Context], None]
    gpu_s: int      # expected on one GPU (estimate until measured there)
    cpu_s: int      # expected in --cpu mode on 2 cores
    what: str


SECTIONS = [
    Section("models", section_models, 60, 10, "the library models alone (open_clip's visual tower, transformers' ALIGN "
            "vision model) beside featcache's forward in extraction's memory format; cuDNN autotuning on here only"),
    Section("pipeline", section_pipeline, 180, 10, "JPEG files to a finished cache (5,600 synthetic JPEGs): CLIP alone "
            "at 224x224 --tokens none against the library model (>= 0.8), CLIP + ALIGN at 256x256 against their "
            "combined rate or the disk's (>= 0.7); bytes off the device = bytes stored"),
    Section("decode", section_decode, 60, 5, "the input path alone, and JPEG decoding alone (GPU batched against PIL "
            "processes)"),
    Section("equal", section_equal, 30, 5, "the overlapped path's cache = the plain path's, array for array"),
    Section("eval", section_eval, 90, 10, "Market-size evaluation / the bare product (<= 1.3x), 10,000 x 1,000,000 x "
            "512-d exact (< 3 s; 100 x 20,000 x 32-d on CPU), device-path metrics = CPU path's"),
    Section("gate", section_gate, 90, 15, "a Market-size train-gate epoch after warm-up (< 1 s), host syncs per step, "
            "the step at 8x the batch"),
    Section("distill", section_distill, 240, 20, "ResNet-18 on the device input path from about 10,000 training images "
                                                 "(>= 3,000 images/s or the input path's rate), host syncs per step"),
]
__doc__ = __doc__.format(sections="\n".join(f"- ``{s.name}`` (about {s.gpu_s // 60} min {s.gpu_s % 60:02d} s; {s.cpu_s} s): "
                                            f"{s.what}." for s in SECTIONS))


def run_sections(names: list[str], ctx: Context, budget: float | None) -> float:
    """Run ``names`` in order; a section whose expected time would pass ``budget`` (seconds) is skipped, saying so."""
    t0 = time.perf_counter()
    by_name = {s.name: s for s in SECTIONS}
    for name in names:
        sec = by_name[name]
        expected = sec.gpu_s if ctx.setup.gpu else sec.cpu_s
        used = time.perf_counter() - t0
        if budget is not None and used + expected > budget:
            ctx.table.add(f"section {name}", "skipped", f"expected {expected} s, {budget - used:.0f} s left of --budget "
                          f"{budget:.0f}", "", "")
            continue
        ts = time.perf_counter()
        sec.run(ctx)
        print(f"(section {name}: {time.perf_counter() - ts:.0f} s, expected {expected} s)", flush=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=[s.name for s in SECTIONS], help="run only this section (repeatable)")
    ap.add_argument("--cpu", action="store_true", help="tiny presets and sizes on CPU: checks the script, not the speed")
    ap.add_argument("--budget", type=float, help="seconds: skip the sections whose expected time would not fit")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="where the table goes (markdown)")
    ap.add_argument("--ids", type=int, help="identities of the pipeline's dataset (default 600: 5,600 JPEGs)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device here: run on a GPU machine, or --cpu to check the script itself")
    sizes = dict(CPU if args.cpu else GPU)
    if args.ids:
        sizes["ids"] = args.ids
    s = Setup(torch.device("cpu" if args.cpu else "cuda"), **sizes)
    if s.gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # cudnn.benchmark stays off but in the models section
    names = args.section or [sec.name for sec in SECTIONS]
    dev = torch.cuda.get_device_name() if s.gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    header = [f"# gpu_check, {datetime.date.today().isoformat()}", "",
              f"device: {dev}; torch {torch.__version__}; bf16 autocast on CUDA; batch {s.rows} views (models), "
              f"{s.batch_size} images (pipeline); random weights; sections: {', '.join(names)}"]
    print("\n".join(header), flush=True)
    table = Table()
    with tempfile.TemporaryDirectory(prefix="featcache-gpu-check-") as tmp:
        seconds = run_sections(names, Context(s, table, Path(tmp)), args.budget)
    table.notes.append(f"whole run {seconds:.0f} s")
    args.out.write_text(table.markdown(header))
    print(f"table written to {args.out}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
