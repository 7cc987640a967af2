"""Gate-routing ablation: every routing recipe on three kinds of synthetic feature cache, over three seeds.

Kinds (``featcache.synth_cache.write_feature_cache``): ``camera`` (each expert
reliable on half of the cameras), ``dominant`` (the first expert better
everywhere), ``twin`` (equally good experts, independent noise). For each
kind and seed (42, 1337, 2024: the paper's), it trains and evaluates the
single experts, ``average``, ``concat``, the oracle router (``moe-oracle``,
where the reliable expert is known) and ``moe-top1`` under each recipe.
It prints mean ± std of mAP and, where the reliable expert is known, the
routing fidelity: the mean gate weight each camera puts on its reliable
expert, averaged over cameras.

    python benchmarks/gate_ablation.py [--epochs 15] [--kinds camera,dominant,twin] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py

from featcache.evaluation.runner import EvalConfig, run_eval
from featcache.gate.config import GateConfig
from featcache.gate.runner import run_train_gate
from featcache.synth_cache import write_feature_cache

SEEDS = (42, 1337, 2024)
#: name -> (fusion, config overrides)
ROWS: dict[str, tuple[str, dict]] = {
    "clip alone": ("clip", {}),
    "align alone": ("align", {}),
    "average": ("average", {}),
    "concat": ("concat", {}),
    "oracle router (moe-oracle)": ("moe-oracle", {}),
    "moe-top1, paper recipe": ("moe-top1", {"gate_recipe": "paper"}),
    "paper + raw gate input, detached": ("moe-top1", {"gate_recipe": "paper", "gate_input": "raw", "gate_detach": True}),
    "paper + zero gate init": ("moe-top1", {"gate_recipe": "paper", "gate_init": "zero"}),
    "paper + noisy gating (1.0) + importance (0.1)": ("moe-top1", {"gate_recipe": "paper", "gate_noise": 1.0, "importance": 0.1}),
    "paper + Switch balance (0.01)": ("moe-top1", {"gate_recipe": "paper", "balance": 0.01}),
    "paper + straight-through top-1": ("moe-top1", {"gate_recipe": "paper", "train_routing": "straight-through"}),
    "paper + Gumbel top-1": ("moe-top1", {"gate_recipe": "paper", "train_routing": "gumbel"}),
    "paper + temperature 1.0 -> 0.5": ("moe-top1", {"gate_recipe": "paper", "tau_anneal": True}),
    "paper + expert loss (0.5)": ("moe-top1", {"gate_recipe": "paper", "expert_loss": 0.5}),
    "paper + warm-up (0.5) + route by loss (1.0)": ("moe-top1", {"gate_recipe": "paper", "warmup": 0.5, "route_by_loss": 1.0}),
    "oracle + expert loss (0.5)": ("moe-oracle", {"expert_loss": 0.5}),
    "oracle + agreement (1.0)": ("moe-oracle", {"agreement": 1.0}),
    "oracle + expert loss + agreement": ("moe-oracle", {"expert_loss": 0.5, "agreement": 1.0}),
    "routed + agreement (1.0)": ("moe-top1", {"gate_recipe": "routed", "agreement": 1.0}),
    "paper + noisy gating (1.0) + importance (0.1) + load (0.1)": ("moe-top1", {"gate_recipe": "paper", "gate_noise": 1.0, "importance": 0.1, "load": 0.1}),
    "routed recipe (default)": ("moe-top1", {"gate_recipe": "routed"}),
    "routed without route by loss": ("moe-top1", {"gate_recipe": "routed", "route_by_loss": 0.0}),
    "routed without warm-up": ("moe-top1", {"gate_recipe": "routed", "warmup": 0.0}),
    "routed without expert loss": ("moe-top1", {"gate_recipe": "routed", "expert_loss": 0.0}),
    "routed without straight-through": ("moe-top1", {"gate_recipe": "routed", "train_routing": "dense"}),
    "routed with adapted gate input": ("moe-top1", {"gate_recipe": "routed", "gate_input": "adapted", "gate_detach": False}),
    "moe-soft, routed recipe": ("moe-soft", {"gate_recipe": "routed"}),
}


def fidelity(run: Path, cache: Path) -> float | None:
    """Mean over cameras of the gate weight on that camera's reliable expert (None where none is known)."""
    with h5py.File(cache, "r") as f:
        kind = f["synthetic"].attrs["kind"]
        names = json.loads(f["synthetic"].attrs["experts"])
    stats = json.loads((run / "gate_stats.json").read_text())
    if kind == "twin":
        return None
    per = stats["per_camera"]
    reliable = {c: names[int(c) % 2] if kind == "camera" else names[0] for c in per}
    return statistics.mean(per[c][reliable[c]] for c in per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--kinds", default="camera,dominant,twin")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--ids", type=int, default=24, help="training identities in each synthetic cache")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = {k: v for k, v in ROWS.items() if not args.rows or k in args.rows.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="featcache-ablation-"))
    t0 = time.perf_counter()
    try:
        for kind in args.kinds.split(","):
            cache = write_feature_cache(tmp / f"{kind}.h5", ids=args.ids, per_id=6, cams=4, views=3, kind=kind)
            print(f"\n### {kind} ({args.epochs} epochs, seeds {', '.join(map(str, seeds))})\n")
            print("| fusion / recipe | mAP | routing fidelity |\n|---|---|---|")
            for name, (fusion, over) in rows.items():
                if fusion == "moe-oracle" and kind == "twin":
                    continue
                maps, fids = [], []
                for seed in seeds:
                    out = tmp / f"{kind}-{len(list(tmp.iterdir()))}"
                    cfg = GateConfig.from_dict({"cache": cache, "out": out, "fusion": fusion, "epochs": args.epochs,
                                                "seed": seed, "device": "cpu", **over})
                    res = run_train_gate(cfg)
                    maps.append(100 * run_eval(EvalConfig(cache, f"gate:{res.run}", device="cpu")).report["mAP"])
                    if fusion.startswith("moe-"):
                        fids.append(fidelity(res.run, cache))
                    shutil.rmtree(out)
                m = f"{statistics.mean(maps):.1f} ± {statistics.stdev(maps) if len(maps) > 1 else 0:.1f}"
                fid = [x for x in fids if x is not None]
                f = f"{statistics.mean(fid):.2f} ± {statistics.stdev(fid) if len(fid) > 1 else 0:.2f}" if fid else "–"
                print(f"| {name} | {m} | {f} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
