"""Distillation on one rank against two: training images/s of ``featcache distill`` alone and under ``torchrun
--nproc-per-node 2``, from one run of this script, on the same machine.

A synthetic Market-1501 layout (``--ids`` identities) is extracted with the tiny presets, a gate is trained for one
epoch, and the student is distilled for ``--epochs`` epochs on each side, with the same options. Each side's
images/s is the epochs' training images over the epochs' seconds, from the runs' ``log.csv`` (a rank logs its own
share: the two-rank figure counts both ranks' images). On a machine with fewer cores than two ranks need, the
ratio says more about contention than about scaling; it shows that nothing is serialised by mistake.

    python benchmarks/distill_ranks.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import device_line  # noqa: E402  (first: offline hubs)


def featcache(*args: str, ranks: int = 1) -> float:
    """Run a featcache command (under torchrun for ``ranks`` > 1); its wall seconds."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "featcache"] \
        if ranks > 1 else [sys.executable, "-m", "featcache"]
    t0 = time.perf_counter()
    subprocess.run([*launcher, *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def images_per_second(run: Path, ranks: int) -> float:
    from featcache.training.rundir import RunDir

    rows = RunDir(run).log_rows()
    images = sum(float(r["images_per_s"]) * float(r["seconds"]) for r in rows) * ranks  # rank 0 logs its share
    return images / sum(float(r["seconds"]) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=60, help="identities of the synthetic dataset (half train)")
    ap.add_argument("--epochs", type=int, default=3, help="distillation epochs on each side")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (each rank its own GPU)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distill-ranks-"))
    featcache("synth", str(tmp / "ds"), "--ids", str(args.ids))
    featcache("extract", "--dataset", "market1501", "--root", str(tmp / "ds"), "--backbone", "clip-tiny", "--backbone", "align-tiny",
              "--out", str(tmp / "c.h5"), "--image-size", "128x64", "--views", "2", "--device", args.device)
    featcache("train-gate", "--cache", str(tmp / "c.h5"), "--out", str(tmp / "gate"), "--epochs", "1", "--device", args.device)
    rates = {}
    for ranks in (1, 2):
        run = tmp / f"student-{ranks}"
        featcache("distill", "--cache", str(tmp / "c.h5"), "--gate", str(tmp / "gate"), "--out", str(run), "--epochs", str(args.epochs),
                  "--student-init", "random", "--device", args.device, "--workers", "0", "--no-tensorboard", ranks=ranks)
        rates[ranks] = images_per_second(run, ranks)
    print(device_line())
    print(f"distill, {args.epochs} epochs, {args.ids} identities at 128x64: 1 rank {rates[1]:.1f} img/s, "
          f"2 ranks {rates[2]:.1f} img/s, ratio {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
