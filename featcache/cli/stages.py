"""The commands that run a stage: synth, pretrain-standins, extract, eval, train-gate and distill. Each turns its
options into its stage's config and calls the stage's one function."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import click

from featcache.cli.group import main
from featcache.cli.options import DEVICE, LazyChoice, opt, resolve, set_option, stack
from featcache.errors import FeatcacheError


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
        opt(C, "force", is_flag=True, help="Train again even where weights with the same key exist, or are shipped with featcache."),
        set_option(C),
    ])


@main.command("pretrain-standins")
@_standin_options
@click.pass_context
def pretrain_standins(ctx: click.Context, sets: tuple[str, ...], **params) -> None:
    """Pre-train the demo's stand-in experts (clip-mini, align-mini) on a synthetic set of their own, once per machine.

    The default recipe's are shipped with featcache and used as they are. On a CPU each stand-in trains in a
    process of its own with one thread and AVX2 kernels (several side by side on several cores), so that a recipe
    trains the same weights whatever the core count. Prints the --weights option that extraction takes for each.
    """
    from featcache.standins.config import StandinConfig
    from featcache.standins.runner import run_pretrain_standins, shipped_of

    if not params.get("presets"):
        params.pop("presets", None)
    cfg = resolve(ctx, StandinConfig, params, sets)
    paths = run_pretrain_standins(cfg)
    shipped = shipped_of(paths)
    if shipped:
        click.echo(f"{', '.join(shipped)}: shipped with featcache for this recipe, nothing trained (--force trains anew)")
    for name, path in paths.items():
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
    click.echo(res.describe(os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None, cfg.out))


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
    from featcache.gate.config import GateConfig as C
    from featcache.gate.routing import RECIPES
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
        opt(C, "tensorboard", "--tensorboard/--no-tensorboard", help="TensorBoard curves in RUN/tb as training goes  [default: on when tensorboard is installed]"),
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
    click.echo(run_train_gate(cfg, resume).describe(cfg.fusion))


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
        opt(C, "tensorboard", "--tensorboard/--no-tensorboard", help="TensorBoard curves in RUN/tb as training goes  [default: on when tensorboard is installed]"),
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
    for line in run_distill(cfg, resume).describe(cfg.student):
        click.echo(line)
