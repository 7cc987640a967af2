"""Gate ablation on synthetic feature caches: every fusion and routing recipe, several seeds, per-seed values.

Caches (``featcache.synth_cache.write_feature_cache``): ``camera`` (each
expert reliable on half of the cameras; the unreliable one keeps a quarter
of the identity signal), ``dominant`` (the first expert better everywhere),
``twin`` (equally good experts, independent noise). Every run holds out
``--val-ids`` training identities as a validation split
(featcache.training.validation) and reports, per seed, validation mAP (what
recipes are chosen on), test mAP (reported, never chosen on), routing
fidelity (the mean gate weight each camera puts on its reliable expert,
averaged over cameras) and the test mAP of true matches embedded by the
query's own expert and by the other one (``same`` / ``cross``: whether the
experts' spaces are aligned). Every row trains the same number of steps.

    python benchmarks/gate_ablation.py [--epochs 60] [--kinds camera] [--ids 24] [--rows core|align|literature|all|'NAME;NAME'] [--markdown]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featcache.cache import CacheReader, CacheSplit, known_route
from featcache.evaluation.runner import EvalConfig, run_eval
from featcache.gate.config import GateConfig
from featcache.training.rundir import RunDir
from featcache.gate.diagnostics import ap_by_expert, embed
from featcache.gate.runner import run_train_gate
from featcache.gate.train import load_run
from featcache.synth_cache import write_feature_cache
from featcache.training.sampling import steps_per_epoch

SEEDS = (42, 1337, 2024)
PAPER = {"gate_recipe": "paper"}
#: name -> (fusion, config overrides); the default recipe is "routed" (featcache.gate.config.RECIPES)
ROWS: dict[str, tuple[str, dict]] = {
    "clip alone": ("clip", {}),
    "align alone": ("align", {}),
    "average": ("average", {}),
    "average, paper losses (neck retrieval)": ("average", PAPER),
    "concat": ("concat", {}),
    "oracle router (moe-oracle)": ("moe-oracle", {}),
    "oracle, neck retrieval": ("moe-oracle", {"retrieval": "neck"}),
    "oracle, neck retrieval + expert id (1.0) + expert neck + cross-expert (1.0)": (
        "moe-oracle", {"retrieval": "neck", "expert_id": 1.0, "expert_neck": True, "cross_expert": 1.0}),
    "moe-top1, paper recipe": ("moe-top1", PAPER),
    "paper + raw gate input, detached": ("moe-top1", {**PAPER, "gate_input": "raw", "gate_detach": True}),
    "paper + zero gate init": ("moe-top1", {**PAPER, "gate_init": "zero"}),
    "paper + noisy gating (1.0) + importance (0.1)": ("moe-top1", {**PAPER, "gate_noise": 1.0, "importance": 0.1}),
    "paper + noisy gating (1.0) + importance (0.1) + load (0.1)": ("moe-top1", {**PAPER, "gate_noise": 1.0, "importance": 0.1, "load": 0.1}),
    "paper + Switch balance (0.01)": ("moe-top1", {**PAPER, "balance": 0.01}),
    "paper + straight-through top-1": ("moe-top1", {**PAPER, "train_routing": "straight-through"}),
    "paper + Gumbel top-1": ("moe-top1", {**PAPER, "train_routing": "gumbel"}),
    "paper + temperature 1.0 -> 0.5": ("moe-top1", {**PAPER, "tau_anneal": True}),
    "paper + expert loss (0.5)": ("moe-top1", {**PAPER, "expert_loss": 0.5}),
    "paper + warm-up (0.5) + route by loss (1.0)": ("moe-top1", {**PAPER, "warmup": 0.5, "route_by_loss": 1.0}),
    "paper + id-span retrieval": ("moe-top1", {**PAPER, "retrieval": "id-span"}),
    "routed recipe (default)": ("moe-top1", {}),
    "routed without route by loss": ("moe-top1", {"route_by_loss": 0.0, "gate_freeze": False}),
    "routed without warm-up": ("moe-top1", {"warmup": 0.0, "gate_freeze": False}),
    "routed without expert loss": ("moe-top1", {"expert_loss": 0.0}),
    "routed without straight-through": ("moe-top1", {"train_routing": "dense"}),
    "routed with adapted gate input": ("moe-top1", {"gate_input": "adapted", "gate_detach": False}),
    "routed without expert loss or straight-through": ("moe-top1", {"expert_loss": 0.0, "train_routing": "dense"}),
    "routed, neck retrieval": ("moe-top1", {"retrieval": "neck"}),
    "routed without gate freeze": ("moe-top1", {"gate_freeze": False}),
    "routed, neck retrieval, without gate freeze (the 2026-11-21 default)": ("moe-top1", {"retrieval": "neck", "gate_freeze": False}),
    "routed + expert id (1.0)": ("moe-top1", {"expert_id": 1.0}),
    "routed + expert neck": ("moe-top1", {"expert_neck": True}),
    "routed + cross-expert (1.0)": ("moe-top1", {"cross_expert": 1.0}),
    "routed + cross-expert (1.0), detached": ("moe-top1", {"cross_expert": 1.0, "cross_detach": True}),
    "routed, neck retrieval + expert id + expert neck + cross-expert": (
        "moe-top1", {"retrieval": "neck", "expert_id": 1.0, "expert_neck": True, "cross_expert": 1.0}),
    "moe-soft, routed recipe": ("moe-soft", {}),
}
CORE = ("clip alone", "align alone", "average", "average, paper losses (neck retrieval)", "concat", "oracle router (moe-oracle)",
        "moe-top1, paper recipe", "routed recipe (default)")
ALIGN = tuple(k for k in ROWS if (k not in CORE and not k.startswith("paper +")) or k in ("average", "oracle router (moe-oracle)", "routed recipe (default)"))
LITERATURE = tuple(k for k in ROWS if k.startswith("paper +"))


def fidelity(run: Path, cache: Path) -> float | None:
    """Mean over cameras of the gate weight on that camera's reliable expert (None where none is known)."""
    with CacheReader(cache) as c:
        names, kind, _ = c.route()
    stats = RunDir(run).gate_stats()
    if kind == "twin":
        return None
    per = stats["per_camera"]
    reliable = {c: names[int(c) % 2] if kind == "camera" else names[0] for c in per}
    return statistics.mean(per[c][reliable[c]] for c in per)


