"""The teacher, the distilled student and the task-loss-only student side by side, on one synthetic dataset.

A synthetic Market-1501 is extracted with the tiny presets (random weights),
a gate is trained with the default recipe, then the same ResNet-18 student
(random init, same seed and schedule) is distilled with each set of loss terms.
For each model: mAP, R1 and mINP on the query set, and the top-10 agreement
with the teacher (the share of each query's ten best gallery entries both
rank there); for each student also every loss term measured after training
over all cached training views (eval mode, fixed batches).

The tiny presets have random weights: these numbers show what the method does
in miniature, not results of MoE-KD on real data.

    python benchmarks/distill_comparison.py [--ids 40] [--epochs 30] [--ablation]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from featcache.distill.config import DistillConfig  # noqa: E402
from featcache.distill.load import load_student  # noqa: E402
from featcache.distill.runner import run_distill  # noqa: E402
from featcache.distill.students import build_student  # noqa: E402
from featcache.distill.objective import measure_terms  # noqa: E402
from featcache.distill.train import prepare  # noqa: E402
from featcache.evaluation.runner import EvalConfig, run_eval  # noqa: E402
from featcache.extract.config import ExtractConfig  # noqa: E402
from featcache.extract.runner import run_extract  # noqa: E402
from featcache.gate.config import GateConfig  # noqa: E402
from featcache.gate.runner import run_train_gate  # noqa: E402
from featcache.preprocess import parse_size  # noqa: E402
from featcache.synth import SynthConfig, generate  # noqa: E402

TERMS = ("id", "tri", "kd", "feat", "att", "rel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=40)
    ap.add_argument("--cams", type=int, default=6)
    ap.add_argument("--image-size", default="64x32")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--ablation", action="store_true", help="also each KD term switched off alone")
    ap.add_argument("--kd-space", default="retrieval", choices=("retrieval", "literal"),
                    help="where L_feat and L_rel compare (literal: the setup of docs/notes/distill-weights.md's 2026-11-22 table)")
    ap.add_argument("--keep", type=Path, help="keep the runs here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
        run(args.keep or Path(tmp), args)


def run(tmp: Path, args) -> None:
    t_start = time.perf_counter()
    root, cache, gate = tmp / "market", tmp / "market.h5", tmp / "gate"
    size = parse_size(args.image_size)
    generate(SynthConfig(root, "market1501", ids=args.ids, cams=args.cams, seed=0))
    run_extract(ExtractConfig(dataset="market1501", root=root, backbones=("clip-tiny", "align-tiny"), out=cache, views=4,
                              image_size=size, device="cpu"))
    run_train_gate(GateConfig.from_dict(dict(cache=cache, out=gate, seed=args.seed, device="cpu")))
    variants = {"distilled (all terms)": "id,tri,kd,feat,att,rel", "task loss only": "id,tri"}
    if args.ablation:
        for term in ("kd", "feat", "att", "rel"):
            variants[f"without {term}"] = ",".join(t for t in TERMS if t != term)
    rows = [("teacher (gate, default recipe)", report(cache, f"gate:{gate}", gate), None)]
    cpu = torch.device("cpu")
    for name, losses in variants.items():
        out = tmp / name.split()[0].replace("(", "") / losses.replace(",", "-")
        cfg = DistillConfig(cache=cache, gate=gate, out=out, student_init="random", epochs=args.epochs, seed=args.seed, kd_space=args.kd_space,
                            lr=args.lr, device="cpu", losses=losses, pixel_cache=tmp / "pixels.h5")
        teacher, ds = prepare(cfg)
        if not rows[1:]:
            before = measure_terms(build_student("resnet18", teacher.n_classes, "random", seed=args.seed), teacher, ds, cache, cfg, cpu)
            rows.append(("(the student before training)", None, before))
        run_distill(cfg)
        terms = measure_terms(load_student(out)[0], teacher, ds, cache, cfg, cpu)
        rows.append((f"{name}: --losses {losses}", report(cache, f"student:{out}", gate), terms))
    print(f"\nsynthetic Market-1501: {args.ids} identities, {args.cams} cameras, {size[0]}x{size[1]}, tiny presets (random "
          f"weights); ResNet-18 from random init, {args.epochs} epochs, lr {args.lr}, seed {args.seed}; "
          f"{time.perf_counter() - t_start:.0f} s in all\n")
    print("| model | mAP | R1 | mINP | top-10 agreement with the teacher | " + " | ".join(f"L_{t}" for t in TERMS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(TERMS))
    for name, rep, terms in rows:
        m = ([f"{100 * rep['mAP']:.2f}", f"{100 * rep['cmc']['1']:.2f}", f"{100 * rep['mINP']:.2f}",
              f"{100 * rep['agreement']['top_k_overlap']:.1f} %"] if rep else ["", "", "", ""])
        t = [f"{terms[k]:.4g}" for k in TERMS] if terms else [""] * len(TERMS)
        print(f"| {name} | " + " | ".join(m + t) + " |")


def report(cache: Path, model: str, gate: Path) -> dict:
    return run_eval(EvalConfig(cache=cache, model=model, agree_with=f"gate:{gate}", device="cpu")).report


if __name__ == "__main__":
    main()
