"""Does top-1 routing win once the adapters have seen enough identities? The demo's world at growing sizes.

The demo's stand-ins (``clip-mini``, ``align-mini``, as ``featcache pretrain-standins`` makes them), renderer,
cameras and conditions (day 1-2, night 3-4, blur 5-6), at N training identities the adapters and gate train on,
with N / 4 more held out for validation (the demo's 40 + 10) and a test split of fixed size (50 identities, the
same people and images at every N: ``featcache synth --train-ids --test-ids``). Per N and seed, with the default
recipe and the demo's 60 epochs:

- validation and test mAP of ``clip``, ``align``, ``average``, ``concat``, ``moe-top1`` and ``moe-oracle``,
  overall and by condition (test: queries of that condition's cameras against the whole gallery);
- the teacher's and the oracle's validation mAP of same-expert and cross-expert matches;
- the teacher's mean gate weight on each condition's winner.

The oracle routes each condition to its winner: of the adapted experts (``clip``, ``align``), the one with the
higher validation mAP on that condition, chosen per N and seed from those two runs and recorded.

    python benchmarks/gate_scale.py --out gate_scale.json            # every N (about an hour on 2 cores)
    python benchmarks/gate_scale.py --out gate_scale.json --sizes 40  # one size; results are merged into --out
    python benchmarks/gate_scale.py --report gate_scale.json --plots docs/images   # tables and the two plots
    python benchmarks/gate_scale.py --out gate_scale.json --variants 100   # the alignment variants at N = 100

The alignment variants (``VARIANTS``) each train ``average`` and ``moe-top1`` with the same extra losses or
data, per seed, so that the teacher is compared with the fusion it must reach under equal training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import featcache  # noqa: E402
from featcache.cache import CacheSplit  # noqa: E402
from featcache.evaluation.features import FeatureContext  # noqa: E402
from featcache.extract.config import ExtractConfig  # noqa: E402
from featcache.extract.runner import run_extract  # noqa: E402
from featcache.gate.config import GateConfig  # noqa: E402
from featcache.gate.features import GateFeatures  # noqa: E402
from featcache.gate.runner import run_train_gate  # noqa: E402
from featcache.standins.config import StandinConfig  # noqa: E402
from featcache.standins.runner import run_pretrain_standins  # noqa: E402
from featcache.synth import SynthConfig, generate  # noqa: E402
from featcache.training.rundir import RunDir  # noqa: E402
from featcache.training.sampling import steps_per_epoch  # noqa: E402

SIZES = (40, 100, 200, 400)
SEEDS = (42, 1337, 2024)
TEST_IDS = 50
EPOCHS = 60
CAMS, NIGHT, BLUR = 6, (3, 4), (5, 6)
CONDITION = {1: "day", 2: "day", 3: "night", 4: "night", 5: "blur", 6: "blur"}
FUSIONS = ("clip", "align", "average", "concat", "moe-top1")  # then moe-oracle, once the winners are known
EXPERT_OF = {"clip": "clip-mini", "align": "align-mini"}
#: what could align the experts where identities alone do not: (GateConfig overrides, synth images per camera)
VARIANTS = {
    "id+neck+cross": ({"expert_id": 1.0, "expert_neck": True, "cross_expert": 1.0}, None),
    "agreement": ({"agreement": 1.0}, None),
    "2x images": ({}, (4, 8)),
}


def by_condition(per_camera: dict[str, float]) -> dict[str, float]:
    """Mean over each condition's cameras of a per-camera figure."""
    out: dict[str, list[float]] = {}
    for cam, v in per_camera.items():
        out.setdefault(CONDITION[int(cam)], []).append(v)
    return {c: float(np.mean(v)) for c, v in out.items()}


def test_map(run: Path, cache: Path) -> dict:
    """Test mAP of a gate run (view 0, as ``featcache eval``), overall and for the queries of each condition."""
    src = GateFeatures(run)
    ctx = FeatureContext(device="cpu")
    q, g = CacheSplit.load(cache, "query"), CacheSplit.load(cache, "gallery")
    qf, gf = src.features(q, ctx), src.features(g, ctx)
    out = {"all": featcache.evaluate(qf, gf, q.pids, g.pids, q.camids, g.camids)["mAP"]}
    conds = np.array([CONDITION[int(c)] for c in q.camids])
    for cond in ("day", "night", "blur"):
        m = conds == cond
        out[cond] = featcache.evaluate(qf[m], gf, q.pids[m], g.pids, q.camids[m], g.camids)["mAP"]
    return out


def train(cache: Path, out: Path, fusion: str, seed: int, val_ids: int, **over) -> dict:
    """One gate run: its validation report, gate statistics, test mAP and steps."""
    t0 = time.perf_counter()
    res = run_train_gate(GateConfig.from_dict(dict(cache=cache, out=out, fusion=fusion, epochs=EPOCHS, seed=seed, device="cpu", val_ids=val_ids, **over)))
    rd = RunDir(res.run)
    val = rd.val()
    row = {"val": val["mAP"], "val_by_condition": by_condition(val.get("mAP_by_camera", {})),
           "val_same": val.get("mAP_same"), "val_cross": val.get("mAP_cross"), "test": test_map(res.run, cache),
           "seconds": time.perf_counter() - t0}
    if rd.gate_stats() is not None:
        row["gate_per_camera"] = rd.gate_stats()["per_camera"]
    return row