def split_test_ap(run: Path, cache: Path) -> dict:
    """Test mAP split by the expert that embedded each true match (view 0 of each image)."""
    model, cfg, meta = load_run(run)
    parts = []
    for split in ("query", "gallery"):
        sp = CacheSplit.load(cache, split)
        rows = sp.rows(0)
        with CacheReader(cache) as c:
            xs = [c.read(e, "pooled", rows) for e in meta["experts"]]
            route = known_route(c, rows, meta["experts"]) if cfg.fusion == "moe-oracle" else None
        feats, experts = embed(model, xs, route)
        parts.append((feats, experts, sp.pids, sp.camids))
    (qf, qe, qp, qc), (gf, ge, gp, gc) = parts
    return ap_by_expert(qf, gf, qp, qc, gp, gc, qe, ge)


def _ms(xs: list[float], digits: int = 1) -> str:
    xs = [x for x in xs if x is not None and not np.isnan(x)]
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f} ({', '.join(f'{x:.{digits}f}' for x in xs)})"


def run_row(cache: Path, tmp: Path, fusion: str, over: dict, seeds: list[int], epochs: int, val_ids: int) -> dict:
    out: dict[str, list] = {"val": [], "test": [], "fid": [], "same": [], "cross": []}
    for seed in seeds:
        run_dir = tmp / f"run-{time.time_ns()}"
        cfg = GateConfig.from_dict({"cache": cache, "out": run_dir, "fusion": fusion, "epochs": epochs, "seed": seed,
                                    "device": "cpu", "val_ids": val_ids, **over})
        res = run_train_gate(cfg)
        if val_ids:
            out["val"].append(100 * RunDir(res.run).val()["mAP"])
        out["test"].append(100 * run_eval(EvalConfig(cache, f"gate:{res.run}", device="cpu")).report["mAP"])
        if fusion.startswith("moe-"):
            out["fid"].append(fidelity(res.run, cache))
        if fusion.startswith("moe-"):  # a fusion that mixes every expert for every image has no "own expert"
            split = split_test_ap(res.run, cache)
            out["same"].append(100 * split["mAP_same"] if split["mAP_same"] is not None else None)
            out["cross"].append(100 * split["mAP_cross"] if split["mAP_cross"] is not None else None)
        shutil.rmtree(run_dir)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--kinds", default="camera")
    ap.add_argument("--rows", default="core", help="core, align, literature, all, or row names separated by ';'")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--ids", type=int, default=24, help="training identities in each synthetic cache")
    ap.add_argument("--cams", type=int, default=4)
    ap.add_argument("--cache-seed", type=int, default=0, help="the generator's seed (0: the caches of docs/notes/gate-routing.md)")
    ap.add_argument("--val-ids", type=int, default=-1, help="identities held out for validation (default: a quarter of --ids)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: two ablations can share 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = {"core": CORE, "align": ALIGN, "literature": LITERATURE, "all": tuple(ROWS)}.get(args.rows) or tuple(args.rows.split(";"))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown rows {unknown}; expected core, align, literature, all or names from: {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    val_ids = args.ids // 4 if args.val_ids < 0 else args.val_ids
    tmp = Path(tempfile.mkdtemp(prefix="featcache-ablation-"))
    t0 = time.perf_counter()
    try:
        for kind in args.kinds.split(","):
            cache = write_feature_cache(tmp / f"{kind}.h5", ids=args.ids, per_id=6, cams=args.cams, views=3, kind=kind,
                                        seed=args.cache_seed)
            labels = np.repeat(np.arange(args.ids - val_ids), 6)  # per_id images per identity
            steps = steps_per_epoch(labels, 32 // 4, 4) * args.epochs
            print(f"\n### {kind}: {args.ids} training identities ({val_ids} held out for validation), {args.cams} cameras, "
                  f"generator seed {args.cache_seed}; {args.epochs} epochs = {steps} steps; seeds {', '.join(map(str, seeds))}\n")
            print("| fusion / recipe | val mAP | test mAP | routing fidelity | test mAP, same expert | test mAP, cross expert |")
            print("|---|---|---|---|---|---|")
            for name in names:
                fusion, over = ROWS[name]
                if fusion == "moe-oracle" and kind == "twin":
                    continue
                r = run_row(cache, tmp, fusion, over, seeds, args.epochs, val_ids)
                print(f"| {name} | {_ms(r['val'])} | {_ms(r['test'])} | {_ms(r['fid'], 2)} | {_ms(r['same'])} | {_ms(r['cross'])} |",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
