"""One config model for every stage: a typed dataclass holds the defaults; YAML and the command line fill it.

Each stage has a frozen dataclass deriving from ``StageConfig``; its field
defaults are the only place those defaults live. ``StageConfig.build`` takes
layers of values (a YAML section, ``--set key=value`` pairs, the command
line's options) in increasing precedence, refuses unknown keys naming the
nearest valid ones, converts each value to the field's type and runs the
stage's checks. ``to_dict`` gives the resolved config as plain YAML data, in
the ``{command: {key: value}}`` shape that ``featcache --config`` reads back,
and ``save_resolved`` writes it beside a stage's outputs (timm's
``_parse_args`` pattern).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from featcache.errors import ConfigError
from featcache.registry import nearest


def option_name(key: str) -> str:
    """The command-line spelling of a config key: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


def parser(fn: Callable[[Any], Any], **kw) -> Any:
    """A field whose values are parsed by ``fn`` (for values with their own syntax, e.g. '256x128')."""
    return dataclasses.field(metadata={"parse": fn}, **kw)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of the stage configs: typed fields, built from layers of loosely typed values."""

    #: the command whose options these are (``extract``, ``eval``, ...)
    command: typing.ClassVar[str] = ""
    #: the values of fields added since a run's config was saved that its run trained with (``upgrade``)
    legacy: typing.ClassVar[dict[str, Any]] = {}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field defaults (what ``--help`` shows)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    @classmethod
    def check_keys(cls, data: Mapping[str, Any], source: str) -> None:
        known = cls.keys()
        for key in data:
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {key!r} for {cls.command or cls.__name__}{nearest(key, known)}; "
                    f"valid keys: {', '.join(known)}"
                )

    @classmethod
    def merge(cls, *layers: tuple[str, Mapping[str, Any]]) -> dict[str, Any]:
        """The fields' values from ``(source, values)`` layers, later layers overriding earlier ones, each converted
        to its field's type; a required field missing from every layer is refused."""
        hints = typing.get_type_hints(cls)
        merged: dict[str, Any] = {}
        for source, values in layers:
            cls.check_keys(values, source)
            for key, value in values.items():
                field = next(f for f in dataclasses.fields(cls) if f.name == key)
                merged[key] = convert(value, hints[key], field, f"{source}: {key}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in merged and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        if missing:
            raise ConfigError(
                f"missing {', '.join(option_name(m) for m in missing)}: give it on the command line "
                f"or as {', '.join(repr(m) for m in missing)} under {cls.command!r} in the --config file"
            )
        return merged

    @classmethod
    def build(cls, *layers: tuple[str, Mapping[str, Any]]):
        """The config from ``(source, values)`` layers, later layers overriding earlier ones."""
        return cls(**cls.merge(*layers))

    @classmethod
    def upgrade(cls, saved: Mapping[str, Any]) -> dict[str, Any]:
        """A run's saved config in today's form (fields added since take the values the run trained with)."""
        return {**cls.legacy, **saved}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config"):
        return cls.build((source, data))

    def to_dict(self, absolute: bool = False) -> dict[str, Any]:
        """Plain YAML-safe values (paths as strings, tuples as lists); ``absolute`` makes paths absolute,
        so that a saved config runs the same from any working directory."""
        return {f.name: _plain(getattr(self, f.name), absolute) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any):
        return self.build(("config", self.to_dict()), ("changes", changes))


def _plain(v: Any, absolute: bool = False) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # a nested part of a recipe: a mapping
        return {f.name: _plain(getattr(v, f.name), absolute) for f in dataclasses.fields(v)}
    if isinstance(v, Path):
        return str(v.absolute() if absolute else v)
    if isinstance(v, (tuple, list)):
        return [_plain(x, absolute) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x, absolute) for k, x in v.items()}
    return v


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def convert(value: Any, tp: Any, field: dataclasses.Field, where: str) -> Any:
    """``value`` (from YAML, --set or click) as type ``tp``; a ConfigError naming ``where`` otherwise."""
    parse = field.metadata.get("parse")
    if parse is not None:
        try:
            return parse(value)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return _as_type(value, tp, where)


def _as_type(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _as_type(value, inner[0], where)
    if origin is tuple:
        items = _split(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_as_type(v, args[0], where) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_as_type(v, a, where) for v, a in zip(items, args))
    if origin is dict:
        if isinstance(value, Mapping):
            return {str(k): _as_type(v, args[1], where) for k, v in value.items()}
        out = {}
        for item in _split(value):
            k, sep, v = str(item).partition("=")
            if not sep or not k or not v:
                raise ConfigError(f"{where}: {item!r}: expected KEY=VALUE")
            out[k] = _as_type(v, args[1], where)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if tp is str:
        if isinstance(value, (dict, list, tuple)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _split(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def parse_set(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs as a mapping; values are read as YAML scalars (``3e-4``, ``true``, ``[a, b]``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set lr=3e-4")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            out[key] = text
    return out


def read_sections(path: Path, label: str, noun: str, expected: str) -> dict[str, dict[str, Any]]:
    """A YAML file of sections, ``{section: {key: value}}``, keys spelled with underscores; errors start with ``label``."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {noun} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{label}: expected a mapping of {expected}")
    return {str(k): {str(kk).replace("-", "_"): vv for kk, vv in v.items()} for k, v in data.items()}


def load_yaml(path: Path) -> dict[str, dict[str, Any]]:
    """A ``--config`` file: ``{command: {key: value}}``; keys are checked by each command's config."""
    return read_sections(path, f"--config {path}", "it", "command names to mappings of options")


def resolved_beside(output: Path) -> Path:
    """Where the resolved config of a stage's file output is kept: beside it, as ``<name>.config.yaml``."""
    output = Path(output)
    return output.with_name(output.name + ".config.yaml")


def read_resolved(output: Path, command: str) -> dict[str, Any] | None:
    """The resolved config ``command`` saved beside ``output`` (``resolved_beside``), or None if there is none."""
    path = resolved_beside(output)
    if not path.is_file():
        return None
    return read_sections(path, str(path), "the resolved config", "command names to mappings of options").get(command)


def save_resolved(path: Path, cfg: StageConfig) -> None:
    """Write the resolved config beside the outputs, readable back with ``featcache --config``."""
    from featcache.fileio import atomic_write

    text = yaml.safe_dump({cfg.command: cfg.to_dict(absolute=True)}, sort_keys=False)
    atomic_write(path, lambda p: p.write_text(text))
