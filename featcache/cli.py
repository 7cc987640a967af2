"""The ``featcache`` command line: one click group, each command parses options and calls one function."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from featcache import __version__

logger = logging.getLogger(__name__)


def _setup_logging(verbose: int) -> None:
    """Warnings from everyone; featcache's own progress at INFO (-v), everything at DEBUG (-vv)."""
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("featcache").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featcache")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="YAML of defaults per command (the command line overrides).")
@click.option("-v", "--verbose", count=True, help="-v for progress logs, -vv for debug.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: int) -> None:
    """featcache: run foundation backbones once, cache their features, train and evaluate re-ID from the cache."""
    _setup_logging(verbose)
    if config is not None:
        from featcache.config import load_default_map

        ctx.default_map = load_default_map(config, main)


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layout", type=click.Choice(["market1501", "veri776"]), default="market1501", show_default=True)
@click.option("--ids", type=int, default=50, show_default=True, help="Number of identities (half train, half test).")
@click.option("--cams", type=int, default=6, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: Path, layout: str, ids: int, cams: int, seed: int) -> None:
    """Write a synthetic dataset of real JPEGs in an official layout."""
    from featcache.synth import SynthConfig, generate

    try:
        cfg = SynthConfig(out, layout, ids, cams, seed)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    counts = generate(cfg)
    click.echo(f"wrote {sum(counts.values())} images to {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _parse_weights(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r}: expected PRESET=PATH", param_hint="--weights")
        out[name] = path
    return out


def _parse_workers(value: str | int) -> int | None:
    if str(value) == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a number or auto", param_hint="--workers") from None


@main.command()
@click.option("--dataset", required=True, type=click.Choice(["market1501", "veri776", "dukemtmc", "msmt17", "csv"]))
@click.option("--root", required=True, type=click.Path(path_type=Path), help="Dataset folder in its official layout (csv: the manifest or its folder).")
@click.option("--backbone", "backbones", multiple=True, required=True, help="Backbone preset; repeat for several (see `featcache backbones`).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The HDF5 cache to write or resume.")
@click.option("--views", type=int, default=4, show_default=True, help="Views per training image: 0 clean, 1 flip, 2+ seeded augmentations (query/gallery: at most 2).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per batch (keep it fixed across a resume for bit-equal results).")
@click.option("--workers", default="auto", show_default=True, help="Decoding processes: a number (0 decodes in the main process) or auto (0 on CPU, up to 8 on CUDA).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--weights", "weights", multiple=True, metavar="PRESET=PATH", help="Local weights for a preset (open_clip checkpoint file or dir; ALIGN save_pretrained dir).")
@click.option("--random-init", is_flag=True, help="Allow random weights for full-size presets (benchmarks only; never results).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache instead of resuming it.")
@click.option("--tokens", type=click.Choice(["view0", "all", "none"]), default="view0", show_default=True, help="Which views keep token features.")
@click.option("--image-size", default="256", show_default=True, help="Input size N or HxW (256x128 is usual for persons).")
@click.option("--aug-seed", type=int, default=0, show_default=True, help="Seed of the stored training augmentations.")
@click.option("--skip-bad-names", is_flag=True, help="Record files that break the naming rule as failed instead of stopping.")
@click.pass_context
def extract(ctx: click.Context, **params) -> None:
    """Run the frozen backbones once over every image and cache their outputs in HDF5."""
    from featcache.config import save_resolved
    from featcache.extract.runner import ExtractConfig, run_extract
    from featcache.preprocess import parse_size

    try:
        cfg = ExtractConfig(
            dataset=params["dataset"], root=params["root"], backbones=tuple(params["backbones"]), out=params["out"],
            views=params["views"], batch_size=params["batch_size"], workers=_parse_workers(params["workers"]), device=params["device"],
            weights=_parse_weights(params["weights"]), overwrite=params["overwrite"], tokens=params["tokens"],
            image_size=parse_size(params["image_size"]), aug_seed=params["aug_seed"], random_init=params["random_init"],
            skip_bad_names=params["skip_bad_names"],
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    res = _run(run_extract, cfg)
    save_resolved(cfg.out.with_name(cfg.out.name + ".config.yaml"), "extract", params)
    s = res.summary
    click.echo(
        f"{cfg.out}: cached train {s['splits']['train']}, query {s['splits']['query']}, gallery {s['splits']['gallery']}; "
        f"failed {len(s['failed'])}; {res.processed} images this run at {res.images_per_second:.1f} img/s"
    )


def _run(fn, *args):
    """Turn expected input errors into a clean message and exit code 2 (no traceback)."""
    from featcache.backbones import PresetError, WeightsNotFoundError
    from featcache.cache import CacheError
    from featcache.datasets import DatasetLayoutError
    from featcache.evaluation.features import EvalInputError
    from featcache.gate.train import TrainError

    try:
        return fn(*args)
    except (DatasetLayoutError, CacheError, PresetError, WeightsNotFoundError, EvalInputError, TrainError) as exc:
        raise click.ClickException(str(exc)) from None


def _parse_ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated ranks, e.g. 1,5,10,20", param_hint="--ranks") from None
    return ranks


@main.command("eval")
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="Cache to evaluate on; with --gallery-cache, the source (training) domain's cache.")
@click.option("--model", required=True, help="KIND:REF, e.g. backbone:clip-vit-b16 or concat:clip-vit-b16,align-b7.")
@click.option("--gallery-cache", type=click.Path(path_type=Path), help="Cross-domain: take query and gallery from this (target-domain) cache.")
@click.option("--protocol", type=click.Choice(["market1501", "veri776", "auto"]), default="auto", show_default=True)
@click.option("--ap", type=click.Choice(["plain", "trapezoid"]), default="plain", show_default=True, help="plain: torchreid/fast-reid; trapezoid: the official MATLAB kits.")
@click.option("--ranks", default="1,5,10,20", show_default=True, help="CMC ranks to report.")
@click.option("--rerank", is_flag=True, help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3).")
@click.option("--k1", type=int, default=20, show_default=True)
@click.option("--k2", type=int, default=6, show_default=True)
@click.option("--lambda", "lambda_", type=float, default=0.3, show_default=True)
@click.option("--flip", is_flag=True, help="Average the clean and flipped views' features.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), help="Write a CMC curve and ranked-list grids here.")
@click.option("--save-features", type=click.Path(dir_okay=False, path_type=Path), help="Write the evaluated features and labels (.npz).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--budget-mb", type=int, default=256, show_default=True, help="Memory for one block of scores.")
@click.option("--plot-queries", type=int, default=8, show_default=True, help="Queries per ranked-list grid.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sample of plotted queries.")
def eval_(**params) -> None:
    """Evaluate a model on a cache: exact search, mAP / CMC / mINP under the dataset's protocol."""
    from featcache.evaluation.runner import EvalConfig, format_table, run_eval

    try:
        cfg = EvalConfig(**{**params, "ranks": _parse_ranks(params["ranks"])})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ev = _run(run_eval, cfg)
    click.echo(format_table(ev.report))


@main.command("train-gate")
@click.option("--cache", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The feature cache (its training split).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory.")
@click.option("--experts", default="", help="Comma-separated presets in the cache (default: all of them).")
@click.option("--fusion", type=click.Choice(["clip", "align", "concat", "average", "moe-top1", "moe-soft", "moe-top2"]), default="moe-top1", show_default=True)
@click.option("--epochs", type=int, default=60, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True, help="The paper uses 42, 1337 and 2024.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def train_gate(cache: Path, out: Path, experts: str, fusion: str, epochs: int, seed: int, device: str, label_smoothing: float, resume: bool) -> None:
    """Train the expert adapters and the mixture-of-experts gate from the cache alone."""
    from featcache.gate.runner import run_train_gate
    from featcache.gate.train import GateConfig

    cfg = _run(lambda: GateConfig(
        cache=str(cache), out=str(out), experts=tuple(e.strip() for e in experts.split(",") if e.strip()),
        fusion=fusion, epochs=epochs, seed=seed, device=device, label_smoothing=label_smoothing,
    ))
    res = _run(run_train_gate, cfg, resume)
    click.echo(f"{res.run}: gate mean weights {res.stats['mean_weight']}; routed {res.stats['routed_share']}; teacher targets {res.targets}")


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def info(cache: Path, as_json: bool) -> None:
    """Describe a cache: images per split, failures, stored arrays and sizes per backbone."""
    from featcache.cache import summary

    s = _run(summary, cache)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    ident = s["identity"]
    pre = ident["preprocessing"]
    click.echo(f"{cache}  (featcache {s['featcache_version']}, {s['file_bytes'] / 2**20:.1f} MiB)")
    click.echo(f"dataset {ident['dataset']} at {ident['dataset_root']}")
    click.echo(f"input {pre['image_size'][0]}x{pre['image_size'][1]} ({pre['resize']}); views {pre['views']}; tokens {pre['tokens']}")
    click.echo("cached: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()) + f"; pending {s['pending']}; failed {len(s['failed'])}")
    for name, b in s["backbones"].items():
        click.echo(f"\nbackbone {name}  weights {ident['backbones'][name]['weights']}  ({b['bytes'] / 2**20:.1f} MiB)")
        for k, a in b["arrays"].items():
            click.echo(f"  {k:10s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} per {a['rows']:5s}  {a['doc']}")
    if s["failed"]:
        click.echo("\nfailed:")
        for rec in s["failed"]:
            click.echo(f"  {rec['path']}: {rec['reason']}")


@main.command()
def backbones() -> None:
    """List the backbone presets."""
    from featcache.backbones import available_presets, get_preset

    for name in available_presets():
        p = get_preset(name)
        src = f"{p.model}" + (f" ({p.pretrained})" if p.pretrained else "") if not p.random_init else "random init"
        click.echo(f"{name:14s} {p.family:9s} {src:34s} {p.description}")
