"""Teacher targets on disk (format ``featcache-teacher-targets``): writing the file a gate run ends with, and
reading it back (``TeacherTargets``). ``featcache.gate.targets`` computes what goes in.

Teacher targets: the gate run's outputs for every cached training view, written once, read by distillation.

``RUN/teacher_targets.h5`` (format ``featcache-teacher-targets``, version
``TARGETS_VERSION``): one row per cached view of each training image, with
``image`` (the row in the cache's ``images/``), ``view``, ``label`` (0..C-1),
``feature`` (the fused 2048-d F_t before BN), ``retrieval`` (the teacher's
L2-normalised retrieval feature: what its ranking uses, BN neck and, where the
recipe has it, the ID-span projection), ``logits`` (z_t) and ``gates`` (the
expert weights at inference); ``label_pids`` maps labels to dataset
identities. Version 2 adds ``retrieval`` and, when the run held identities out
(``val_ids``), the group ``val/``: ``image``, ``pid``, ``camid``, ``query`` (the
validation protocol's queries) and ``retrieval`` of view 0 of each held-out
image, so that distillation measures its student against the teacher on images
neither trained on. Version 1 files (no ``retrieval``) are still read. Attributes record the cache (path and identity digest), the run
and the experts, and ``weights_digest`` the gate weights they came from, so a
reader can refuse targets made from another cache or run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featcache import __version__
from featcache.cache.checksum import nonfinite_rows
from featcache.cache.fileformat import TARGETS_FORMAT, TARGETS_VERSION, open_featcache
from featcache.errors import InputError
from featcache.fileio import atomic_write

TARGETS = "teacher_targets.h5"
DOCS = {
    "feature": "fused 2048-d feature before BN (F_t)",
    "retrieval": "the teacher's L2-normalised retrieval feature (what its ranking uses)",
    "logits": "ID logits z_t over the training identities",
    "gates": "expert weights g' at inference",
}


#: the per-row arrays of the file, in the order they are written (``label_pids`` is per class)
ROW_ARRAYS = ("image", "view", "label", "label_pids", "feature", "retrieval", "logits", "gates")


def write_teacher_targets(targets: "TeacherTargets") -> Path:
    """Write ``targets`` to ``targets.path`` atomically: per-row arrays (``image``, ``view``, ``label``,
    ``feature``, ``retrieval``, ``logits``, ``gates``), ``label_pids``, the held-out identities' ``val/`` group, and
    the source cache, its identity, the run, the experts and the weights digest beside the format's own attributes."""
    rows = {k: getattr(targets, k) for k in ROW_ARRAYS if getattr(targets, k) is not None}
    attrs = dict(cache=targets.cache, cache_identity=targets.cache_identity, run=targets.run,
                 experts=json.dumps(list(targets.experts)))
    if targets.weights_digest is not None:
        attrs["weights_digest"] = targets.weights_digest
    val, path = targets.val, targets.path

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=TARGETS_FORMAT, format_version=TARGETS_VERSION, featcache_version=__version__,
                           created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           doc="one row per cached view of each training image; image = row in the cache's images/, view = its view index")
            f.attrs.update(attrs)
            for name, arr in rows.items():
                ds = f.create_dataset(name, data=arr)
                if name in DOCS:
                    ds.attrs["doc"] = DOCS[name]
            if val is not None:
                g = f.create_group("val")
                g.attrs["doc"] = "view 0 of each image of the identities held out of training (val_ids); query: the protocol's queries"
                for name in ("image", "pid", "camid", "query", "retrieval"):
                    g.create_dataset(name, data=getattr(val, name))

    atomic_write(Path(path), write)
    return Path(path)


@dataclass
class ValTargets:
    """The teacher on the held-out identities: view 0 of each image, and which are the protocol's queries."""

    image: np.ndarray      # rows in the cache's images/
    pid: np.ndarray
    camid: np.ndarray
    query: np.ndarray      # bool mask
    retrieval: np.ndarray  # (N, D) L2-normalised


@dataclass
class TeacherTargets:
    """Teacher targets in memory, indexed by (cache image row, view)."""

    path: Path
    experts: list[str]
    cache_identity: str
    run: str
    image: np.ndarray
    view: np.ndarray
    label: np.ndarray
    label_pids: np.ndarray
    feature: np.ndarray
    logits: np.ndarray
    gates: np.ndarray
    weights_digest: str | None = None  # ``state_digest`` of the gate's final weights (None: written before it was recorded)
    retrieval: np.ndarray | None = None  # the teacher's L2-normalised retrieval feature per row (None: a version-1 file)
    val: "ValTargets | None" = None      # the held-out identities (None: the run held none out, or a version-1 file)
    cache: str = ""                      # the cache the gate trained on, as a resolved path when written
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, path: Path, cache_identity: str | None = None) -> "TeacherTargets":
        """Read and check the format; with ``cache_identity``, refuse targets made from another cache."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"teacher targets {path} not found (train-gate writes them at the end of a finished run)")
        with open_featcache(path, "teacher-targets") as f:
            if cache_identity is not None and f.attrs["cache_identity"] != cache_identity:
                raise InputError(f"{path} was made from another cache (identity {f.attrs['cache_identity']}, this cache {cache_identity})")
            arrays = {k: f[k][...] for k in ROW_ARRAYS if k != "retrieval"}  # retrieval: absent from version 1
            for name in ("feature", "logits", "gates", "retrieval"):
                bad = nonfinite_rows(f[name][...]) if name in f else np.zeros(0, np.int64)
                if bad.size:
                    raise InputError(f"{path}: {bad.size} row(s) of {name} hold NaN or inf (cache image rows "
                                     f"{', '.join(str(int(i)) for i in arrays['image'][bad][:5])}{' ...' if bad.size > 5 else ''}); "
                                     "featcache refuses to distil from them: train the gate again")
            digest = f.attrs.get("weights_digest")
            val = ValTargets(**{k: f["val"][k][...] for k in ("image", "pid", "camid", "query", "retrieval")}) if "val" in f else None
            return cls(path, json.loads(f.attrs["experts"]), str(f.attrs["cache_identity"]), str(f.attrs["run"]), **arrays,
                       weights_digest=str(digest) if digest is not None else None,
                       retrieval=f["retrieval"][...] if "retrieval" in f else None, val=val,
                       cache=str(f.attrs.get("cache", "")))

    def rows(self, images: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Target rows of (cache image row, view) pairs; a pair with no target is an error."""
        if self._sorted is None:  # sorted once: rows() runs every training step
            key = self.image * 256 + self.view
            order = np.argsort(key)
            self._sorted = (key[order], order)
        skey, order = self._sorted
        want = np.asarray(images, dtype=np.int64) * 256 + np.asarray(views, dtype=np.int64)
        pos = np.searchsorted(skey, want)
        pos = np.minimum(pos, len(order) - 1)
        found = skey[pos] == want
        if not found.all():
            i = int(np.flatnonzero(~found)[0])
            raise InputError(f"{self.path} has no target for image row {int(images[i])}, view {int(views[i])}")
        return order[pos]
