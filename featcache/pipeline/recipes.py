"""Which recipe produced each row of a pipeline report, read from the runs' own saved configs.

featcache's defaults depart from the paper in two places: the gate's training (``gate_recipe``: ``routed``, or
``paper`` for Eq. 7-9 as written) and the space of the feature and relation terms of distillation (``kd_space``:
``retrieval`` at lambda_feat 30, or ``literal`` for Eq. 10 and 12 as written, at the paper's 0.3). A report names
them per row, so that nobody reads a default-recipe row as the paper's equations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.distill.config import LAMBDA_FEAT

#: the distillation terms of a student trained with every one
ALL_TERMS = ("id", "tri", "kd", "feat", "att", "rel")


def _config(run: Path, command: str) -> dict[str, Any]:
    from featcache.training.rundir import RunDir  # torch: only where a report is written

    return RunDir(Path(run)).saved_config().get(command, {})


def recipe_of(row) -> dict[str, Any]:
    """The recipe of a report row: ``{}`` for rows nothing was trained for (a backbone alone, the raw concatenation),
    ``{"gate_recipe": ...}`` for trained fusions, and the distillation's losses, space and lambda_feat for students.
    Every seed of a row runs the same config, so the first seed's run is read."""
    if not row.run:
        return {}
    run = row.run[min(row.run)]
    if row.group == "student":
        cfg = _config(run, "distill")
        losses = tuple(cfg.get("losses", ALL_TERMS))
        out: dict[str, Any] = {"losses": ",".join(losses)}
        if "feat" in losses or "rel" in losses:
            space = cfg.get("kd_space", "retrieval")
            lam = cfg.get("lambda_feat")
            out.update(kd_space=space, lambda_feat=float(lam if lam is not None else LAMBDA_FEAT[space]))
        return out
    return {"gate_recipe": _config(run, "train-gate").get("gate_recipe", "routed")}


def recipe_label(recipe: dict[str, Any]) -> str:
    """The recipe in a few words for the report's table."""
    if not recipe:
        return "untrained"
    if "gate_recipe" in recipe:
        return {"routed": "routed (featcache's default)", "paper": "paper (Eq. 7-9)"}.get(recipe["gate_recipe"], recipe["gate_recipe"])
    losses = recipe["losses"].split(",")
    if not {"kd", "feat", "att", "rel"} & set(losses):
        return f"task loss only ({recipe['losses']})"
    parts = [] if set(losses) == set(ALL_TERMS) else [recipe["losses"]]
    if "kd_space" in recipe:
        space = "retrieval space (featcache's default)" if recipe["kd_space"] == "retrieval" else "literal (Eq. 10, 12)"
        parts.append(f"{space}, λ_feat {recipe['lambda_feat']:g}")
    return "; ".join(parts) or "every term"


RECIPE_NOTE = ("Recipe: `routed` is featcache's default gate recipe and `retrieval space` its default distillation "
               "(λ_feat chosen on synthetic data); both depart from the paper. `--set train-gate.gate_recipe=paper --set "
               "distill.kd_space=literal` runs Eq. 7-9 and 10-12 as written (the bundled `market1501-paper` and "
               "`veri776-paper` pipelines do).")
