"""How a stage config's field becomes a click option: its default and help from the dataclass, ``--set`` for
any field, and ``resolve``, which layers a --config section, --set and the command line into the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from featcache.config import StageConfig, option_name, parse_set, read_sections
from featcache.errors import ConfigError, InputError


class DeviceType(click.ParamType):
    """auto, cpu, cuda or cuda:N, the same for every command (checked by featcache.runtime)."""

    name = "device"

    def get_metavar(self, param, ctx=None) -> str:
        return "[auto|cpu|cuda|cuda:N]"

    def convert(self, value, param, ctx):
        from featcache.runtime import check_device_name

        try:
            check_device_name(str(value), f"--{param.name}" if param else "--device")
        except ConfigError as exc:
            self.fail(str(exc).split(": ", 1)[-1], param, ctx)
        return str(value)


DEVICE = DeviceType()


class LazyChoice(click.Choice):
    """A choice whose names come from a registry, looked up only when needed (keeps torch out of start-up)."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._names = names
        self.case_sensitive = True

    @property
    def choices(self):  # type: ignore[override]
        return tuple(self._names())

    @choices.setter
    def choices(self, value) -> None:  # click may assign; the registry stays the source
        pass


def _fmt(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def opt(cls: type[StageConfig], key: str, *decls: str, help: str = "", fmt: Callable[[Any], str] = _fmt, **kw) -> Callable:
    """A click option for config field ``key``; its default (shown in --help) is the dataclass's."""
    defaults = cls.defaults()
    if key not in defaults:
        help = f"{help}  [required]"
    elif not kw.get("is_flag") and defaults[key] not in ((), {}, None):
        help = f"{help}  [default: {fmt(defaults[key])}]"
    return click.option(*(decls or (option_name(key),)), key, default=None if not kw.get("is_flag") else False, help=help, **kw)


def stack(f: Callable, decorators: list[Callable]) -> Callable:
    """Apply option decorators in the order listed (the first is the first shown in --help)."""
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def set_option(cls: type[StageConfig]) -> Callable:
    """``--set KEY=VALUE`` for any field of ``cls``; its example is one of this command's own fields."""
    keys = cls.keys()
    defaults = {k: v for k, v in cls.defaults().items() if v not in (None, (), {})}
    example = next((k for k in ("lr", "epochs", "batch_size", "budget_mb", "views", "repeats", "opset", "ids") if k in defaults), None)
    example = example or next(iter(defaults), keys[0])
    value = defaults.get(example, "VALUE")
    shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help=f"Set any config field, e.g. --set {example}={shown} (repeatable; on the command line a key "
                             f"may also be spelled as its option). Fields: {', '.join(keys)}.")


def _set_aliases(ctx: click.Context, cls: type[StageConfig]) -> dict[str, str]:
    """Option spellings -> field names for this command (``--lambda`` -> ``lambda_``, ``--json`` -> ``json_out``)."""
    out: dict[str, str] = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.name in cls.keys():
            for o in p.opts:
                out[o.lstrip("-").replace("-", "_")] = p.name
    return out


def resolve(ctx: click.Context, cls: type[StageConfig], params: dict[str, Any], sets: tuple[str, ...] = (),
            resume: bool = False, arguments: dict[str, Any] | None = None) -> Any:
    """The stage config from the --config section, then --set, then options given on the command line (and
    ``arguments``, fields given as positional arguments). With ``resume``, the run's own saved config
    (``--out RUN_DIR``'s config.yaml) comes first, so a run resumes with ``--resume --out RUN_DIR`` alone."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if resume:
        out = params.get("out") or parse_set(sets).get("out")
        if out is None:
            raise ConfigError("--resume: give --out RUN_DIR, the run to continue (its options are read from RUN_DIR/config.yaml)")
        from featcache.training.rundir import RunDir  # torch: only where a run is resumed

        saved = RunDir(Path(out)).config_file
        if saved.is_file():  # else nothing to continue yet: --resume starts the run, from the options given
            section = read_sections(saved, str(saved), "the run's config", "command names to mappings of options").get(cls.command)
            if section is None:
                raise InputError(f"--resume: {saved} is not a {cls.command} run's config")
            layers.append((str(saved), cls.upgrade(section)))
    if ctx.default_map:
        layers.append((f"--config {ctx.find_root().params.get('config')} [{cls.command}]", dict(ctx.default_map)))
    aliases = _set_aliases(ctx, cls)
    overrides = {aliases.get(k, k) if k not in cls.keys() else k: v for k, v in parse_set(sets).items()}
    given = {k: v for k, v in params.items()
             if k in cls.keys() and ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    given.update(arguments or {})
    both = sorted(set(overrides) & set(given))
    if both:
        raise ConfigError(f"{', '.join(option_name(k) for k in both)} given twice: as an option and with --set")
    if overrides:
        layers.append(("--set", overrides))
    layers.append(("command line", given))
    return cls.build(*layers)
