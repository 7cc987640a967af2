"""Backbone presets: data, one JSON file each in ``presets/``, discovered by name (as open_clip does).

A preset names a model family and either a published model (``model`` plus
``pretrained`` tag for open_clip, a Hugging Face id for ALIGN) or an inline
architecture (``model_cfg``) for the tiny randomly initialised presets.
``hub_repo`` and ``hub_files`` say where the published weights are found, so
their absence is known in a second, before any model library is imported.
A ``standin`` preset is a tiny architecture whose weights
``featcache pretrain-standins`` trains on this machine (the demo's experts).
``attn_depths`` are 1-based: transformer blocks for open_clip, EfficientNet
stages (of 7) for ALIGN, whose outputs give the attention maps of Eq. 11.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from featcache.errors import ConfigError
from featcache.registry import nearest

PRESET_DIR = Path(__file__).parent / "presets"


class PresetError(ConfigError):
    """An unknown preset name or a malformed preset file."""


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    attn_depths: tuple[int, ...]
    random_init: bool = False
    model: str | None = None
    pretrained: str | None = None
    quick_gelu: bool = False
    model_cfg: dict[str, Any] = field(default_factory=dict)
    hub_repo: str | None = None           # where the published weights live on the Hugging Face hub
    hub_files: tuple[str, ...] = ()       # any one of these in the local cache means the weights are here
    standin: dict[str, Any] = field(default_factory=dict)  # a stand-in expert: how `featcache pretrain-standins` trains it

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "Preset":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PresetError(f"{source}: unknown preset keys {unknown}; known: {sorted(known)}")
        try:
            p = cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"]), "attn_depths": tuple(data["attn_depths"]),
                         "hub_files": tuple(data.get("hub_files", ()))})
        except (KeyError, TypeError) as exc:
            raise PresetError(f"{source}: malformed preset ({exc})") from None
        if p.model is None and not p.model_cfg:
            raise PresetError(f"{source}: a preset needs 'model' (a published model) or 'model_cfg' (an inline architecture)")
        if p.family == "align" and not p.model_cfg:
            raise PresetError(f"{source}: an ALIGN preset needs 'model_cfg' (the architecture, for --random-init)")
        if p.standin and (p.random_init or p.model or not p.model_cfg):
            raise PresetError(f"{source}: a stand-in preset ('standin') has an inline 'model_cfg' and no published or random weights")
        if len(p.attn_depths) < 4:
            raise PresetError(f"{source}: attn_depths needs at least four depths, got {list(p.attn_depths)}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: folders of the user's own presets (``*.json``), separated as in PATH; searched after the built-in ones
ENV_DIRS = "FEATCACHE_PRESETS"
_added_dirs: list[Path] = []
_added_files: dict[str, Path] = {}


def add_preset_dir(path: str | Path) -> None:
    """Make the ``*.json`` presets of a folder available by name (as open_clip's ``add_model_config``)."""
    path = Path(path)
    if not path.is_dir():
        raise PresetError(f"preset folder {path} does not exist")
    _added_dirs.append(path)


def add_preset_file(path: str | Path) -> str:
    """Make one preset file available by its ``name`` (``--backbone ./my-preset.json``); returns the name."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"--backbone {path}: no such preset file")
    data = _read(path)
    name = str(data.get("name", ""))
    if not name:
        raise PresetError(f"{path}: a preset needs a 'name' (the name its cache arrays go under)")
    builtin = PRESET_DIR / f"{name}.json"
    if builtin.is_file():
        raise PresetError(f"{path}: 'name' {name!r} is a built-in preset's; give your preset a name of its own")
    _added_files.pop(name, None)
    other = preset_files().get(name)
    if other is not None and other.resolve() != path.resolve():
        raise PresetError(f"{path}: 'name' {name!r} is also the preset {other}; give your preset a name of its own")
    Preset.from_dict(data, str(path))  # checked now, not at extraction
    _added_files[name] = path.resolve()
    return name


def is_preset_file(value: str) -> bool:
    """``--backbone`` names a preset file (a path ending in .json) rather than a preset."""
    return str(value).endswith(".json")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PresetError(f"{path}: not a readable JSON preset ({exc})") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset is a JSON object")
    return data


def preset_files() -> dict[str, Path]:
    """Every preset by name: built-in, then the ``FEATCACHE_PRESETS`` folders, the added folders and files. A user
    preset may not reuse a built-in's name (a cache records presets by name)."""
    out = {p.stem: p for p in sorted(PRESET_DIR.glob("*.json"))}
    dirs = [Path(d) for d in os.environ.get(ENV_DIRS, "").split(os.pathsep) if d] + _added_dirs
    for d in dirs:
        if not d.is_dir():
            raise PresetError(f"{ENV_DIRS}: preset folder {d} does not exist")
        for p in sorted(d.glob("*.json")):
            if p.stem in out and out[p.stem].parent == PRESET_DIR:
                raise PresetError(f"{p}: {p.stem!r} is a built-in preset's name; give your preset a name of its own")
            out.setdefault(p.stem, p)
    for name, p in _added_files.items():
        out.setdefault(name, p)
    return out


def available_presets() -> list[str]:
    return sorted(preset_files())


def get_preset(name: str) -> Preset:
    if is_preset_file(name):
        name = add_preset_file(name)
    path = preset_files().get(name)
    if path is None:
        raise PresetError(f"unknown backbone preset {name!r}{nearest(name, available_presets())}; available: {', '.join(available_presets())} "
                          f"(your own: --backbone PATH.json, or a folder of them in ${ENV_DIRS})")
    data = _read(path)
    if data.get("name") != name:
        raise PresetError(f"{path}: 'name' is {data.get('name')!r}, expected {name!r} (the file name)")
    return Preset.from_dict(data, str(path))
