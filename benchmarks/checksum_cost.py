"""What checksums cost: ``featcache verify`` throughput, and eval / train-gate time with and without checking rows.

A synthetic feature cache of Market-1501's size (751 training identities,
16 images each, 4 views; 750 query and 6,000 gallery images, 2 views) with
CLIP ViT-B/16 and ALIGN-B7 widths. Eval (``backbone`` and ``concat``) and
train-gate (3 epochs) run twice in one process, alternately with and
without the row checks (the "without" side disables them in this process
only), each measured three times; the medians and their ratio are printed.

    python benchmarks/checksum_cost.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import featcache.cache.store as store
from featcache.cache.checksum import verify_cache
from featcache.evaluation.runner import EvalConfig, run_eval
from featcache.gate.config import GateConfig
from featcache.gate.runner import run_train_gate
from featcache.synth_cache import write_feature_cache


@contextmanager
def checks(on: bool):
    real = store.checksum.array_checksums
    if not on:
        store.checksum.array_checksums = lambda *a, **k: None
    try:
        yield
    finally:
        store.checksum.array_checksums = real


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        cache = write_feature_cache(tmp / "f.h5", ids=751, per_id=16, cams=6, views=4,
                                    experts={"clip-sim": ("open_clip", 768), "align-sim": ("align", 640)})
        rep = verify_cache(cache)
        print(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores)")
        print(f"verify: {rep.checked_images} images, {rep.checked_bytes / 2**20:.0f} MiB in {rep.seconds:.2f} s = {rep.mb_per_s:.0f} MiB/s")
        jobs = {
            "eval backbone:clip-sim": lambda: run_eval(EvalConfig(cache, "backbone:clip-sim", device="cpu")),
            "eval concat": lambda: run_eval(EvalConfig(cache, "concat:clip-sim,align-sim", device="cpu")),
        }
        n = 0

        def gate() -> None:
            nonlocal n
            n += 1
            run_train_gate(GateConfig.from_dict(dict(cache=cache, out=tmp / f"run{n}", experts=("clip-sim", "align-sim"), fusion="moe-top1", epochs=3)))

        jobs["train-gate 3 epochs"] = gate
        for name, fn in jobs.items():
            fn()  # warm-up
            times = {True: [], False: []}
            for _ in range(3):
                for on in (True, False):
                    with checks(on):
                        times[on].append(timed(fn))
            a, b = statistics.median(times[True]), statistics.median(times[False])
            print(f"{name:24s} with checks {a:6.2f} s   without {b:6.2f} s   ratio {a / b:.3f}  (target <= 1.05)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
