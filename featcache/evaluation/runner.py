"""``featcache eval``: features from the cache, blockwise exact search, protocol metrics, report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache import CacheIdentity, CacheReader, CacheSplit, EmptySplit, cache_identity, partial_note
from featcache.config import StageConfig, resolved_beside, save_resolved
from featcache.errors import ConfigError, FeatcacheError, InputError, RunError, check_choice
from featcache.evaluation.features import FeatureContext, parse_model
from featcache.evaluation.metrics import AP_FORMS, agreement as rank_agreement
from featcache.evaluation.approx import ApproxSpec
from featcache.evaluation.engine import AP_FORM, DEVICE, RANKS, Evaluation, evaluate
from featcache.fileio import atomic_write, check_output
from featcache.runtime import check_device_name
from featcache.evaluation.search import DEFAULT_BUDGET

logger = logging.getLogger(__name__)

#: the rule every supported dataset's protocol shares (featcache.evaluation.metrics)
PROTOCOL_RULE = ("gallery entries of the query's identity and camera are junk (ignored); its identity from another "
                 "camera is a positive; distractors (pid 0) are negatives; a query without a positive is skipped")


SEARCH_MODES = ("exact", "approx")


@dataclass(frozen=True)
class EvalConfig(StageConfig):
    """``featcache eval``: exact search and the protocol's metrics for one model on one cache."""

    command = "eval"

    cache: Path
    model: str
    gallery_cache: Path | None = None
    ap: str = AP_FORM
    ranks: tuple[int, ...] = RANKS
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_: float = 0.3
    flip: bool = False
    json_out: Path | None = None
    plots: Path | None = None
    save_features: Path | None = None
    device: str = DEVICE
    budget_mb: int = DEFAULT_BUDGET // 2**20
    plot_queries: int = 8
    seed: int = 0
    allow_partial: bool = False      # evaluate a cache whose extraction has not finished (the report says so)
    agree_with: str | None = None    # another KIND:REF: report how alike the two rank the gallery (top-k overlap)
    agree_k: int = 10
    search: str = "exact"            # exact: every score (the protocol); approx: an ANN index's top approx_k lists
    approx_index: str = "ivf-pq"
    approx_k: int = 100
    nprobe: int = 32

    def __post_init__(self) -> None:
        check_choice(self.search, SEARCH_MODES, "--search")
        if self.search == "approx":
            if self.rerank:
                raise ConfigError("--rerank needs every score: use it with --search exact")
            if self.approx_k < max(self.ranks):
                raise ConfigError(f"--approx-k {self.approx_k} is shorter than the largest of --ranks "
                                  f"({max(self.ranks)}): CMC there would be unknown; raise --approx-k or lower --ranks")
            self.approx_spec()
        check_choice(self.ap, AP_FORMS, "--ap")
        if not self.ranks or min(self.ranks) < 1:
            raise ConfigError(f"--ranks {','.join(map(str, self.ranks))}: expected positive integers, e.g. 1,5,10,20")
        check_device_name(self.device)
        if self.budget_mb < 1:
            raise ConfigError(f"--budget-mb {self.budget_mb}: expected at least 1 (MiB per block of scores)")
        if self.k1 < 1 or self.k2 < 1 or not 0 <= self.lambda_ <= 1:
            raise ConfigError(f"re-ranking: expected --k1 and --k2 >= 1 and 0 <= --lambda <= 1, got {self.k1}, {self.k2}, {self.lambda_}")
        if self.plot_queries < 1:
            raise ConfigError(f"--plot-queries {self.plot_queries}: expected at least 1")
        if self.agree_k < 1:
            raise ConfigError(f"--agree-k {self.agree_k}: expected at least 1")

    def approx_spec(self) -> ApproxSpec | None:
        """The approximate index asked for, or None for exact search."""
        return ApproxSpec(self.approx_index, self.approx_k, self.nprobe) if self.search == "approx" else None


def _check_compatible(source: CacheIdentity, source_path: Path, target: CacheSplit) -> None:
    """Cross-domain: the target cache must be made like the source (training) cache, or features do not transfer."""
    diffs = source.transfer_differences(target.identity)
    if diffs:
        raise InputError(f"--cache {source_path} and --gallery-cache {target.cache} were extracted differently: " + "; ".join(diffs))


