"""The report a person reads: ``OUT/report/index.md`` and its HTML rendering, with every figure linked.

A table in the shape of the paper's Tables 3 and 5 (mAP, R1, R5, mINP as mean ± std over the seeds, and
parameters, FLOPs and latency where profiled), the CMC curves of every model in one plot, the teacher's gate
heat-map, histogram and routing curves, ranked-list examples and the loss curves. When a backbone had random
weights the report says, first, that its numbers measure the pipeline and not the method.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.fileio import atomic_write, save_figure
from featcache.pipeline.page import to_html
from featcache.pipeline.recipes import RECIPE_NOTE, recipe_label, recipe_of
from featcache.training.rundir import RunDir

logger = logging.getLogger(__name__)


def figure_link(caption: str, file: str) -> str:
    """A figure shown in the page and linked to its PNG."""
    return f"[![{caption}]({file})]({file})"


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.{digits}f}" if len(v) == 1 else f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def write_report(plan) -> Path:
    """Write ``report/index.md`` and ``report/index.html`` from the pipeline's eval and profile outputs."""
    s = plan.pipeline.settings
    rep_dir = plan.out / "report"
    rep_dir.mkdir(parents=True, exist_ok=True)
    reports = {row.label: [json.loads(p.read_text()) for _, p in sorted(row.json.items())] for row in plan.rows}
    random = sorted({b for reps in reports.values() for r in reps for b in r.get("random_init_backbones", [])})
    profile = {r["model"]: r for r in json.loads(plan.profile.read_text())} if plan.profile and plan.profile.is_file() else {}
    lines = [f"# featcache report: {plan.pipeline.source.name}", ""]
    standins = standin_backbones_of(plan)
    if standins:
        lines += [f"> **{', '.join(standins)} are synthetic stand-ins, not CLIP and ALIGN.** Tiny models of the two "
                  "families, pre-trained by `featcache pretrain-standins` (or shipped with featcache) on a synthetic set of other people, each "
                  "seeing it its own way (docs/demo.md). The numbers show the method's mechanics on synthetic data; they "
                  "are not results of MoE-KD. The real thing needs the CLIP ViT-B/16 and ALIGN weights, the dataset and a "
                  "GPU: `featcache run market1501` (see the README).", ""]
    if random:
        lines += [f"> **{', '.join(random)} have random weights.** These numbers measure the pipeline, not the method: "
                  "they are not results of MoE-KD. For the real thing, supply the weights and the dataset and run "
                  "`featcache run market1501` (see the README).", ""]
    partial = [f"{row.label} (seed {seed}): {r['trained_on_partial']['images_used']} of "
               f"{r['trained_on_partial']['images_total']}" for row in plan.rows
               for seed, r in zip(sorted(row.json), reports[row.label]) if r.get("trained_on_partial")]
    if partial:
        lines += [f"> **Trained on part of the training images** (--allow-partial; the extraction had not finished): "
                  f"{'; '.join(partial)}. These rows are not comparable with a run on the whole training split.", ""]
    first = next(iter(reports.values()))[0]
    lines += [f"Dataset {first['protocol']['dataset']} ({first['protocol']['rule']}); {first['query_size']} queries, "
              f"{first['gallery_size']} gallery images; seeds {', '.join(map(str, s.seeds))} (mean ± std over seeds where "
              f"more than one); featcache {__version__}. Pipeline as run: `{plan.out / 'pipeline.yaml'}`.", ""]
    modes = sorted({(r.get("search") or {"mode": "exact"})["mode"] for reps in reports.values() for r in reps})
    approx = [r["search"] for reps in reports.values() for r in reps if (r.get("search") or {}).get("mode") == "approx"]
    lines += [f"Search: {' and '.join(modes)}" + (" (every score: the protocol's metrics)." if modes == ["exact"] else
              f" - APPROXIMATE ({approx[0]['index']}): mAP is AP@{approx[0]['k']} and CMC and mINP count positives "
              "beyond each list as missed; these are not the protocol's exact numbers."), ""]
    lines += _dataset(plan.cache)
    lines += _table(plan, reports, profile)
    lines += ["", "## CMC", "", figure_link("CMC curves", "cmc.png"), ""]
    _cmc_plot(plan, reports, rep_dir / "cmc.png")
    lines += _condition_section(plan)
    lines += _gate_section(plan, rep_dir)
    lines += _ranked_section(plan, rep_dir)
    lines += _loss_section(plan, rep_dir)
    lines += ["", "The rows above, by stable names, for programs: `summary.json`.", ""]
    summary = summarise(plan, reports)
    atomic_write(rep_dir / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    text = "\n".join(lines) + "\n"
    atomic_write(rep_dir / "index.md", lambda p: p.write_text(text))
    atomic_write(rep_dir / "index.html", lambda p: p.write_text(to_html(text, f"featcache report: {plan.pipeline.source.name}")))
    return rep_dir / "index.md"


def standin_backbones_of(plan) -> list[str]:
    """The cached backbones that are stand-ins, whether the pipeline trained them or the extract section named weights."""
    from featcache.backbones.presets import PresetError, available_presets, get_preset
    from featcache.cache import cache_identity

    names = list(cache_identity(plan.cache).backbones)
    known = set(available_presets())  # caches written by tests and benchmarks may name simulated backbones
    try:
        return [n for n in names if n in known and get_preset(n).standin]
    except PresetError:
        return []


def summarise(plan, reports: dict) -> dict:
    """``report/summary.json``: each row under its stable name (``expert:PRESET``, ``fusion:NAME``, ``teacher``,
    ``student:kd``, ``student:task``) with mAP, R1, R5 and mINP in % (mean, std and per seed), and the teacher's
    mean gate weight per camera and expert."""
    s = plan.pipeline.settings
    rows: dict[str, dict] = {}
    for row in plan.rows:
        reps = reports[row.label]
        trained = row.group != "expert" and row.key != "fusion:raw-concat"  # the others have no seed
        entry: dict = {"label": row.label, "seeds": sorted(row.json) if trained else [], "recipe": recipe_of(row)}
        for metric, get in (("mAP", lambda r: r["mAP"]), ("R1", lambda r: r["cmc"]["1"]), ("R5", lambda r: r["cmc"]["5"]),
                            ("mINP", lambda r: r["mINP"])):
            entry[metric] = _stats([get(r) for r in reps])
        entry["search"] = sorted({(r.get("search") or {"mode": "exact"})["mode"] for r in reps})
        entry["trained_on_partial"] = [r.get("trained_on_partial") for r in reps]  # per seed; None: the whole split
        agree = [r["agreement"] for r in reps if r.get("agreement")]
        if agree:  # test split, with the teacher
            entry["agreement"] = {k: _stats([a[k] for a in agree], AGREE_SCALE[k]) for k in AGREE_SCALE if all(k in a for a in agree)}
        val = validation_maps(row)
        if val:
            entry["val_mAP"] = _stats(val)
        val_agree = validation_agreement(row)
        if val_agree:
            entry["val_agreement"] = {k: _stats(v, AGREE_SCALE[k]) for k, v in val_agree.items()}
        rows[row.key or row.label] = entry
    out: dict = {"pipeline": str(plan.pipeline.source), "featcache": __version__, "seeds": list(s.seeds),
                 "standins": sorted(standin_backbones_of(plan)), "rows": rows}
    run = plan.gates.get((s.teacher, s.seeds[0]))
    stats = RunDir(run).gate_stats() if run is not None else None
    if stats is not None:
        out["teacher_gate_per_camera"] = stats.get("per_camera", {})
    by_condition = condition_table(plan)
    if by_condition:
        out["by_condition"] = by_condition
    return out


def _val_reports(row) -> list[dict]:
    """A trained row's val.json per seed (identities held out of training), or none unless every seed has one."""
    reports = [RunDir(run).val() for _, run in sorted(row.run.items())]
    return reports if reports and all(r is not None for r in reports) else []  # type: ignore[return-value]


def validation_maps(row) -> list[float]:
    """A trained row's validation mAP per seed, or none."""
    maps = [v["mAP"] for v in _val_reports(row)]
    return maps if maps and None not in maps else []


def validation_agreement(row) -> dict[str, list[float]]:
    """A student's agreement with its teacher on the validation identities per seed (top-k overlap, rank
    correlation of similarities), or none."""
    agree = [v.get("agreement") for v in _val_reports(row)]
    if not agree or None in agree:
        return {}
    return {k: [a[k] for a in agree] for k in ("top_k_overlap", "rank_correlation")}


#: summary.json's scale of each agreement figure: the overlap in %, the rank correlation as it is (-1..1)
AGREE_SCALE = {"top_k_overlap": 100.0, "rank_correlation": 1.0}


def _stats(values: list[float], scale: float = 100.0) -> dict:
    v = np.asarray(values, dtype=float) * scale
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)), 4) if len(v) > 1 else 0.0,
            "per_seed": [round(float(x), 4) for x in v]}


