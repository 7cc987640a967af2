"""What a person looks at: a CMC curve and ranked-list grids (query + top 10, green match, red miss, junk marked)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from featcache.evaluation.engine import Evaluation
from featcache.evaluation.metrics import masks
from featcache.fileio import save_figure

logger = logging.getLogger(__name__)

TILE = (64, 128)
COLORS = {"match": (40, 170, 60), "miss": (210, 40, 40), "junk": (150, 150, 150), "query": (40, 90, 210)}


def write_plots(ev: Evaluation, out: Path, n: int, seed: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    files = [_cmc_curve(ev, out / "cmc.png")]
    evaluated = np.array(sorted(ev.per_query))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(evaluated, size=min(n, evaluated.size), replace=False))
    worst = sorted(evaluated, key=lambda i: (ev.per_query[i][0], i))[:n]
    files.append(_grid(ev, sample, out / "ranked_random.png", f"random sample of {len(sample)} queries (seed {seed})"))
    files.append(_grid(ev, worst, out / "ranked_worst_ap.png", f"the {len(worst)} queries with the worst AP"))
    return [str(f) for f in files]


def _cmc_curve(ev: Evaluation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    first = np.array([r for _, r in ev.per_query.values()])
    k = np.arange(1, min(50, len(ev.gf)) + 1)
    cmc = [(first <= x).mean() * 100 for x in k]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(k, cmc, marker=".")
    ax.set(xlabel="rank", ylabel="matching rate (%)", ylim=(0, 100.5), xlim=(1, k[-1]),
           title=f"CMC  {ev.report['model']['spec']}  " + (f"AP@{ev.report['search']['k']} (approximate)"
                                                              if (ev.report.get("search") or {}).get("mode") == "approx"
                                                              else "mAP") + f" {100 * ev.report['mAP']:.1f}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # ranks are integers
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _tile(root: Path, name: str, color: tuple[int, int, int], label: str) -> Image.Image:
    w, h = TILE
    try:
        with Image.open(root / name) as im:
            im = im.convert("RGB")
            im.thumbnail((w - 8, h - 8))
            body = im
    except OSError:
        body = Image.new("RGB", (w - 8, h - 8), (90, 90, 90))
        ImageDraw.Draw(body).text((4, 4), "missing", fill=(255, 255, 255))
    tile = Image.new("RGB", (w, h), color)
    tile.paste(body, ((w - body.width) // 2, (h - body.height) // 2))
    if label:
        d = ImageDraw.Draw(tile)
        d.rectangle([0, h - 12, w, h], fill=(0, 0, 0))
        d.text((2, h - 12), label, fill=(255, 255, 255))
    return tile


def _grid(ev: Evaluation, queries, path: Path, title: str, top: int = 10) -> Path:
    w, h = TILE
    gap, head = 10, 28
    canvas = Image.new("RGB", ((top + 1) * w + gap, head + len(queries) * (h + 16)), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((4, 3), title + "  (green: match, red: miss, grey: junk, not counted)", fill=(0, 0, 0))
    if ev.report["rerank"]:
        d.text((4, head - 9), "lists show the cosine ranking before re-ranking; AP is after re-ranking", fill=(0, 0, 0))
    for row, i in enumerate(queries):
        y = head + row * (h + 16)
        s = ev.qf[i] @ ev.gf.T
        order = np.lexsort((np.arange(s.size), -s))[:top]
        pos, junk = masks(int(ev.query.pids[i]), int(ev.query.camids[i]), ev.gallery.pids, ev.gallery.camids)
        ap, first = ev.per_query[i]
        canvas.paste(_tile(ev.query.root, ev.query.names[i], COLORS["query"], f"AP {100 * ap:.1f}%"), (0, y))
        rank = 0  # protocol rank: junk entries are shown but not counted
        for k, j in enumerate(order):
            kind = "junk" if junk[j] else "match" if pos[j] else "miss"
            rank += kind != "junk"
            canvas.paste(_tile(ev.gallery.root, ev.gallery.names[j], COLORS[kind], "junk" if kind == "junk" else str(rank)), (gap + (k + 1) * w, y))
        where = f"first match rank {first}" if first < len(ev.gf) + 1 else "no match in the approximate list"
        d.text((2, y + h + 2), f"{Path(str(ev.query.names[i])).name}  {where}", fill=(0, 0, 0))
    canvas.save(path)
    return path
