"""Run configs: a YAML file sets command defaults, the command line overrides them (timm's pattern)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml


def load_default_map(path: Path, group: click.Group) -> dict[str, dict[str, Any]]:
    """Read ``{command: {option: value}}`` from YAML, rejecting unknown commands and options."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of command names to options", param_hint="--config")
    out: dict[str, dict[str, Any]] = {}
    for cmd_name, opts in data.items():
        cmd = group.commands.get(cmd_name)
        if cmd is None:
            raise click.BadParameter(f"{path}: unknown command {cmd_name!r}; known: {sorted(group.commands)}", param_hint="--config")
        if not isinstance(opts, dict):
            raise click.BadParameter(f"{path}: {cmd_name}: expected a mapping of options", param_hint="--config")
        known = {p.name for p in cmd.params if p.name}
        unknown = sorted(set(k.replace("-", "_") for k in opts) - known)
        if unknown:
            raise click.BadParameter(f"{path}: {cmd_name}: unknown options {unknown}; known: {sorted(known)}", param_hint="--config")
        out[cmd_name] = {k.replace("-", "_"): v for k, v in opts.items()}
    return out


def save_resolved(path: Path, command: str, params: dict[str, Any]) -> None:
    """Write the resolved options beside the outputs, so a run can be repeated with ``--config``."""
    clean = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    path.write_text(yaml.safe_dump({command: clean}, sort_keys=True))