def _dataset(cache: Path) -> list[str]:
    """The paper's Table 1 for this cache."""
    from featcache.cache.describe import split_stats

    out = ["## Dataset", "", "| split | images | identities | cameras |", "|---|---|---|---|"]
    out += [f"| {name} | {v['images']} | {v['identities']} | {v['cameras']} |" for name, v in split_stats(cache).items()]
    return out + [""]


def _table(plan, reports: dict, profile: dict) -> list[str]:
    head = ("| model | recipe | mAP | R1 | R5 | mINP | validation mAP | top-10 agreement with the teacher (test; validation) "
            "| rank correlation with the teacher (validation) | parameters | GFLOPs / image | latency, batch 1 |")
    out = ["## Results", "", head, "|" + "---|" * (head.count("|") - 1)]
    for row in plan.rows:
        reps = reports[row.label]
        val = validation_maps(row)
        agree = [r["agreement"]["top_k_overlap"] for r in reps if r.get("agreement")]
        val_agree = validation_agreement(row)
        seed = plan.pipeline.settings.seeds[0]
        prof = profile.get(row.spec.get(seed, row.spec.get(0)), {})
        cols = [_mean_std([r["mAP"] for r in reps]), _mean_std([r["cmc"]["1"] for r in reps]),
                _mean_std([r["cmc"]["5"] for r in reps]), _mean_std([r["mINP"] for r in reps]),
                _mean_std(val) if val else "",
                "; ".join(f"{name}{_mean_std(a)} %" for name, a in (("", agree), ("val ", val_agree.get("top_k_overlap"))) if a),
                _mean_std(val_agree["rank_correlation"], 1.0, 3) if val_agree else "",
                f"{prof['parameters_used'] / 1e6:.2f} M" if prof else "",
                f"{prof['flops_per_image'] / 1e9:.2f}" if prof else "",
                f"{prof['latency_ms']['1']:.1f} ms" if prof and "1" in prof["latency_ms"] else ""]
        out.append(f"| {row.label} | {recipe_label(recipe_of(row))} | " + " | ".join(cols) + " |")
    out += ["", RECIPE_NOTE]
    if profile:
        p = next(iter(profile.values()))
        out += ["", f"Parameters at inference, FLOPs per image (2 per multiply-accumulate) and latency from `featcache profile` "
                    f"on {p['device']}, {p['image_size'][0]}x{p['image_size'][1]}, at {p.get('precision', 'fp32')} (every row alike). A fusion's row counts the backbones it runs, its "
                    "adapters and its fusion (the teacher's: both backbones and the gate); backbones with random weights "
                    "(timing only). The raw concatenation costs its two backbones' rows together."]
    return out


