"""Making the shipped stand-ins: ``python -m featcache.standins.ship`` trains them with the default recipe on the CPU
(in the recipe's fixed arithmetic) and writes them with ``recipe.json`` and ``probe.npz`` into the package
(docs/development.md says when)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.standins.config import META_FILE, StandinConfig
from featcache.standins.runner import run_pretrain_standins
from featcache.errors import RunError
from featcache.standins.shipped import ARITHMETIC, PROBE_FILE, RECIPE_FILE, RECIPE_VERSION, SHIPPED_DIR, probe, read_recipe, recipe_record

logger = logging.getLogger(__name__)


def write_shipped(cfg: StandinConfig | None = None, folder: Path = SHIPPED_DIR) -> Path:
    """Train the stand-ins with ``cfg`` (the defaults) on the CPU and write them under ``folder``, as trained."""
    cfg = cfg or StandinConfig()
    old, want = read_recipe(folder), recipe_record(cfg)
    if old is not None and old["version"] == RECIPE_VERSION and {k: old[k] for k in want} != want:
        raise RunError(f"{folder / RECIPE_FILE}: made with other options, arithmetic or presets under the same RECIPE_VERSION "
                       f"{RECIPE_VERSION}: raise it in featcache/standins/shipped.py first")
    with tempfile.TemporaryDirectory() as tmp:
        trained = run_pretrain_standins(cfg.replace(root=Path(tmp), device="cpu", force=True))
        staging = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        for name, path in trained.items():
            shutil.copytree(path, staging / name)
            clean_meta(staging / name / META_FILE)
    seen = {name: json.loads((staging / name / META_FILE).read_text())["arithmetic"] for name in cfg.presets}
    off = [name for name, a in seen.items() if a["environment"] != ARITHMETIC or a["threads"] != 1]
    if off:
        shutil.rmtree(staging, ignore_errors=True)
        raise RunError(f"{', '.join(off)}: not trained in the recipe's arithmetic ({seen[off[0]]['cpu_capability']} "
                       "kernels here): regenerate on an x86-64 CPU with AVX2; the shipped stand-ins are unchanged")
    made = {"date": time.strftime("%Y-%m-%d"), "featcache": __version__,
            **{k: v for k, v in seen[cfg.presets[0]].items() if k != "environment"}}
    (staging / RECIPE_FILE).write_text(json.dumps({**want, "made": made}, indent=1) + "\n")
    np.savez_compressed(staging / PROBE_FILE, **probe(cfg))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def clean_meta(path: Path) -> None:
    """A shipped stand-in's ``standin.json`` without the temporary folder it was trained in."""
    meta = json.loads(path.read_text())
    meta["config"].update(root=None, force=False, device="auto")
    path.write_text(json.dumps(meta, indent=1, default=str))


if __name__ == "__main__":  # a few minutes on 2 cores
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"shipped stand-ins written to {write_shipped()}")
