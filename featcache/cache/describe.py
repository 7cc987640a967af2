"""What ``featcache info`` tells of a cache: counts per split, failures, arrays and sizes per backbone (``summary``),
the paper's Table 1 (``split_stats``), and their text form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache.fileformat import open_cache_file
from featcache.datasets import SPLITS
from featcache.cache.store import DONE, FAILED, PENDING, read_identity


def summary(path: str | Path) -> dict[str, Any]:
    """What ``featcache info --json`` prints: counts per split, failures, arrays and sizes per backbone."""
    with open_cache_file(path) as f:
        g = f["images"]
        status, split = g["status"][...], g["split"][...]
        paths, reasons = g["path"].asstr()[...], g["reason"][...]
        out: dict[str, Any] = {
            "path": str(path),
            "format_version": int(f.attrs["format_version"]),
            "featcache_version": f.attrs["featcache_version"],
            "identity": read_identity(f, path).to_dict(),
            "splits": {s: int(((status == DONE) & (split == i)).sum()) for i, s in enumerate(SPLITS)},
            "pending": int((status == PENDING).sum()),
            "pending_per_split": {s: int(((status == PENDING) & (split == i)).sum()) for i, s in enumerate(SPLITS)},
            "failed": [{"path": str(paths[i]), "reason": reasons[i].decode(errors="replace")} for i in np.flatnonzero(status == FAILED)],
            "tokens": f.attrs["tokens"],
            "backbones": {},
            "file_bytes": Path(path).stat().st_size,
        }
        for name, bg in f["backbones"].items():
            arrays = {k: {"shape": list(d.shape), "dtype": str(d.dtype), "rows": d.attrs["rows"], "doc": d.attrs["doc"]} for k, d in bg.items()}
            out["backbones"][name] = {"arrays": arrays, "bytes": int(sum(_stored_bytes(d) for d in bg.values()))}
        shards = "shards" in f.attrs
    if shards:  # a distributed extraction's master: the arrays live in the shard files
        from featcache.cache.shards import shard_status

        states = shard_status(Path(path))
        out["shards"] = [{"path": str(p), "state": st} for p, st in states]
        out["file_bytes"] += sum(p.stat().st_size for p, st in states if st == "published")
    return out


def _stored_bytes(ds) -> int:
    """Bytes a dataset holds on disk; for a virtual dataset, the bytes it maps (in its source files)."""
    return int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize if ds.is_virtual else int(ds.id.get_storage_size())


def split_stats(path: str | Path) -> dict[str, dict[str, int]]:
    """The paper's Table 1 from a cache: cached images, identities and cameras per split (distractors, pid <= 0,
    count as images but not as identities)."""
    with open_cache_file(path) as f:
        g = f["images"]
        done = g["status"][...] == DONE
        split, pid, cam = g["split"][...], g["pid"][...], g["camid"][...]
    out = {}
    for i, name in enumerate(SPLITS):
        m = done & (split == i)
        out[name] = {"images": int(m.sum()), "identities": int(np.unique(pid[m & (pid > 0)]).size),
                     "cameras": int(np.unique(cam[m]).size)}
    return out


def format_split_stats(stats: dict[str, dict[str, int]]) -> str:
    """``split_stats`` as the table ``featcache info --splits`` prints."""
    rows = [f"{'split':8s} {'images':>8s} {'identities':>10s} {'cameras':>8s}"]
    rows += [f"{name:8s} {v['images']:8d} {v['identities']:10d} {v['cameras']:8d}" for name, v in stats.items()]
    return "\n".join(rows)


def format_summary(s: dict[str, Any]) -> str:
    """``summary`` as the text ``featcache info`` prints."""
    ident = s["identity"]
    pre = ident["preprocessing"]
    lines = [f"{s['path']}  (format version {s['format_version']}, featcache {s['featcache_version']}, {s['file_bytes'] / 2**20:.1f} MiB)",
             f"dataset {ident['dataset']} at {ident['dataset_root']}",
             f"input {pre['image_size'][0]}x{pre['image_size'][1]} ({pre.get('resize', '?')}); views {pre.get('views')}; "
             f"tokens {s['tokens']}" + ("; synthetic features" if pre.get("synthetic") else ""),
             "cached: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()) + f"; pending {s['pending']}; failed {len(s['failed'])}"]
    if "shards" in s:
        states = [sh["state"] for sh in s["shards"]]
        lines.append(f"shards: {len(states)} ({', '.join(f'{states.count(k)} {k}' for k in ('published', 'partial', 'missing') if k in states)}) "
                     f"under {Path(s['shards'][0]['path']).parent}")
    for name, b in s["backbones"].items():
        lines.append(f"\nbackbone {name}  weights {ident['backbones'][name]['weights']}  ({b['bytes'] / 2**20:.1f} MiB)")
        lines += [f"  {k:10s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} per {a['rows']:5s}  {a['doc']}" for k, a in b["arrays"].items()]
    if s["failed"]:
        lines.append("\nfailed:")
        lines += [f"  {rec['path']}: {rec['reason']}" for rec in s["failed"]]
    return "\n".join(lines)