def _cmc_plot(plan, reports: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, reps in reports.items():
        ranks = sorted(int(k) for k in reps[0]["cmc"])
        ax.plot(ranks, [100 * np.mean([r["cmc"][str(k)] for r in reps]) for k in ranks], marker=".", label=label)
    ax.set_xlabel("rank")
    ax.set_xticks(sorted({int(k) for reps in reports.values() for k in reps[0]["cmc"]}))  # the ranks reported
    ax.set_ylabel("CMC (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def conditions(plan) -> dict[str, list[int]]:
    """Synthetic datasets' camera conditions (day, night, blur) -> cameras; empty for other data."""
    if "synth" not in plan.pipeline.sections:
        return {}
    from featcache.synth import condition

    cfg = plan.pipeline.stage_config("synth", out=plan.root)
    out: dict[str, list[int]] = {}
    for cam in range(1, cfg.cams + 1):
        out.setdefault(condition(cfg, cam), []).append(cam)
    return out if len(out) > 1 else {}


def condition_table(plan) -> dict[str, dict]:
    """Per trained row and condition: validation mAP of the queries from that condition's cameras (mean over seeds),
    and for the teacher its mean gate weight per expert there (seed by seed averaged): what a gate can exploit."""
    conds = conditions(plan)
    if not conds:
        return {}
    out: dict[str, dict] = {}
    for row in plan.rows:
        reports = _val_reports(row)
        if not reports or row.group == "student":
            continue
        vals = [r.get("mAP_by_camera", {}) for r in reports]
        entry = {}
        for name, cams in conds.items():
            per_seed = [float(np.mean([v[str(c)] for c in cams if str(c) in v])) * 100 for v in vals
                        if any(str(c) in v for c in cams)]
            if per_seed:
                entry[name] = {"val_mAP": round(float(np.mean(per_seed)), 4), "per_seed": [round(x, 4) for x in per_seed]}
        if row.group == "teacher":
            stats = [st for _, run in sorted(row.run.items()) if (st := RunDir(run).gate_stats()) is not None]
            for name, cams in conds.items():
                w: dict[str, list[float]] = {}
                for st in stats:
                    for c in cams:
                        for e, x in st["per_camera"].get(str(c), {}).items():
                            w.setdefault(e, []).append(x)
                entry.setdefault(name, {})["gate_weight"] = {e: round(float(np.mean(x)), 4) for e, x in w.items()}
        out[row.key or row.label] = entry
    return out


def _condition_section(plan) -> list[str]:
    table = condition_table(plan)
    if not table:
        return []
    conds = list(conditions(plan))
    out = ["## By camera condition (validation identities)", "",
           "Validation mAP of the queries from each condition's cameras (identities held out of training; mean over "
           "seeds), and the teacher's mean gate weight per expert on the training images of those cameras.", "",
           "| model | " + " | ".join(conds) + " |", "|---|" + "---|" * len(conds)]
    for key, entry in table.items():
        cells = []
        for c in conds:
            e = entry.get(c, {})
            cell = f"{e['val_mAP']:.2f}" if "val_mAP" in e else ""
            if "gate_weight" in e:
                cell += " (gate: " + ", ".join(f"{k} {v:.2f}" for k, v in e["gate_weight"].items()) + ")"
            cells.append(cell)
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    return out + [""]


def _gate_section(plan, rep_dir: Path) -> list[str]:
    s = plan.pipeline.settings
    run = plan.gates.get((s.teacher, s.seeds[0]))
    from featcache.gate.outputs import collapse_note

    out = ["## The teacher's gate", ""]
    stats = (RunDir(run).gate_stats() if run is not None else None) or {}
    if stats and "gated" not in stats:  # statistics written before the field: the fusion says whether a gate routed
        stats["gated"] = str(RunDir(run, "train-gate").read_config().get("fusion", "")).startswith("moe")
    note = collapse_note(stats) if stats else None
    if note:
        out += [f"> **Warning:** {note}.", ""]
    for name, caption in (("gate_heatmap.png", "mean gate weight per camera and expert"),
                          ("gate_hist.png", "gate weights"), ("gate_routing.png", "routing per camera over the epochs")):
        if run is not None and RunDir(run).artifact(name).is_file():
            shutil.copy(RunDir(run).artifact(name), rep_dir / name)
            out += [figure_link(caption, name), ""]
    return out if len(out) > 2 else []


def _ranked_section(plan, rep_dir: Path) -> list[str]:
    out = ["## Ranked lists", ""]
    for d in sorted((rep_dir / "ranked").glob("*")) if (rep_dir / "ranked").is_dir() else []:
        for png in sorted(d.glob("ranked_*.png")):
            out += [f"{d.name}: {png.stem.replace('_', ' ')}", "", figure_link(f"{d.name} {png.stem}", f"ranked/{d.name}/{png.name}"), ""]
    return out if len(out) > 2 else []


def _loss_section(plan, rep_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = plan.pipeline.settings
    runs = [("teacher", plan.gates.get((s.teacher, s.seeds[0])), ("loss", "id", "triplet"))]
    for row in plan.rows:  # one plot per student, titled with its row; only the terms it trained with
        if row.group == "student" and s.seeds[0] in row.run:
            cfg = RunDir(row.run[s.seeds[0]], "distill").read_config()
            runs.append((row.label, row.run[s.seeds[0]], ("loss", *cfg["losses"])))
    out = ["## Loss curves", ""]
    for name, run, keys in runs:
        rows = RunDir(run).log_rows() if run is not None else []
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            vals = [float(r[k]) for r in rows if r.get(k) not in (None, "")]
            if vals and min(vals) > 0:
                ax.plot(range(1, len(vals) + 1), vals, label=k)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"{name}: {run.name}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        file = f"loss_{_file_name(name)}.png"
        save_figure(fig, rep_dir / file, dpi=110)
        plt.close(fig)
        out += [figure_link(f"{name}: losses", file), ""]
    return out if len(out) > 2 else []


def _file_name(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:60]
