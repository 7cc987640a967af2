"""Teacher targets: the gate run's outputs for every cached training view, written once, read by distillation.

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
from featcache.errors import InputError
from featcache.evaluation.search import l2_normalize
from featcache.fileio import atomic_write
from featcache.gate.data import TrainData
from featcache.gate.model import GateModel
from featcache.gate.outputs import infer_rows
from featcache.training.rundir import state_digest

TARGETS = "teacher_targets.h5"
TARGETS_FORMAT = "featcache-teacher-targets"
TARGETS_VERSION = 2


def write_targets(model: GateModel, data: TrainData, cache: Path, run: Path) -> Path:
    """For every training image and cached view: fused feature, ID logits, gate weights (HDF5, atomic)."""
    rows = np.arange(len(data.feats[0]))
    fused, retrieval, logits, gates, _ = infer_rows(model, data.feats, rows, data.route)
    val = data.val
    val_retrieval = infer_rows(model, val.feats, np.arange(len(val.pids)), val.route)[1] if val is not None else None
    image_of_row = np.repeat(np.arange(len(data.n_views)), data.n_views)
    view_of_row = rows - data.row_start[image_of_row]
    digest = state_digest(model.state_dict())

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                format=TARGETS_FORMAT, format_version=TARGETS_VERSION, featcache_version=__version__,
                cache=str(Path(cache).resolve()), cache_identity=data.identity.digest(), run=str(Path(run).resolve()),
                experts=json.dumps(data.experts), weights_digest=digest, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                doc="one row per cached view of each training image; image = row in the cache's images/, view = its view index",
            )
            f.create_dataset("image", data=data.images[image_of_row].astype(np.int64))
            f.create_dataset("view", data=view_of_row.astype(np.uint8))
            f.create_dataset("label", data=data.labels[image_of_row].astype(np.int64))
            f.create_dataset("label_pids", data=data.pids.astype(np.int64))
            f.create_dataset("feature", data=fused.astype(np.float32)).attrs["doc"] = "fused 2048-d feature before BN (F_t)"
            f.create_dataset("retrieval", data=l2_normalize(retrieval.astype(np.float32))).attrs["doc"] = \
                "the teacher's L2-normalised retrieval feature (what its ranking uses)"
            f.create_dataset("logits", data=logits.astype(np.float32)).attrs["doc"] = "ID logits z_t over the training identities"
            f.create_dataset("gates", data=gates.astype(np.float32)).attrs["doc"] = "expert weights g' at inference"
            if val is not None:
                g = f.create_group("val")
                g.attrs["doc"] = "view 0 of each image of the identities held out of training (val_ids); query: the protocol's queries"
                g.create_dataset("image", data=val.images.astype(np.int64))
                g.create_dataset("pid", data=val.pids.astype(np.int64))
                g.create_dataset("camid", data=val.camids.astype(np.int64))
                g.create_dataset("query", data=val.query.astype(bool))
                g.create_dataset("retrieval", data=l2_normalize(val_retrieval.astype(np.float32)))

    path = Path(run) / TARGETS
    atomic_write(path, write)
    return path


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
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, path: Path, cache_identity: str | None = None) -> "TeacherTargets":
        """Read and check the format; with ``cache_identity``, refuse targets made from another cache."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"teacher targets {path} not found (train-gate writes them at the end of a finished run)")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(f"{path} is not a readable HDF5 file ({exc})") from None
        with f:
            if f.attrs.get("format") != TARGETS_FORMAT:
                raise InputError(f"{path} is not a featcache teacher-targets file (no format={TARGETS_FORMAT!r})")
            version = int(f.attrs.get("format_version", 0))
            if version > TARGETS_VERSION:
                raise InputError(f"{path} has teacher-targets version {version}, newer than this featcache reads ({TARGETS_VERSION})")
            if cache_identity is not None and f.attrs["cache_identity"] != cache_identity:
                raise InputError(f"{path} was made from another cache (identity {f.attrs['cache_identity']}, this cache {cache_identity})")
            arrays = {k: f[k][...] for k in ("image", "view", "label", "label_pids", "feature", "logits", "gates")}
            digest = f.attrs.get("weights_digest")
            val = ValTargets(**{k: f["val"][k][...] for k in ("image", "pid", "camid", "query", "retrieval")}) if "val" in f else None
            return cls(path, json.loads(f.attrs["experts"]), str(f.attrs["cache_identity"]), str(f.attrs["run"]), **arrays,
                       weights_digest=str(digest) if digest is not None else None,
                       retrieval=f["retrieval"][...] if "retrieval" in f else None, val=val)

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