def build(n: int, tmp: Path, standins: dict[str, Path], images_per_cam: tuple[int, int] | None = None) -> Path:
    """The dataset of one size (N + N/4 training identities, the fixed test split) and its cache."""
    tag = f"{n}" if images_per_cam is None else f"{n}-{images_per_cam[0]}x{images_per_cam[1]}"
    root, cache = tmp / f"data-{tag}", tmp / f"cache-{tag}.h5"
    extra = {} if images_per_cam is None else {"images_per_cam": images_per_cam}
    generate(SynthConfig(root, "market1501", train_ids=n + n // 4, test_ids=TEST_IDS, cams=CAMS, seed=0,
                         night_cams=NIGHT, blur_cams=BLUR, **extra))
    run_extract(ExtractConfig(dataset="market1501", root=root, backbones=("clip-mini", "align-mini"), out=cache, views=4,
                              batch_size=32, workers=0, image_size=(128, 64), device="cpu",
                              weights={k: str(v) for k, v in standins.items()}))
    return cache


def one_size(n: int, tmp: Path, standins: dict[str, Path]) -> dict:
    """Every run of one size: the dataset, its cache, then each fusion and the oracle per seed."""
    val_ids = n // 4
    cache = build(n, tmp, standins)
    train_split = CacheSplit.load(cache, "train")
    out: dict = {"n": n, "val_ids": val_ids, "test_ids": TEST_IDS, "train_images": len(train_split),
                 "steps_per_run": EPOCHS * steps_per_epoch_of(cache, val_ids), "seeds": {}}
    for seed in SEEDS:
        rows = {f: train(cache, tmp / f"{n}-{f}-{seed}", f, seed, val_ids) for f in FUSIONS}
        winners = {c: max(("clip", "align"), key=lambda f: rows[f]["val_by_condition"].get(c, -1)) for c in ("day", "night", "blur")}
        route = tuple(f"{c}={EXPERT_OF[w]}" for c, w in winners.items())
        rows["moe-oracle"] = train(cache, tmp / f"{n}-oracle-{seed}", "moe-oracle", seed, val_ids, oracle_route=route)
        teacher = rows["moe-top1"].get("gate_per_camera", {})
        rows["moe-top1"]["weight_on_winner"] = {
            c: float(np.mean([teacher[str(cam)][EXPERT_OF[w]] for cam, cc in CONDITION.items() if cc == c and str(cam) in teacher]))
            for c, w in winners.items()}
        out["seeds"][str(seed)] = {"winners": winners, "rows": rows}
        print(f"N={n} seed {seed}: " + ", ".join(f"{f} val {100 * r['val']:.1f} test {100 * r['test']['all']:.1f}"
                                                  for f, r in rows.items()), flush=True)
    return out


def variants(n: int, tmp: Path, standins: dict[str, Path]) -> dict:
    """``average`` and ``moe-top1`` under each alignment variant at size ``n``, per seed."""
    out: dict = {}
    for name, (over, images_per_cam) in VARIANTS.items():
        cache = build(n, tmp, standins, images_per_cam)
        rec: dict = {"overrides": over, "images_per_cam": images_per_cam, "train_images": len(CacheSplit.load(cache, "train")),
                     "steps_per_run": EPOCHS * steps_per_epoch_of(cache, n // 4), "seeds": {}}
        for seed in SEEDS:
            rows = {f: train(cache, tmp / f"{n}-{name}-{f}-{seed}", f, seed, n // 4, **over) for f in ("average", "moe-top1")}
            rec["seeds"][str(seed)] = {"rows": rows}
            print(f"N={n} {name} seed {seed}: " + ", ".join(f"{f} val {100 * r['val']:.1f} cross {100 * (r['val_cross'] or 0):.1f} "
                                                           f"test {100 * r['test']['all']:.1f}" for f, r in rows.items()), flush=True)
        out[name] = rec
    return out


def steps_per_epoch_of(cache: Path, val_ids: int) -> int:
    """The optimisation steps of one epoch of these runs (PK batches of 8 identities x 4 images)."""
    from featcache.gate.data import load_train

    data = load_train(cache, ["clip-mini", "align-mini"], val_ids)
    return steps_per_epoch(data.labels, 8, 4)


def run(args) -> None:
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {"sizes": {}}
    results.update({"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "seeds": list(SEEDS),
                    "epochs": EPOCHS, "recipe": "routed (the default)", "date": time.strftime("%Y-%m-%d")})
    standins = run_pretrain_standins(StandinConfig())
    with tempfile.TemporaryDirectory(prefix="featcache-gate-scale-") as tmp:
        if args.variants:
            t0 = time.perf_counter()
            results.setdefault("variants", {})[str(args.variants)] = {**variants(args.variants, Path(tmp), standins),
                                                                      "seconds": time.perf_counter() - t0}
            Path(args.out).write_text(json.dumps(results, indent=1))
            return
        for n in args.sizes:
            t0 = time.perf_counter()
            results["sizes"][str(n)] = {**one_size(n, Path(tmp), standins), "seconds": time.perf_counter() - t0}
            Path(args.out).write_text(json.dumps(results, indent=1))  # after each size: a partial study is kept
            print(f"N={n} done in {time.perf_counter() - t0:.0f} s; written to {args.out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gate_scale.json", help="results (JSON), merged with what it already holds")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(SIZES),
                    help="training identities, comma-separated (default 40,100,200,400)")
    ap.add_argument("--variants", type=int, help="run the alignment variants at this N instead of the sizes")
    ap.add_argument("--report", help="print the tables of a results file instead of running")
    ap.add_argument("--plots", help="with --report: folder for the two plots")
    args = ap.parse_args()
    if args.report:
        from gate_scale_report import report

        report(Path(args.report), Path(args.plots) if args.plots else None)
        return
    run(args)


if __name__ == "__main__":
    main()
