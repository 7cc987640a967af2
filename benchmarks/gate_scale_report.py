"""Tables and plots of ``benchmarks/gate_scale.py``'s results (also ``python benchmarks/gate_scale.py --report FILE``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

FUSIONS = ("clip", "align", "average", "concat", "moe-top1", "moe-oracle")
CONDITIONS = ("day", "night", "blur")


def _ms(xs: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    xs = [scale * x for x in xs if x is not None]
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f} ({', '.join(f'{x:.{digits}f}' for x in xs)})"


def _col(size: dict, fusion: str, get) -> list:
    return [get(s["rows"][fusion]) for s in size["seeds"].values()]


def tables(results: dict) -> list[str]:
    out = [f"Device: {results['device']}; {results['date']}; seeds {', '.join(map(str, results['seeds']))}; "
           f"{results['epochs']} epochs; recipe {results['recipe']}. mAP in %, mean ± std, then seed by seed.", ""]
    for n, size in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        out += [f"### N = {n} training identities ({size['val_ids']} held out for validation, {size['test_ids']} test "
                f"identities; {size['train_images']} cached training images; {size['steps_per_run']} steps a run)", "",
                "| fusion | val mAP | test mAP | " + " | ".join(f"val {c}" for c in CONDITIONS) + " | "
                + " | ".join(f"test {c}" for c in CONDITIONS) + " |", "|---" * (3 + 2 * len(CONDITIONS)) + "|"]
        for f in FUSIONS:
            cells = [_ms(_col(size, f, lambda r: r["val"])), _ms(_col(size, f, lambda r: r["test"]["all"]))]
            cells += [_ms(_col(size, f, lambda r, c=c: r["val_by_condition"].get(c))) for c in CONDITIONS]
            cells += [_ms(_col(size, f, lambda r, c=c: r["test"][c])) for c in CONDITIONS]
            out.append(f"| {f} | " + " | ".join(cells) + " |")
        out += ["", "| | same-expert val mAP | cross-expert val mAP |", "|---|---|---|"]
        for f in ("moe-top1", "moe-oracle"):
            out.append(f"| {f} | {_ms(_col(size, f, lambda r: r['val_same']))} | {_ms(_col(size, f, lambda r: r['val_cross']))} |")
        winners = "; ".join(f"seed {s}: " + ", ".join(f"{c} {w}" for c, w in v["winners"].items()) for s, v in size["seeds"].items())
        weight = " | ".join(_ms(_col(size, "moe-top1", lambda r, c=c: r["weight_on_winner"][c]), 1.0, 2) for c in CONDITIONS)
        out += ["", f"Winners (the oracle's route, from the adapted experts' validation mAP): {winners}.", "",
                "| teacher's gate weight on the winner | " + " | ".join(CONDITIONS) + " |", "|---|---|---|---|",
                f"| moe-top1 | {weight} |", ""]
    return out


def variant_tables(results: dict) -> list[str]:
    """The alignment variants: ``average`` and ``moe-top1`` under each, per seed."""
    out: list[str] = []
    for n, variants in sorted(results.get("variants", {}).items(), key=lambda kv: int(kv[0])):
        out += [f"### Alignment variants at N = {n}", "",
                "| variant | training images | steps a run | average val | moe-top1 val | moe-top1 cross-expert val | "
                "average test | moe-top1 test |", "|---" * 8 + "|"]
        for name, v in variants.items():
            if name == "seconds":
                continue
            cells = [_ms(_col(v, "average", lambda r: r["val"])), _ms(_col(v, "moe-top1", lambda r: r["val"])),
                     _ms(_col(v, "moe-top1", lambda r: r["val_cross"])), _ms(_col(v, "average", lambda r: r["test"]["all"])),
                     _ms(_col(v, "moe-top1", lambda r: r["test"]["all"]))]
            out.append(f"| {name} | {v['train_images']} | {v['steps_per_run']} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def plots(results: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results["sizes"], key=int)
    ns = [int(n) for n in sizes]

    def mean(n: str, f: str, get) -> float:
        vals = [v for v in _col(results["sizes"][n], f, get) if v is not None]
        return 100 * statistics.mean(vals) if vals else float("nan")

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (label, get) in zip(axes, (("validation", lambda r: r["val"]), ("test", lambda r: r["test"]["all"]))):
        for f in FUSIONS:
            ax.plot(ns, [mean(n, f, get) for n in sizes], marker="o", label=f)
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("training identities N")
        ax.set_title(f"{label} mAP (%)" + (": N / 4 identities, grows with N" if label == "validation" else
                                             ": the same 50 identities at every N"))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    first = folder / "gate_scale_map.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for f in ("moe-top1", "moe-oracle"):
        for key, style in (("val_same", "--"), ("val_cross", "-")):
            ax.plot(ns, [mean(n, f, lambda r, k=key: r[k]) for n in sizes], style, marker="o",
                    label=f"{f}, {'same' if key == 'val_same' else 'cross'}-expert matches")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("training identities N")
    ax.set_ylabel("validation mAP (%), N / 4 identities")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    second = folder / "gate_scale_cross.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]


def report(path: Path, folder: Path | None) -> None:
    results = json.loads(path.read_text())
    print("\n".join(tables(results) + variant_tables(results)))
    if folder is not None:
        for p in plots(results, folder):
            print(f"plot: {p}")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results", type=Path, help="the JSON file gate_scale.py wrote")
    ap.add_argument("--plots", type=Path, help="folder for the two plots")
    args = ap.parse_args()
    report(args.results, args.plots)


if __name__ == "__main__":
    main()
