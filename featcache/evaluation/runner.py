"""``featcache eval``: features from the cache, blockwise exact search, protocol metrics, report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from featcache.cache import open_cache
from featcache.evaluation.features import CacheSplit, EvalInputError, parse_model
from featcache.evaluation.metrics import AP_FORMS, Accumulator, masks, positive_ranks
from featcache.evaluation.rerank import rerank_blocks
from featcache.evaluation.search import Scorer, block_size, score_blocks

logger = logging.getLogger(__name__)

PROTOCOLS = ("market1501", "veri776", "auto")
_SHARED_PREPROCESSING = ("image_size", "resize")


@dataclass(frozen=True)
class EvalConfig:
    cache: Path
    model: str
    gallery_cache: Path | None = None
    protocol: str = "auto"
    ap: str = "plain"
    ranks: tuple[int, ...] = (1, 5, 10, 20)
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_: float = 0.3
    flip: bool = False
    json_out: Path | None = None
    plots: Path | None = None
    save_features: Path | None = None
    device: str = "auto"
    budget_mb: int = 256
    plot_queries: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol {self.protocol!r}: expected one of {PROTOCOLS}")
        if self.ap not in AP_FORMS:
            raise ValueError(f"--ap {self.ap!r}: expected one of {AP_FORMS}")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"--ranks {self.ranks}: expected positive integers, e.g. 1,5,10,20")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: expected auto, cpu or cuda")


@dataclass
class Evaluation:
    report: dict[str, Any]
    query: CacheSplit
    gallery: CacheSplit
    qf: np.ndarray
    gf: np.ndarray
    per_query: dict[int, tuple[float, int]] = field(default_factory=dict)  # query index -> (AP, first rank)


def _check_compatible(source: Path, target: CacheSplit) -> None:
    """Cross-domain: the target cache must be made like the source (training) cache, or features do not transfer."""
    with open_cache(source) as f:
        src = json.loads(f.attrs["identity"])
    a, b = src["preprocessing"], target.identity["preprocessing"]
    diffs = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in _SHARED_PREPROCESSING if a.get(k) != b.get(k)]
    for name in set(src["backbones"]) & set(target.identity["backbones"]):
        wa, wb = src["backbones"][name]["weights"], target.identity["backbones"][name]["weights"]
        if wa != wb:
            diffs.append(f"backbone {name} weights: {wa} vs {wb}")
    if diffs:
        raise EvalInputError(f"--cache {source} and --gallery-cache {target.cache} were extracted differently: " + "; ".join(diffs))


def _cache_summary(path: Path) -> dict[str, Any]:
    with open_cache(path) as f:
        ident = json.loads(f.attrs["identity"])
    return {"dataset": ident["dataset"], "items": ident["items"]}


def _protocol(cfg: EvalConfig, q: CacheSplit) -> str:
    if cfg.protocol != "auto":
        return cfg.protocol
    return "veri776" if q.identity["dataset"] == "veri776" else "market1501"


def run_eval(cfg: EvalConfig) -> Evaluation:
    t0 = time.perf_counter()
    source = parse_model(cfg.model)
    target = cfg.gallery_cache or cfg.cache  # cross-domain: query and gallery both come from the other cache
    q = CacheSplit.load(target, "query")
    g = CacheSplit.load(target, "gallery")
    if cfg.gallery_cache:
        _check_compatible(cfg.cache, q)
    qf, gf = source.features(q, cfg.flip), source.features(g, cfg.flip)
    if qf.shape[1] != gf.shape[1]:
        raise EvalInputError(f"query features are {qf.shape[1]}-d but gallery features {gf.shape[1]}-d")
    t_feat = time.perf_counter() - t0

    t1 = time.perf_counter()
    res, per_query, backend = evaluate(
        qf, gf, q.pids, q.camids, g.pids, g.camids, cfg.ranks, cfg.ap, cfg.device, cfg.budget_mb * 2**20,
        (cfg.k1, cfg.k2, cfg.lambda_) if cfg.rerank else None,
    )
    t_search = time.perf_counter() - t1
    report = {
        **res,
        "protocol": _protocol(cfg, q),
        "ap_form": cfg.ap,
        "query_size": int(len(qf)),
        "gallery_size": int(len(gf)),
        "feature_dim": int(qf.shape[1]),
        "model": {"spec": cfg.model, **source.describe()},
        "flip": cfg.flip,
        "rerank": {"k1": cfg.k1, "k2": cfg.k2, "lambda": cfg.lambda_} if cfg.rerank else None,
        "cache": {"path": str(cfg.cache), **_cache_summary(cfg.cache)},
        "gallery_cache": {"path": str(cfg.gallery_cache), **_cache_summary(cfg.gallery_cache)} if cfg.gallery_cache else None,
        "evaluated_on": str(target),
        "random_init_backbones": sorted(
            {n for split in (q, g) for n, b in split.identity["backbones"].items() if b["weights"].startswith("random-init")}
        ),
        "search_backend": backend,
        "tie_break": "equal scores: earlier gallery entry (cache order) ranks first",
        "timings": {"features_s": t_feat, "search_and_metrics_s": t_search, "total_s": time.perf_counter() - t0},
    }
    ev = Evaluation(report, q, g, qf, gf, per_query)
    if cfg.save_features:
        save_features(ev, cfg.save_features)
    if cfg.json_out:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps(report, indent=2))
    if cfg.plots:
        from featcache.evaluation.plots import write_plots

        report["plots"] = write_plots(ev, cfg.plots, cfg.plot_queries, cfg.seed)
        if cfg.json_out:
            cfg.json_out.write_text(json.dumps(report, indent=2))
    return ev


def evaluate(qf: np.ndarray, gf: np.ndarray, q_pids: np.ndarray, q_cams: np.ndarray, g_pids: np.ndarray, g_cams: np.ndarray,
             ranks=(1, 5, 10, 20), ap_form: str = "plain", device: str = "auto", budget: int = 256 * 2**20,
             rerank: tuple[int, int, float] | None = None) -> tuple[dict[str, Any], dict[int, tuple[float, int]], str]:
    """Metrics of features (rows L2-normalised) under the protocol; returns (metrics, per-query (AP, first rank), backend)."""
    acc = Accumulator(tuple(sorted(set(ranks))), ap_form)
    per_query: dict[int, tuple[float, int]] = {}
    if rerank is not None:
        blocks = rerank_blocks(qf, gf, *rerank, device=device, budget=budget)
        backend = "rerank"
    else:
        scorer = Scorer(gf, device)
        blocks = score_blocks(qf, scorer, block_size(len(gf), budget))
        backend = scorer.backend
    with tqdm(total=len(qf), desc="eval", unit="query", leave=False) as bar:
        for start, scores in blocks:
            for b in range(len(scores)):
                i = start + b
                r = positive_ranks(scores[b], *masks(int(q_pids[i]), int(q_cams[i]), g_pids, g_cams))
                acc.add(i, r)
                if r.size:
                    per_query[i] = (acc.aps[-1], int(r[0]))
            bar.update(len(scores))
    return acc.result(), per_query, backend


def save_features(ev: Evaluation, path: Path) -> None:
    """The features exactly as evaluated, with labels, for checking our numbers with other code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path, query=ev.qf, gallery=ev.gf, query_pids=ev.query.pids, query_camids=ev.query.camids,
        gallery_pids=ev.gallery.pids, gallery_camids=ev.gallery.camids,
        query_names=ev.query.names.astype(str), gallery_names=ev.gallery.names.astype(str),
    )


def format_table(report: dict[str, Any]) -> str:
    ranks = list(report["cmc"])
    head = ["mAP"] + [f"R{k}" for k in ranks] + ["mINP"]
    vals = [report["mAP"]] + [report["cmc"][k] for k in ranks] + [report["mINP"]]
    lines = [
        f"model {report['model']['spec']}  protocol {report['protocol']}  AP {report['ap_form']}"
        + ("  flip" if report["flip"] else "") + ("  re-ranked" if report["rerank"] else ""),
        f"queries {report['queries_evaluated']} evaluated, {report['queries_skipped']} skipped (no valid match); "
        f"gallery {report['gallery_size']}; {report['feature_dim']}-d; search {report['search_backend']}; "
        f"{report['timings']['total_s']:.2f} s",
        "  ".join(f"{h:>7s}" for h in head),
        "  ".join(f"{100 * v:7.2f}" for v in vals),
    ]
    if report["random_init_backbones"]:
        lines.append(f"note: {', '.join(report['random_init_backbones'])} in these caches have random weights: "
                     "these numbers test the pipeline and are not results of the method")
    return "\n".join(lines)
