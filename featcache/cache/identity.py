"""The cache's identity: what must match for a cache to be resumed, evaluated against another, or trained from.

It is stored as JSON in the root attribute ``identity``: the dataset, where
it lay when extracted, a digest of the image list (names, labels, splits), a
digest of the files' contents, the preprocessing, and each backbone's family,
weights and preset. Extraction, evaluation and training compare identities
through this one class.

The data is identified by what it is, not where it lies: a dataset folder
copied or moved elsewhere resumes and reuses its cache (``dataset_root`` is
where to find the files, updated on resume, and is not part of ``digest``);
the same names with other contents are refused. Caches written before the
content digest (``content`` empty) keep the old rule, root included.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from featcache.errors import InputError


def _canonical(data: Any) -> Any:
    """JSON-normalised (tuples to lists, keys sorted when dumped)."""
    return json.loads(json.dumps(data))


@dataclass(frozen=True)
class CacheIdentity:
    dataset: str
    dataset_root: str
    items: str                                   # digest of (path, pid, camid, split) of every listed file
    preprocessing: dict[str, Any] = field(default_factory=dict)
    backbones: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> family, weights, preset
    content: str = ""                            # digest of (path, SHA-1 of the bytes) of every listed file

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> "CacheIdentity":
        try:
            data = json.loads(text)
            return cls(str(data["dataset"]), str(data["dataset_root"]), str(data["items"]),
                       dict(data["preprocessing"]), {str(k): dict(v) for k, v in data["backbones"].items()},
                       str(data.get("content", "")))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InputError(f"{source}: its 'identity' attribute is not a featcache cache identity ({type(exc).__name__}: {exc})") from None

    def to_dict(self) -> dict[str, Any]:
        d = {"dataset": self.dataset, "dataset_root": self.dataset_root, "items": self.items,
             "preprocessing": self.preprocessing, "backbones": self.backbones}
        if self.content:
            d["content"] = self.content
        return _canonical(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """A short stable fingerprint: training runs and teacher targets record it. Where the data lies is not
        part of it when the contents are (a moved dataset is the same data)."""
        d = self.to_dict()
        if self.content:
            d.pop("dataset_root")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def moved_to(self, root: str) -> "CacheIdentity":
        """The same identity with the dataset found at ``root``."""
        return CacheIdentity(self.dataset, root, self.items, self.preprocessing, self.backbones, self.content)

    def weights(self, backbone: str) -> str | None:
        b = self.backbones.get(backbone)
        return None if b is None else b.get("weights")

    def random_init(self, backbones: list[str] | None = None) -> list[str]:
        """Which of ``backbones`` (default: all) hold randomly initialised weights."""
        names = self.backbones if backbones is None else backbones
        return sorted(n for n in names if str(self.weights(n) or "").startswith("random-init"))

    def resume_differences(self, wanted: "CacheIdentity") -> list[str]:
        """Why a cache with this identity cannot be resumed by a run that wants ``wanted``, as sentences."""
        diffs: list[str] = []
        if self.dataset != wanted.dataset:
            diffs.append(f"dataset: {self.dataset} in the cache, {wanted.dataset} now")
        by_content = bool(self.content and wanted.content)
        if not by_content and self.dataset_root != wanted.dataset_root:
            diffs.append(f"dataset root: {self.dataset_root} in the cache, {wanted.dataset_root} now (a cache made by "
                         "featcache 0.1 before 2026-12-05 records where its data lay; newer ones identify it by content)")
        elif self.items != wanted.items:
            diffs.append("image list: files were added, removed or relabelled since the cache was made")
        elif by_content and self.content != wanted.content:
            diffs.append("image contents: files changed since the cache was made")
        have, want = list(self.backbones), list(wanted.backbones)
        if sorted(have) != sorted(want):
            diffs.append(f"backbones: the cache holds {', '.join(have)}; this run asks for {', '.join(want)}")
        for name in sorted(set(have) & set(want)):
            a, b = self.backbones[name], wanted.backbones[name]
            if a.get("weights") != b.get("weights"):
                diffs.append(f"backbone {name}: weights {a.get('weights')} in the cache, {b.get('weights')} now")
            elif a != b:
                keys = sorted(k for k in set(a.get("preset", {})) | set(b.get("preset", {}))
                              if a.get("preset", {}).get(k) != b.get("preset", {}).get(k))
                diffs.append(f"backbone {name}: its preset changed ({', '.join(keys) or 'family'})")
        for key in sorted(set(self.preprocessing) | set(wanted.preprocessing)):
            a, b = self.preprocessing.get(key), wanted.preprocessing.get(key)
            if a != b:
                diffs.append(f"{key}: {_show(a)} in the cache, {_show(b)} now")
        return diffs

    def transfer_differences(self, other: "CacheIdentity") -> list[str]:
        """Why features of a model trained on this cache would not transfer to ``other`` (cross-domain)."""
        diffs = [f"{k}: {_show(self.preprocessing.get(k))} vs {_show(other.preprocessing.get(k))}"
                 for k in ("image_size", "resize") if self.preprocessing.get(k) != other.preprocessing.get(k)]
        for name in sorted(set(self.backbones) & set(other.backbones)):
            if self.weights(name) != other.weights(name):
                diffs.append(f"backbone {name} weights: {self.weights(name)} vs {other.weights(name)}")
        return diffs


def _show(v: Any) -> str:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return f"{v[0]}x{v[1]}"
    return "absent" if v is None else json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
