"""Choosing distillation weights on the validation split: students trained on a finished pipeline's teacher.

Reads a pipeline's output folder (its cache, pixel cache and ``moe-top1`` gate runs, one per seed; the gate
must have held identities out with ``train-gate.val_ids``), trains the pipeline's student once per row and
seed with the row's overrides of its ``distill`` section, and prints per seed the student's validation mAP and
its agreement with the teacher on the validation identities (top-10 overlap of ranked lists, rank
correlation of similarities). Test-split figures are printed only with ``--test``, for rows whose values are
already chosen (the ablation of docs/notes/distill-weights.md): the choice is made on validation. Every row trains the same
steps.

    python benchmarks/distill_select.py OUT_DIR [--pipeline pipelines/demo.yaml] [--seeds 42,1337,2024]
        --row 'task: losses=id,tri' --row 'kd: ' --row 'feat x10: lambda_feat=3' [--test]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from featcache.distill.config import DistillConfig
from featcache.distill.runner import run_distill
from featcache.evaluation.runner import EvalConfig, run_eval


def parse_row(text: str) -> tuple[str, dict]:
    """``NAME: key=value; key=value`` -> (name, overrides); values parsed as YAML scalars."""
    name, _, rest = text.partition(":")
    over = {}
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        k, _, v = item.partition("=")
        over[k.strip()] = yaml.safe_load(v)
    return name.strip(), over


def find_gate(out: Path, fusion: str, seed: int) -> Path:
    runs = sorted((out / "gate").glob(f"{fusion}-seed{seed}-*"))
    runs = [r for r in runs if (r / "teacher_targets.h5").is_file()]
    if len(runs) != 1:  # an edited pipeline leaves older runs beside the current one: say which to use
        raise SystemExit(f"{out}/gate: {len(runs)} finished {fusion} runs for seed {seed} "
                         f"({', '.join(r.name for r in runs) or 'none'}); expected one")
    return runs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a finished pipeline's output folder")
    ap.add_argument("--pipeline", type=Path, default=Path("pipelines/demo.yaml"), help="its YAML (for the distill section)")
    ap.add_argument("--seeds", default="42,1337,2024")
    ap.add_argument("--teacher", default="moe-top1")
    ap.add_argument("--row", action="append", required=True, help="'NAME: key=value; key=value' (the distill section's keys)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test", action="store_true", help="also test mAP and test top-10 agreement (report chosen rows only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    section = dict(yaml.safe_load(args.pipeline.read_text()).get("distill") or {})
    caches = sorted(p for p in args.out.glob("cache-*.h5"))
    if len(caches) != 1:
        raise SystemExit(f"{args.out}: expected one cache-*.h5, found {len(caches)}")
    section.pop("pixel_cache", None)
    pixels = sorted(args.out.glob("pixels-*.h5"))  # the pipeline's pixel cache, if it has one
    seeds = [int(s) for s in args.seeds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="featcache-select-"))
    print(f"cache {caches[0].name}; distill section {section}; seeds {seeds}", flush=True)
    try:
        for text in args.row:
            name, over = parse_row(text)
            cols: dict[str, list[float]] = {"val mAP": [], "top-10 %": [], "rank corr": []}
            if args.test:
                cols.update({"test mAP": [], "test top-10 %": []})
            t0 = time.perf_counter()
            for seed in seeds:
                cfg = DistillConfig.from_dict({**section, **over, "cache": caches[0], "gate": find_gate(args.out, args.teacher, seed),
                                               "out": tmp / f"{name}-{seed}", "seed": seed, "device": "cpu",
                                               "pixel_cache": pixels[0] if pixels else None})
                res = run_distill(cfg)
                if res.val is None or res.val["mAP"] is None:
                    raise SystemExit(f"{cfg.gate}: the teacher held no identities out (train-gate.val_ids)")
                cols["val mAP"].append(100 * res.val["mAP"])
                cols["top-10 %"].append(100 * res.val["agreement"]["top_k_overlap"])
                cols["rank corr"].append(res.val["agreement"]["rank_correlation"])
                if args.test:
                    ev = run_eval(EvalConfig(cache=caches[0], model=f"student:{res.run}", agree_with=f"gate:{cfg.gate}", device="cpu"))
                    cols["test mAP"].append(100 * ev.report["mAP"])
                    cols["test top-10 %"].append(100 * ev.report["agreement"]["top_k_overlap"])
                shutil.rmtree(res.run, ignore_errors=True)
            cells = "  ".join(f"{k} {statistics.mean(v):.3f} [{', '.join(f'{x:.3f}' for x in v)}]" for k, v in cols.items())
            print(f"{name:28s} {cells}  ({cfg.epochs} epochs, {time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
