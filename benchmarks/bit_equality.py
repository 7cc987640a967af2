"""Do the trained stages still train the same weights? This checkout against another revision, on this CPU.

A change to the shared training machinery (the loop, its hooks, the optimizer, the samplers) must leave every
trained stage's CPU results bit-equal. This script trains, on tiny synthetic inputs and in a fresh interpreter
per side (one torch thread), with the code of each side:

- train-gate: moe-top1 (routed recipe), moe-top1 (paper recipe), moe-top1 with retrieval route targets,
  moe-soft and average, each holding 2 identities out;
- distill from the routed moe-top1 run: the workers' input path from JPEGs, the same from a pixel cache, the
  device input path (resident pixels, here on the CPU), and the clean view only;
- pretrain-standins: clip-mini and align-mini on a small pre-training set.

It compares each run's final weights (every tensor's bytes) and its log (every column but seconds and images/s)
and prints one line per run; the exit status is 1 if any differs. The other revision comes from ``git archive``,
so the working tree is left alone. Bit-equality holds on one machine: across CPUs (AVX-512 or not) and torch
versions the floats may differ, which is why no test compares against stored numbers.

    python benchmarks/bit_equality.py                    # the working tree against HEAD (about 2 minutes)
    python benchmarks/bit_equality.py --against main~3   # against any revision
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the runs, in the order they are trained; what each side records per run
GATES = {"gate moe-top1 routed": ("moe-top1", {}), "gate moe-top1 paper": ("moe-top1", {"gate_recipe": "paper"}),
         "gate moe-top1 retrieval targets": ("moe-top1", {"route_target": "retrieval"}),
         "gate moe-soft": ("moe-soft", {}), "gate average": ("average", {})}
STUDENTS = {"distill workers, JPEG": {}, "distill workers, pixel cache": {"pixel_cache": "PIXELS"},
            "distill device input path": {"pixel_cache": "PIXELS", "input_path": "device"},
            "distill clean view only": {"views": "view0"}}

#: run in a fresh interpreter with one side's featcache first on sys.path: trains everything, prints JSON
SIDE = r'''
import hashlib, json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import featcache
from safetensors.torch import load_file
work, gates, students = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])

def digest(files):
    h = hashlib.sha256()
    for f in sorted(files):
        for k, v in sorted(load_file(str(f)).items()):
            h.update(k.encode()); h.update(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

def log_of(run):
    import csv
    with open(run / "log.csv") as fh:
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in csv.DictReader(fh)]

from featcache.synth import SynthConfig, generate
from featcache.extract.runner import ExtractConfig, run_extract
from featcache.gate.config import GateConfig
from featcache.gate.runner import run_train_gate
from featcache.distill.config import DistillConfig
from featcache.distill.runner import run_distill
from featcache.standins.config import StandinConfig
from featcache.standins.runner import run_pretrain_standins
generate(SynthConfig(out=work / "data", ids=16, cams=3, seed=0))
cache = work / "cache.h5"
run_extract(ExtractConfig(dataset="market1501", root=work / "data", backbones=("clip-tiny", "align-tiny"), out=cache,
                          views=3, batch_size=8, workers=0, image_size=(64, 32), device="cpu"))
out = {"featcache": featcache.__file__}
for name, (fusion, sets) in gates.items():
    run = work / name.replace(" ", "-")
    run_train_gate(GateConfig.from_dict(dict(cache=cache, out=run, fusion=fusion, epochs=4, batch_size=16, seed=42, device="cpu", val_ids=2, **sets)))
    out[name] = {"weights": digest([run / "model.safetensors"]), "log": log_of(run)}
teacher = work / "gate-moe-top1-routed"
for name, sets in students.items():
    run = work / name.replace(" ", "-").replace(",", "")
    sets = {k: (work / "pixels.h5" if v == "PIXELS" else v) for k, v in sets.items()}
    run_distill(DistillConfig(cache=cache, gate=teacher, out=run, student_init="random", epochs=2, batch_size=16, seed=42,
                              device="cpu", workers=0, **sets))
    out[name] = {"weights": digest([run / "model.safetensors"]), "log": log_of(run)}
paths = run_pretrain_standins(StandinConfig(root=work / "standins", ids=16, cams=3, per_id=4, image_size=(64, 32), epochs=1,
                                            batch_size=16, instances=4, device="cpu"))
for preset, folder in sorted(paths.items()):
    log = json.loads((folder / "standin.json").read_text())["log"]
    out[f"standin {preset}"] = {"weights": digest(folder.rglob("*.safetensors")),
                                "log": [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in log]}
print("\n" + json.dumps(out))
'''


def run_side(code_root: Path, work: Path) -> dict:
    """Train every run with the featcache package found under ``code_root``."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "FEATCACHE_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", SIDE, str(work), json.dumps(GATES), json.dumps(STUDENTS)], env=env,
                         capture_output=True, text=True, cwd=work)
    if res.returncode != 0:
        raise SystemExit(f"{code_root}: training failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    where = Path(out.pop("featcache")).resolve()
    if not where.is_relative_to(code_root.resolve()):
        raise SystemExit(f"{code_root}: the run imported featcache from {where}, not from this side's code")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="the revision to compare the working tree with (default: HEAD)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="featcache-bits-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.against, "featcache"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        (Path(tmp) / "a").mkdir()
        (Path(tmp) / "b").mkdir()
        before = run_side(base, Path(tmp) / "a")
        after = run_side(ROOT, Path(tmp) / "b")
    differ = 0
    for name in sorted(before.keys() | after.keys()):
        a, b = before.get(name), after.get(name)
        same_w = a is not None and b is not None and a["weights"] == b["weights"]
        same_log = a is not None and b is not None and a["log"] == b["log"]
        differ += not (same_w and same_log)
        print(f"{name:36s} weights {'equal' if same_w else 'DIFFER'}, log {'equal' if same_log else 'DIFFERS'}")
    print(f"{len(before)} runs: {'all bit-equal' if not differ else f'{differ} differ'} (the working tree against {args.against})")
    raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
