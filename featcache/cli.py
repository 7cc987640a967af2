"""The ``featcache`` command line: one click group; each command parses options and calls one typed function.

Every stage's options fill its config dataclass (``featcache.config``): a
``--config`` YAML section first, then ``--set key=value``, then the options
given on the command line. Options default to ``None`` here so that the
dataclass stays the only place a default lives; ``--help`` shows it from
there. This module is also the wiring point: it imports the stage packages
that register model kinds (``gate``), so that evaluation knows none by name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from featcache import __version__
from featcache.config import StageConfig, load_yaml, option_name, parse_set, read_sections
from featcache.errors import ConfigError, FeatcacheError, InputError, one_line
from featcache.registry import nearest

import featcache.distill.features  # noqa: F401,E402  (registers the student: model kind)
import featcache.gate.features  # noqa: F401,E402  (registers the gate: model kind)

logger = logging.getLogger(__name__)

#: commands of later versions: a clear answer instead of "No such command"
PLANNED: dict[str, str] = {}


#: commands without a stage config: their --config keys are checked against their options
_CONFIGLESS = ("info", "verify", "backbones", "profile", "export")


class FeatcacheGroup(click.Group):
    """Known errors end with one message and an exit code (2 usage, 1 failure); ``--debug`` shows the traceback."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            if name in PLANNED:
                raise click.UsageError(f"`featcache {name}` ({PLANNED[name]}) is not in featcache {__version__} yet; "
                                       f"available commands: {', '.join(self.list_commands(ctx))}")
            raise click.UsageError(f"no command {name!r}{nearest(name, self.list_commands(ctx))}; "
                                   f"available commands: {', '.join(self.list_commands(ctx))}")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeatcacheError as exc:
            if ctx.meta.get("featcache.debug"):
                raise
            click.echo(f"Error: {one_line(exc)}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # a file the system refused (permissions, a full disk): name it, no traceback
            if ctx.meta.get("featcache.debug") or not exc.filename:
                raise
            click.echo(f"Error: {exc.filename}: {exc.strerror or exc} (errno {exc.errno})", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say how to go on, then click's "Aborted!"
            if ctx.invoked_subcommand in CONTINUE:
                click.echo(f"Stopped: {CONTINUE[ctx.invoked_subcommand]}", err=True)
            raise


#: how each long command continues after Ctrl-C (or SIGTERM): what is done stays done
CONTINUE = {
    "extract": "the images written so far are kept; rerun the same command to extract the rest.",
    "train-gate": "rerun the same command with --resume to continue from the last finished epoch.",
    "distill": "rerun the same command with --resume to continue from the last finished epoch.",
    "pretrain-standins": "rerun the same command: stand-ins already trained are kept, and the stopped one starts again.",
    "run": "rerun the same command: finished stages are skipped, and a stopped one resumes.",
    "demo": "rerun the same command: finished stages are skipped, and a stopped one resumes.",
}


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
            layers.append((str(saved), {**getattr(cls, "legacy", {}), **section}))
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


@click.group(cls=FeatcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featcache")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML with a section per command (extract:, eval:, train-gate:, ...); the command line overrides it.")
@click.option("-v", "--verbose", count=True, help="-v: progress logs (INFO); -vv: debug.")
@click.option("--debug", is_flag=True, help="Show the traceback of errors instead of their one-line message.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: int, debug: bool) -> None:
    """featcache: run foundation backbones once, cache their features, train and evaluate re-ID from the cache.

    Exit codes: 0 success; 2 a usage or configuration error (bad option, key or value); 1 a failure (missing or
    mismatched inputs, errors while running).
    """
    from featcache.progress import setup_logging

    setup_logging(verbose)
    ctx.meta["featcache.debug"] = debug
    if config is not None:
        data = load_yaml(config)
        for name, section in data.items():
            if name not in main.commands:
                raise ConfigError(f"--config {config}: unknown section {name!r}{nearest(name, main.commands)}; "
                                  f"sections are command names: {', '.join(sorted(main.commands))}")
            params = {p.name: p for p in main.commands[name].params if p.name}
            for key, value in list(section.items()):
                if key not in params and name in _CONFIGLESS:
                    raise ConfigError(f"--config {config} [{name}]: unknown key {key!r}{nearest(key, params)}; "
                                      f"valid keys: {', '.join(params)}")
                if key in params and getattr(params[key], "multiple", False) and not isinstance(value, (list, tuple)):
                    section[key] = [value]  # `backbones: clip-tiny` means a list of one
        ctx.default_map = data


# ---------------------------------------------------------------------------------------------- synth
def _synth_options(f: Callable) -> Callable:
    from featcache.synth import LAYOUT_CAMS, SynthConfig as C

    return stack(f, [
        click.argument("out", type=click.Path(file_okay=False, path_type=Path), required=False),
        opt(C, "layout", type=click.Choice(list(LAYOUT_CAMS)), help="Official layout to write."),
        opt(C, "ids", type=int, help="Number of identities (half train, half test)."),
        opt(C, "train_ids", type=int, help="Training identities, with --test-ids instead of --ids: the test side stays the same whatever this is."),
        opt(C, "test_ids", type=int, help="Test identities (and as many distractors), with --train-ids."),
        opt(C, "cams", type=int, help="Cameras."),
        opt(C, "seed", type=int, help="Seed of the scenes."),
        set_option(C),
    ])


@main.command()
@_synth_options
@click.pass_context
def synth(ctx: click.Context, sets: tuple[str, ...], **params) -> None:
    """Write a synthetic dataset of real JPEGs in an official layout to OUT."""
    from featcache.synth import SynthConfig, generate

    cfg = resolve(ctx, SynthConfig, params, sets)
    counts = generate(cfg)
    click.echo(f"wrote {sum(counts.values())} images to {cfg.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


# ---------------------------------------------------------------------------------------------- stand-ins
def _standin_options(f: Callable) -> Callable:
    from featcache.standins.config import StandinConfig as C

    return stack(f, [
        opt(C, "presets", "--preset", multiple=True, help="Stand-in preset to train (repeatable)."),
        opt(C, "root", type=click.Path(file_okay=False, path_type=Path),
            help="Where trained stand-ins are kept  [default: $FEATCACHE_HOME/standins, else ~/.cache/featcache/standins]."),
        opt(C, "epochs", type=int, help="Pre-training epochs  [default: each preset's own]"),
        opt(C, "seed", type=int, help="Seed of the pre-training set and of training."),
        opt(C, "device", type=DEVICE, help="Where pre-training runs."),
        opt(C, "force", is_flag=True, help="Train again even where weights with the same key exist."),
        set_option(C),
    ])


@main.command("pretrain-standins")
@_standin_options
@click.pass_context
def pretrain_standins(ctx: click.Context, sets: tuple[str, ...], **params) -> None:
    """Pre-train the demo's stand-in experts (clip-mini, align-mini) on a synthetic set of their own, once per machine.

    Prints the --weights option that extraction takes for each.
    """
    from featcache.standins.config import StandinConfig
    from featcache.standins.runner import run_pretrain_standins

    if not params.get("presets"):
        params.pop("presets", None)
    cfg = resolve(ctx, StandinConfig, params, sets)
    for name, path in run_pretrain_standins(cfg).items():
        click.echo(f"--weights {name}={path}")


# ---------------------------------------------------------------------------------------------- extract
def _datasets() -> list[str]:
    from featcache.datasets import available

    return available()


def _extract_options(f: Callable) -> Callable:
    from featcache.extract.config import MAPPERS, TOKEN_MODES, ExtractConfig as C

    return stack(f, [
        opt(C, "dataset", type=LazyChoice(_datasets), help="Dataset layout."),
        opt(C, "root", type=click.Path(path_type=Path), help="Dataset folder in its official layout (csv: the manifest or its folder)."),
        opt(C, "backbones", "--backbone", multiple=True, help="Backbone preset; repeat for several (see `featcache backbones`)."),
        opt(C, "out", type=click.Path(dir_okay=False, path_type=Path), help="The HDF5 cache to write or resume."),
        opt(C, "views", type=int, help="Views per training image: 0 clean, 1 flip, 2+ seeded augmentations (query/gallery: at most 2)."),
        opt(C, "batch_size", type=int, help="Images per batch (keep it fixed across a resume for bit-equal results)."),
        opt(C, "workers", help="Decoding processes: a number (0 decodes in the main process) or auto (0 on CPU; on CUDA, this rank's share of the cores less one).  [default: auto]"),
        opt(C, "device", type=DEVICE, help="Where the backbones run."),
        opt(C, "weights", multiple=True, metavar="PRESET=PATH", help="Local weights for a preset (open_clip checkpoint file or dir; ALIGN save_pretrained dir)."),
        opt(C, "random_init", is_flag=True, help="Allow random weights for full-size presets (benchmarks only; never results)."),
        opt(C, "overwrite", is_flag=True, help="Replace an existing cache instead of resuming it."),
        opt(C, "repair", is_flag=True, help="Verify an existing cache and extract again exactly the images whose rows fail their checksums."),
        opt(C, "tokens", type=click.Choice(TOKEN_MODES), help="Which views keep token features."),
        opt(C, "image_size", help="Input size N or HxW (256x128 is usual for persons).", fmt=lambda v: f"{v[0]}x{v[1]}"),
        opt(C, "aug_seed", type=int, help="Seed of the stored training augmentations."),
        opt(C, "skip_bad_names", is_flag=True, help="Record files that break the naming rule as failed instead of stopping."),
        opt(C, "float32", multiple=True, metavar="OUTPUT", help="Store this output as float32 (tokens are float16 by default): "
            "OUTPUT or PRESET:OUTPUT, globs allowed; repeat for several. Decided when the cache is created; a resumed cache keeps its dtypes."),
        opt(C, "mapper", type=click.Choice(MAPPERS), help="overlapped: checked and cast on the device, copied beside the next batch; "
            "plain: the reference path (forward, float32 to the host, cast by NumPy), for checks and benchmarks."),
        set_option(C),
    ])


@main.command()
@_extract_options
@click.pass_context
def extract(ctx: click.Context, sets: tuple[str, ...], **params) -> None:
    """Run the frozen backbones once over every image and cache their outputs in HDF5."""
    from featcache.extract.config import ExtractConfig
    from featcache.extract.runner import run_extract

    cfg = resolve(ctx, ExtractConfig, params, sets)
    res = run_extract(cfg)
    s = res.summary
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    click.echo(
        (f"rank {rank}: " if rank is not None else "") + f"{cfg.out}: cached train {s['splits']['train']}, query {s['splits']['query']}, gallery {s['splits']['gallery']}; "
        f"failed {len(s['failed'])}; {res.processed} images this run at {res.images_per_second:.1f} img/s"
    )


# ---------------------------------------------------------------------------------------------- eval
def _eval_options(f: Callable) -> Callable:
    from featcache.evaluation.features import kinds_help
    from featcache.evaluation.metrics import AP_FORMS
    from featcache.evaluation.approx import APPROX_INDEXES
    from featcache.evaluation.runner import EvalConfig as C

    return stack(f, [
        opt(C, "cache", type=click.Path(path_type=Path), help="Cache to evaluate on; with --gallery-cache, the source (training) domain's cache."),
        opt(C, "model", help=f"KIND:REF. Kinds: {kinds_help()}."),
        opt(C, "gallery_cache", type=click.Path(path_type=Path), help="Cross-domain: take query and gallery from this (target-domain) cache."),
        opt(C, "ap", type=click.Choice(AP_FORMS), help="plain: torchreid/fast-reid; trapezoid: the official MATLAB kits."),
        opt(C, "ranks", help="CMC ranks to report, comma-separated."),
        opt(C, "rerank", is_flag=True, help="k-reciprocal re-ranking (k1, k2, lambda below)."),
        opt(C, "k1", type=int, help="Re-ranking k1."),
        opt(C, "k2", type=int, help="Re-ranking k2."),
        opt(C, "lambda_", "--lambda", type=float, help="Re-ranking lambda."),
        opt(C, "flip", is_flag=True, help="Average the clean and flipped views' features."),
        opt(C, "json_out", "--json", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON (and the resolved config beside it)."),
        opt(C, "plots", type=click.Path(file_okay=False, path_type=Path), help="Write a CMC curve and ranked-list grids here."),
        opt(C, "save_features", type=click.Path(dir_okay=False, path_type=Path), help="Write the evaluated features and labels (.npz)."),
        opt(C, "device", type=DEVICE, help="Where models and search run."),
        opt(C, "budget_mb", type=int, help="Memory (MiB) for one block of scores or model activations."),
        opt(C, "plot_queries", type=int, help="Queries per ranked-list grid."),
        opt(C, "seed", type=int, help="Seed of the random sample of plotted queries."),
        opt(C, "allow_partial", is_flag=True, help="Evaluate a cache whose extraction has not finished (the report says so)."),
        opt(C, "agree_with", help="Another KIND:REF: also report the share of each query's top-k both models rank alike (e.g. a student against its teacher)."),
        opt(C, "agree_k", type=int, help="k of --agree-with."),
        opt(C, "search", type=click.Choice(("exact", "approx")), help="exact: every score (the protocol's metrics); approx: an ANN index's top --approx-k lists (AP@k, labelled)."),
        opt(C, "approx_index", type=click.Choice(APPROX_INDEXES), help="The approximate index (FAISS)."),
        opt(C, "approx_k", type=int, help="Length of each query's list in approximate search."),
        opt(C, "nprobe", type=int, help="IVF lists visited per query in approximate search."),
        set_option(C),
    ])


@main.command("eval")
@_eval_options
@click.pass_context
def eval_(ctx: click.Context, sets: tuple[str, ...], **params) -> None:
    """Evaluate a model on a cache: exact search, mAP / CMC / mINP under the dataset's protocol."""
    from featcache.evaluation.runner import EvalConfig, format_table, run_eval

    cfg = resolve(ctx, EvalConfig, params, sets)
    try:
        ev = run_eval(cfg)
    except FeatcacheError as exc:
        if getattr(exc, "evaluation", None) is not None:  # the metrics were computed: print them before the error
            click.echo(format_table(exc.evaluation.report))
        raise
    click.echo(format_table(ev.report))


# ---------------------------------------------------------------------------------------------- train-gate
def _fusions() -> list[str]:
    from featcache.gate.model import fusion_names

    return fusion_names()


def _gate_options(f: Callable) -> Callable:
    from featcache.gate.config import RECIPES, GateConfig as C
    return stack(f, [
        opt(C, "cache", type=click.Path(dir_okay=False, path_type=Path), help="The feature cache (its training split)."),
        opt(C, "out", type=click.Path(file_okay=False, path_type=Path), help="Run directory."),
        opt(C, "experts", help="Comma-separated presets in the cache (default: all of them)."),
        opt(C, "fusion", type=LazyChoice(_fusions), help="How experts are combined."),
        opt(C, "gate_recipe", type=click.Choice(list(RECIPES)), help="How a gate is trained: paper (Eq. 7-9 exactly) or routed (docs/train-gate.md); each remedy can be set with --set."),
        opt(C, "epochs", type=int, help="Training epochs."),
        opt(C, "batch_size", type=int, help="Images per batch: P identities x K images each (K: --instances)."),
        opt(C, "instances", type=int, help="K, the images of each identity in a batch."),
        opt(C, "seed", type=int, help="The paper uses 42, 1337 and 2024."),
        opt(C, "device", type=DEVICE, help="Where training runs."),
        opt(C, "label_smoothing", type=float, help="Label smoothing of the ID loss."),
        opt(C, "allow_partial", is_flag=True, help="Train on a cache whose extraction has not finished (recorded in run.json; eval and distill say so)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint, with the options it was started with (give only --out; options given too must agree, except where files are and the device)."),
        set_option(C),
    ])


@main.command("train-gate")
@_gate_options
@click.pass_context
def train_gate(ctx: click.Context, sets: tuple[str, ...], resume: bool, **params) -> None:
    """Train the expert adapters and the mixture-of-experts gate from the cache alone."""
    from featcache.gate.config import GateConfig
    from featcache.gate.runner import run_train_gate

    cfg = resolve(ctx, GateConfig, params, sets, resume)
    res = run_train_gate(cfg, resume)
    if res.stats.get("gated", res.stats.get("routed_share") is not None):  # stats of older runs lack "gated"
        click.echo(f"{res.run}: gate mean weights {res.stats['mean_weight']}; routed {res.stats['routed_share']}; teacher targets {res.targets}")
    else:  # concat and average weigh the experts equally: there is no gate to describe
        click.echo(f"{res.run}: fusion {cfg.fusion} (no gate); teacher targets {res.targets}")


# ---------------------------------------------------------------------------------------------- distill
def _distill_options(f: Callable) -> Callable:
    from featcache.distill.config import KD_SPACES, STUDENT_NAMES, VIEW_MODES, DistillConfig as C
    from featcache.training.options import TRAIN_PRECISIONS

    return stack(f, [
        opt(C, "cache", type=click.Path(dir_okay=False, path_type=Path), help="The feature cache the teacher was trained on."),
        opt(C, "gate", type=click.Path(file_okay=False, path_type=Path), help="The finished train-gate run (the teacher) whose targets are distilled."),
        opt(C, "root", type=click.Path(file_okay=False, path_type=Path), help="Dataset folder (default: the one the cache was extracted from)."),
        opt(C, "out", type=click.Path(file_okay=False, path_type=Path), help="Run directory."),
        opt(C, "student", type=click.Choice(list(STUDENT_NAMES)), help="Student architecture (torchvision)."),
        opt(C, "student_init", help="imagenet (torchvision's weights, from TORCH_HOME), random (tests, demo) or a weights file."),
        opt(C, "epochs", type=int, help="Training epochs."),
        opt(C, "batch_size", type=int, help="Images per batch: P identities x K images each (K: --instances)."),
        opt(C, "instances", type=int, help="K, the images of each identity in a batch."),
        opt(C, "seed", type=int, help="The paper uses 42, 1337 and 2024."),
        opt(C, "device", type=DEVICE, help="Where training runs."),
        opt(C, "allow_partial", is_flag=True, help="Train on a cache, or from a gate, that covers only part of the training images (recorded in run.json)."),
        opt(C, "precision", type=click.Choice(list(TRAIN_PRECISIONS)), help="auto: bf16 autocast on CUDA, float32 on the "
            "CPU; fp32; bf16 (autocast). Losses in float32 either way; on CUDA the student is channels_last at any precision."),
        opt(C, "pixel_cache", type=click.Path(dir_okay=False, path_type=Path), help="HDF5 of decoded, letterboxed images: built (or resumed) on first use, so no epoch decodes a JPEG."),
        opt(C, "losses", help="Terms of L_total (switch KD terms off for the ablation)."),
        opt(C, "views", type=click.Choice(list(VIEW_MODES)), help="cached: a random cached view per step; view0: the clean view only."),
        opt(C, "lambda_kd", type=float, help="Weight of L_KD (Eq. 16)."),
        opt(C, "lambda_feat", type=float, help="Weight of L_feat (Eq. 10). Default: 30 with --kd-space retrieval (chosen on validation), the paper's 0.3 with literal."),
        opt(C, "lambda_att", type=float, help="Weight of L_att (Eq. 11)."),
        opt(C, "lambda_rel", type=float, help="Weight of L_rel (Eq. 12)."),
        opt(C, "kd_temperature", type=float, help="Temperature T of L_KD (Eq. 16)."),
        opt(C, "kd_space", type=click.Choice(list(KD_SPACES)), help="retrieval: L_feat and L_rel on the L2-normalised retrieval "
            "features (scale-free); literal: Eq. 10 and 12 on the teacher's raw F_t."),
        opt(C, "workers", help="Decoding processes: a number or auto (0 on CPU; on CUDA, this rank's share of the cores less one).  [default: auto]"),
        opt(C, "input_path", type=click.Choice(["auto", "workers", "device"]), help="Where views are replayed: workers, or device "
            "(the pixel cache's images resident on the training device); auto: device on CUDA with --pixel-cache."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint, with the options it was started with (give only --out; options given too must agree, except where files are and the device)."),
        set_option(C),
    ])


@main.command()
@_distill_options
@click.pass_context
def distill(ctx: click.Context, sets: tuple[str, ...], resume: bool, **params) -> None:
    """Train a student from images against the cached teacher (ID, triplet, KD, feature, attention, relation losses)."""
    from featcache.distill.config import DistillConfig
    from featcache.distill.runner import run_distill

    cfg = resolve(ctx, DistillConfig, params, sets, resume)
    res = run_distill(cfg, resume)
    last = res.last
    click.echo(f"{res.run}: {cfg.student} after epoch {last.get('epoch')}: loss {float(last.get('loss', 'nan')):.4f}, "
               f"kd {float(last.get('kd') or 'nan'):.4f}, train acc {float(last.get('acc', 'nan')):.3f}")
    if res.val and res.val["mAP"] is None:
        click.echo(f"validation: nothing to evaluate ({res.val['reason']})")
    elif res.val:
        a = res.val["agreement"]
        click.echo(f"validation ({res.val['identities']} identities): mAP {res.val['mAP']:.4f}; with the teacher: top-{a['k']} "
                   f"overlap {a['top_k_overlap']:.4f}, rank correlation {a['rank_correlation']:.4f}")


def _profile_options(f: Callable) -> Callable:
    from featcache.distill.config import ProfileConfig as C

    return stack(f, [
        opt(C, "models", "--model", multiple=True, help="student:RUN_DIR, gate:RUN_DIR (the whole teacher) or backbone:PRESET; repeat to compare."),
        opt(C, "device", type=DEVICE, help="Where the models run."),
        opt(C, "image_size", help="Input HxW when the run's cache is gone (default: the size the run was trained at)."),
        opt(C, "batch", help="Batch sizes to time, comma-separated.", fmt=lambda v: ",".join(map(str, v))),
        opt(C, "repeats", type=int, help="Timed runs per batch size (the median is reported)."),
        opt(C, "precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="fp32, or bf16/fp16 autocast (deployment precision on a GPU); compare models at the same one."),
        set_option(C),
    ])


@main.command()
@_profile_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def profile(ctx: click.Context, sets: tuple[str, ...], as_json: bool, **params) -> None:
    """Parameters, FLOPs per image, latency, images/s and peak memory of a student or the whole teacher."""
    from featcache.distill.config import ProfileConfig
    from featcache.distill.profile import format_profile, profile_models

    cfg = resolve(ctx, ProfileConfig, params, sets)
    rows = profile_models(cfg.models, device=cfg.device, image_size=cfg.image_size, batch_sizes=cfg.batch, repeats=cfg.repeats,
                          precision=cfg.precision)
    click.echo(json.dumps(rows, indent=2) if as_json else format_profile(rows))


def _export_options(f: Callable) -> Callable:
    from featcache.distill.config import ExportConfig as C

    return stack(f, [
        click.argument("positional_model", metavar="[MODEL]", required=False),  # the old spelling, deprecated
        opt(C, "model", help="The student to export: student:RUN_DIR (spelled as in eval and profile)."),
        opt(C, "onnx", type=click.Path(dir_okay=False, path_type=Path), help="The ONNX file to write."),
        opt(C, "atol", type=float, help="Tolerance of the ONNX Runtime check, in units of the embedding's largest value."),
        opt(C, "opset", type=int, help="ONNX opset (torch's dynamo exporter writes 18 and up; lower ones use the TorchScript exporter)."),
        set_option(C),
    ])


@main.command()
@_export_options
@click.pass_context
def export(ctx: click.Context, sets: tuple[str, ...], **params) -> None:
    """Export student:RUN_DIR to ONNX (dynamic batch), checked against PyTorch with ONNX Runtime at batch 1 and 3."""
    from featcache.distill.config import ExportConfig
    from featcache.distill.export import export_onnx

    positional = params.pop("positional_model")
    if positional is not None:  # `featcache export MODEL` still works, with one line saying how it is spelled now
        if params.get("model") not in (None, positional):
            raise click.UsageError(f"MODEL {positional} and --model {params['model']} differ: give --model alone")
        click.echo(f"warning: `featcache export MODEL` is deprecated: use `featcache export --model {positional}` "
                   "(as eval and profile spell it)", err=True)
    cfg = resolve(ctx, ExportConfig, params, sets, arguments={"model": positional} if positional is not None else None)
    res = export_onnx(cfg.run, cfg.onnx, opset=cfg.opset, atol=cfg.atol)
    click.echo(f"{res['path']}: checked with ONNX Runtime against PyTorch: " + json.dumps({k: v for k, v in res.items() if k != 'path'}))


# ---------------------------------------------------------------------------------------------- run, demo
@main.command("run")
@click.argument("pipeline_file", metavar="PIPELINE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a key of a section, e.g. --set distill.epochs=10 (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (overrides pipeline.out).")
def run_(pipeline_file: Path, sets: tuple[str, ...], out: Path | None) -> None:
    """Run a pipeline: synth, pretrain-standins, extract, train-gate, distill, eval, profile, report; unchanged stages are skipped.

    PIPELINE is a YAML file, or the name of a bundled one: demo, market1501, veri776, ablation-veri776, cross-domain,
    market1501-paper, veri776-paper.

    The bundled pipelines train with featcache's default recipe (the routed gate, distillation in the retrieval
    space), which departs from the paper's equations; the -paper ones, or --set train-gate.gate_recipe=paper --set
    distill.kd_space=literal, run Eq. 7-9 and 10-12 as written (docs/pipelines.md)."""
    from featcache.pipeline.config import load_pipeline, resolve_pipeline
    from featcache.pipeline.cross import is_cross, load_cross, run_cross
    from featcache.pipeline.runner import execute
    from featcache.pipeline.stages import build_stages

    pipeline_file = resolve_pipeline(pipeline_file)

    if is_cross(pipeline_file):  # two pipelines, then each one's models on the other's data (Table 6)
        if sets:
            raise ConfigError(f"--set: {pipeline_file} is a cross-domain file; set keys in the two pipelines it names")
        results = run_cross(load_cross(pipeline_file, out))
        ran = sum(len(r.ran) for r in results)
        click.echo(f"{results[-1].out}: {ran} stage(s) ran, {sum(len(r.stages) for r in results) - ran} skipped; "
                   f"report: {results[-1].out / 'report' / 'index.html'}")
        return
    pipeline = load_pipeline(pipeline_file, sets, out)
    stages, _ = build_stages(pipeline)
    res = execute(pipeline, stages)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 runs every stage and reports
        click.echo(f"{res.out}: {len(res.ran)} stage(s) ran, {len(res.stages) - len(res.ran)} skipped; "
                   f"report: {res.out / 'report' / 'index.html'}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder  [default: outputs/demo].")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a key of the demo pipeline (featcache/pipelines/demo.yaml).")
@click.pass_context
def demo(ctx: click.Context, out: Path | None, sets: tuple[str, ...]) -> None:
    """The whole method in miniature: a synthetic dataset, two stand-in experts pre-trained here, every stage, and a report (the bundled pipeline `demo`)."""
    from featcache.errors import InputError

    from featcache.pipeline.config import bundled_pipelines

    path = bundled_pipelines().get("demo")
    if path is None:
        raise InputError("the bundled demo pipeline is missing from this installation of featcache (reinstall it)")
    ctx.invoke(run_, pipeline_file=path, sets=sets, out=out)


# ---------------------------------------------------------------------------------------------- info, backbones
@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option("--splits", is_flag=True, help="Only the paper's Table 1: cached images, identities and cameras per split.")
def info(cache: Path, as_json: bool, splits: bool) -> None:
    """Describe a cache: images per split, failures, stored arrays and sizes per backbone."""
    from featcache.cache import summary
    from featcache.cache.reader import split_stats

    if splits:
        st = split_stats(cache)
        if as_json:
            click.echo(json.dumps(st, indent=2))
            return
        click.echo(f"{'split':8s} {'images':>8s} {'identities':>10s} {'cameras':>8s}")
        for name, v in st.items():
            click.echo(f"{name:8s} {v['images']:8d} {v['identities']:10d} {v['cameras']:8d}")
        return
    s = summary(cache)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    ident = s["identity"]
    pre = ident["preprocessing"]
    click.echo(f"{cache}  (format version {s['format_version']}, featcache {s['featcache_version']}, {s['file_bytes'] / 2**20:.1f} MiB)")
    click.echo(f"dataset {ident['dataset']} at {ident['dataset_root']}")
    click.echo(f"input {pre['image_size'][0]}x{pre['image_size'][1]} ({pre.get('resize', '?')}); views {pre.get('views')}; "
               f"tokens {s['tokens']}" + ("; synthetic features" if pre.get("synthetic") else ""))
    click.echo("cached: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()) + f"; pending {s['pending']}; failed {len(s['failed'])}")
    if "shards" in s:
        states = [sh["state"] for sh in s["shards"]]
        click.echo(f"shards: {len(states)} ({', '.join(f'{states.count(k)} {k}' for k in ('published', 'partial', 'missing') if k in states)}) "
                   f"under {Path(s['shards'][0]['path']).parent}")
    for name, b in s["backbones"].items():
        click.echo(f"\nbackbone {name}  weights {ident['backbones'][name]['weights']}  ({b['bytes'] / 2**20:.1f} MiB)")
        for k, a in b["arrays"].items():
            click.echo(f"  {k:10s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} per {a['rows']:5s}  {a['doc']}")
    if s["failed"]:
        click.echo("\nfailed:")
        for rec in s["failed"]:
            click.echo(f"  {rec['path']}: {rec['reason']}")


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
def verify(cache: Path) -> None:
    """Check every stored row of a cache against its checksum; name the damaged images (exit 1 if any)."""
    from featcache.cache.checksum import verify_cache
    from featcache.errors import InputError

    rep = verify_cache(cache)
    for i in sorted(rep.bad):
        click.echo(f"damaged: {rep.paths[i]}: {', '.join(rep.bad[i])}")
    click.echo(f"{cache}: {rep.checked_images} cached images, {rep.checked_bytes / 2**20:.1f} MiB checked "
               f"in {rep.seconds:.2f} s ({rep.mb_per_s:.0f} MiB/s)")
    if rep.bad:
        raise InputError(f"{cache}: {len(rep.bad)} damaged image(s); `featcache extract ... --out {cache} --repair` "
                         "(with the options that made the cache) extracts exactly them again")


@main.command()
def backbones() -> None:
    """List the backbone presets: built-in ones, and your own from $FEATCACHE_PRESETS folders (docs/extract.md)."""
    from featcache.backbones.presets import PRESET_DIR, get_preset, preset_files

    for name, path in preset_files().items():
        p = get_preset(name)
        src = "random init" if p.random_init else "stand-in: featcache pretrain-standins" if p.standin else \
            f"{p.model}" + (f" ({p.pretrained})" if p.pretrained else "")
        own = "" if path.parent == PRESET_DIR else f"  [{path}]"
        click.echo(f"{name:14s} {p.family:9s} {src:34s} {p.description}{own}")
