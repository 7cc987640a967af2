"""The commands around the stages: profile, export, run and demo (pipelines), info, verify and backbones."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import click

from featcache.cli.group import main
from featcache.cli.options import DEVICE, opt, resolve, set_option, stack
from featcache.errors import ConfigError


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


def _embed_options(f: Callable) -> Callable:
    from featcache.embed.config import EmbedConfig as C

    return stack(f, [
        opt(C, "model", help="student:RUN_DIR, gate:RUN_DIR (the teacher, with its backbones), backbone:PRESET, or a bare run folder or preset name (spelled as in eval and profile)."),
        opt(C, "images", type=click.Path(file_okay=False, path_type=Path), help="Any folder of images (searched recursively, sorted by path)."),
        opt(C, "dataset", help="Or a dataset in its official layout (with --root): its splits and labels, so that featcache eval reads the output."),
        opt(C, "root", type=click.Path(path_type=Path), help="The dataset's folder (with --dataset)."),
        opt(C, "out", type=click.Path(dir_okay=False, path_type=Path), help="The feature cache (HDF5) to write or resume."),
        opt(C, "batch_size", type=int, help="Images per batch."),
        opt(C, "workers", help="Decoding processes: a number or auto.  [default: auto]"),
        opt(C, "device", type=DEVICE, help="Where the model runs."),
        opt(C, "image_size", help="Input HxW for a backbone preset (a trained run uses the size it was trained at)  [default: 256x256]"),
        opt(C, "overwrite", is_flag=True, help="Replace an existing output instead of resuming it."),
        set_option(C),
    ])


@main.command()
@_embed_options
@click.pass_context
def embed(ctx: click.Context, sets: tuple[str, ...], **params) -> None:
    """Features of any image folder, or of a dataset, from a trained student or teacher or a backbone preset, as a feature cache."""
    from featcache.embed.config import EmbedConfig
    from featcache.embed.runner import run_embed

    cfg = resolve(ctx, EmbedConfig, params, sets)
    click.echo(run_embed(cfg).describe())


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
    from featcache.cache.describe import format_split_stats, format_summary, split_stats, summary

    data = split_stats(cache) if splits else summary(cache)
    click.echo(json.dumps(data, indent=2) if as_json else format_split_stats(data) if splits else format_summary(data))


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
def verify(cache: Path) -> None:
    """Check every stored row of a cache against its checksum; name the damaged images (exit 1 if any)."""
    from featcache.cache.checksum import verify_cache

    rep = verify_cache(cache)
    for line in rep.lines(cache):
        click.echo(line)
    rep.refuse_damage(cache)


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