def _note_training(report: dict, cfg: EvalConfig) -> None:
    """What the evaluated model's run says about its training that the numbers depend on: another cache, or part of
    its cache's training images (``trained_on_partial``, None for a whole cache). Each is listed in ``warnings``."""
    trained = report["model"].get("trained_on") or {}
    notes = []
    if trained.get("identity") and trained["identity"] != report["cache"]["identity"]:
        notes.append(f"{cfg.model} was trained on the cache {trained.get('cache')} (identity {str(trained['identity'])[:12]}), "
                     f"not on --cache {cfg.cache} (identity {report['cache']['identity'][:12]}): in-domain numbers need the "
                     "cache it was trained on; evaluating on another dataset is --cache TRAINING_CACHE --gallery-cache OTHER")
    report["trained_on_partial"] = trained.get("partial")
    if trained.get("partial"):
        notes.append(partial_note(cfg.model, trained["partial"]))
    for note in notes:
        logger.warning(note)  # once: the table leaves it out (it was printed twice, as a log line and in the table)
    if notes:
        report["warnings"] = notes


def _cache_summary(ident: CacheIdentity) -> dict[str, Any]:
    return {"dataset": ident.dataset, "items": ident.items, "identity": ident.digest()}


def _load_target(cfg: EvalConfig, target: CacheReader) -> tuple[CacheSplit, CacheSplit, dict[str, dict[str, int]], CacheIdentity]:
    """Query and gallery of the open cache evaluated on, refused while its extraction is unfinished (unless
    ``--allow-partial``), checked against the training cache in cross-domain evaluation, and ``--cache``'s identity."""
    counts = target.status_counts()
    pending = {k: v for k, v in counts["pending"].items() if v}
    if pending and not cfg.allow_partial:
        raise InputError(f"{target.path} has pending images ({', '.join(f'{k} {v}' for k, v in pending.items())}): its extraction "
                         "has not finished. Run it to the end, or pass --allow-partial to evaluate the cached images only")
    q, g = _load_split(target, "query"), _load_split(target, "gallery")
    source = cache_identity(cfg.cache) if cfg.gallery_cache else q.identity
    if cfg.gallery_cache:
        _check_compatible(source, cfg.cache, q)
    return q, g, counts, source


def _agreement(cfg: EvalConfig, q: CacheSplit, g: CacheSplit, qf: np.ndarray, gf: np.ndarray, ctx: FeatureContext) -> dict | None:
    """``--agree-with``: how alike another model ranks the same queries (top-k overlap, rank correlation)."""
    if not cfg.agree_with:
        return None
    other = parse_model(cfg.agree_with)
    oq, og = other.features(q, ctx), other.features(g, ctx)
    return {"with": cfg.agree_with, "k": cfg.agree_k, **rank_agreement(qf, gf, oq, og, q.pids, q.camids, g.pids, g.camids, cfg.agree_k)}


def run_eval(cfg: EvalConfig) -> Evaluation:
    """Evaluate ``cfg.model`` on the cache; its outputs are checked before the work and written after it. A write that
    still fails raises with the finished ``Evaluation`` attached (``exc.evaluation``), so its metrics are not lost.
    The cache evaluated on is opened once; its query and gallery read through that reader."""
    t0 = time.perf_counter()
    check_output(cfg.json_out, "--json")
    check_output(cfg.save_features, "--save-features")
    check_output(cfg.plots, "--plots", folder=True)
    source = parse_model(cfg.model)
    with CacheReader(cfg.gallery_cache or cfg.cache) as target:  # cross-domain: query and gallery from the other cache
        q, g, counts, source_identity = _load_target(cfg, target)
        ctx = FeatureContext(cfg.device, cfg.flip, cfg.budget_mb * 2**20)
        qf, gf = source.features(q, ctx), source.features(g, ctx)
        if qf.shape[1] != gf.shape[1]:
            raise InputError(f"query features are {qf.shape[1]}-d but gallery features {gf.shape[1]}-d")
        t_feat = time.perf_counter() - t0
        t1 = time.perf_counter()
        res, per_query, backend = evaluate(
            qf, gf, q.pids, q.camids, g.pids, g.camids, cfg.ranks, cfg.ap, cfg.device, cfg.budget_mb * 2**20,
            (cfg.k1, cfg.k2, cfg.lambda_) if cfg.rerank else None, cfg.approx_spec(),
        )
        res.setdefault("search", {"mode": "exact"})
        t_search = time.perf_counter() - t1
        agreement = _agreement(cfg, q, g, qf, gf, ctx)
    report = {
        **res,
        "protocol": {"dataset": q.identity.dataset, "rule": PROTOCOL_RULE},
        "ap_form": cfg.ap,
        "query_size": int(len(qf)),
        "gallery_size": int(len(gf)),
        "feature_dim": int(qf.shape[1]),
        "model": {"spec": cfg.model, **source.describe()},
        "flip": cfg.flip,
        "rerank": {"k1": cfg.k1, "k2": cfg.k2, "lambda": cfg.lambda_} if cfg.rerank else None,
        "cache": {"path": str(cfg.cache), **_cache_summary(source_identity)},
        "gallery_cache": {"path": str(cfg.gallery_cache), **_cache_summary(q.identity)} if cfg.gallery_cache else None,
        "evaluated_on": str(target.path),
        "partial": {"pending": counts["pending"], "failed": counts["failed"],
                    "complete": not any(counts["pending"].values()) and not any(counts["failed"].values())},
        "agreement": agreement,
        "random_init_backbones": q.identity.random_init([b for b in source.backbones() if b in q.identity.backbones]),
        "search_backend": backend,
        "tie_break": "equal scores: earlier gallery entry (cache order) ranks first",
        "timings": {"features_s": t_feat, "search_and_metrics_s": t_search, "total_s": time.perf_counter() - t0},
    }
    return _finish(report, cfg, q, g, qf, gf, per_query)


def _finish(report: dict, cfg: EvalConfig, q: CacheSplit, g: CacheSplit, qf: np.ndarray, gf: np.ndarray, per_query) -> Evaluation:
    """The evaluation with its notes and config, its outputs written; a write that fails keeps the metrics."""
    _note_training(report, cfg)
    ev = Evaluation(report, q, g, qf, gf, per_query)
    report["config"] = cfg.to_dict(absolute=True)
    try:
        _write_outputs(ev, cfg)
    except (FeatcacheError, OSError) as exc:
        err = exc if isinstance(exc, FeatcacheError) else RunError(
            f"cannot write {exc.filename or 'an output'}: {exc.strerror or exc}")
        err.evaluation = ev  # type: ignore[attr-defined]
        raise err from None
    return ev


def _write_outputs(ev: Evaluation, cfg: EvalConfig) -> None:
    """``--save-features``, ``--plots`` and ``--json``, each with its resolved config beside it."""
    report = ev.report
    if cfg.save_features:
        save_features(ev, cfg.save_features)
        save_resolved(resolved_beside(cfg.save_features), cfg)
    if cfg.plots:
        from featcache.evaluation.plots import write_plots

        report["plots"] = write_plots(ev, cfg.plots, cfg.plot_queries, cfg.seed)
        save_resolved(cfg.plots / "eval.config.yaml", cfg)
    if cfg.json_out:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cfg.json_out, lambda p: p.write_text(json.dumps(report, indent=2)))
        save_resolved(resolved_beside(cfg.json_out), cfg)


def _load_split(cache: CacheReader, split: str) -> CacheSplit:
    try:
        return cache.split(split)
    except EmptySplit as exc:
        raise InputError(f"{exc}: nothing to evaluate") from None


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
        f"model {report['model']['spec']}  on {report['protocol']['dataset']} (junk: same identity and camera)  AP {report['ap_form']}"
        + ("  flip" if report["flip"] else "") + ("  re-ranked" if report["rerank"] else ""),
        f"queries {report['queries_evaluated']} evaluated, {report['queries_skipped']} skipped (no valid match); "
        f"gallery {report['gallery_size']}; {report['feature_dim']}-d; search {report['search_backend']}; "
        f"{report['timings']['total_s']:.2f} s",
    ]
    if report.get("search", {}).get("mode") == "approx":
        lines.append(f"APPROXIMATE search ({report['search']['index']}): mAP is AP@{report['search']['k']}, CMC and mINP "
                     "count positives beyond the list as missed; not the protocol's exact numbers")
    lines += [
        "  ".join(f"{h:>7s}" for h in head),
        "  ".join(f"{100 * v:7.2f}" for v in vals),
    ]
    if report.get("agreement"):
        a = report["agreement"]
        lines.append(f"top-{a['k']} agreement with {a['with']}: {100 * a['top_k_overlap']:.2f}% of each query's top {a['k']} shared; "
                     f"rank correlation of the similarities {a.get('rank_correlation', float('nan')):.4f}")
    part = report.get("partial") or {"complete": True}
    if not part["complete"]:
        parts = [f"{k} {split} {n}" for k in ("pending", "failed") for split, n in part[k].items() if n]
        lines.append(f"note: computed on the cached images only; not cached: {', '.join(parts)}")
    if report["random_init_backbones"]:
        lines.append(f"note: {', '.join(report['random_init_backbones'])} (read by this model) have random weights: "
                     "these numbers test the pipeline and are not results of the method")
    return "\n".join(lines)
