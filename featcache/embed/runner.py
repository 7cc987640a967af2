"""``featcache embed``: a trained model (or a backbone preset) run over a folder of images or a dataset, as an
extraction whose one backbone is that model.

The output is a feature cache in featcache's own format (docs/cache-format.md): the model's L2-normalised
feature of each image's view 0 is the ``pooled`` output of its one backbone, named ``student`` or ``teacher``
(``featcache eval --model backbone:student`` reads it), or the preset's own name. Extraction's reader, mapper,
writer, lock and resume do the work, so a killed run resumes, memory stays bounded, and an unreadable image is
recorded as failed and skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from featcache.backbones.base import Backbone, sha256_file
from featcache.backbones.presets import Preset
from featcache.embed.config import EmbedConfig
from featcache.errors import ConfigError, InputError
from featcache.registry import nearest
from featcache.evaluation.embedder import Embedder
from featcache.extract.config import ExtractConfig
from featcache.extract.result import ExtractResult
from featcache.extract.runner import run_extract
from featcache.training.rundir import RunDir

logger = logging.getLogger(__name__)

#: the name a trained model's features are stored under, by the command that made the run
STORED_AS = {"distill": "student", "train-gate": "teacher"}


class ModelBackbone(Backbone):
    """A trained model as extraction's backbone: uint8 pixels in (no normalisation of its own: the model has
    it), its L2-normalised feature out as ``pooled``, computed as ``featcache eval`` computes it (no autocast
    around the model: a teacher's backbones take their own, as its extraction did)."""

    family = "featcache-model"

    def __init__(self, name: str, model: Embedder, weights_id: str) -> None:
        preset = Preset(name=name, family=self.family, description=f"a trained {name} (featcache embed)",
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), attn_depths=())
        super().__init__(preset, model.image_size)
        self.model, self.weights_id = model, weights_id

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8  # the model normalises its input itself

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dtype != torch.uint8:  # output_specs' blank image
            x = x.round().clamp(0, 255).to(torch.uint8)
        with torch.autocast(x.device.type, enabled=False):
            return {"pooled": self.model(x)}

    def _doc(self, name: str) -> str:
        return f"the {self.preset.name}'s L2-normalised feature (what featcache eval ranks)"


def model_of(spec: str, device: str) -> tuple[str, ModelBackbone | None]:
    """The backbone name and, for a trained run, its ``ModelBackbone``: ``student:RUN``, ``gate:RUN`` or a run
    folder; ``backbone:PRESET`` or a preset name (then None: extraction builds the preset)."""
    from featcache.evaluation.features import RUN_MODELS

    kind, sep, ref = spec.partition(":")
    if not sep:
        kind, ref = ("run" if Path(spec).is_dir() else "backbone"), spec
    if kind == "backbone":
        from featcache.backbones.presets import preset_files

        known = list(preset_files())
        if ref not in known:  # a misspelt preset is a bad value; a bare name may also be a run folder that is missing
            raise (InputError if not sep else ConfigError)(
                f"--model {spec}: no backbone preset {ref!r}{nearest(ref, known)} (`featcache backbones` lists them)"
                + ("" if sep else ", and no run folder of that name"))
        return ref, None
    if kind not in ("student", "gate", "run"):
        raise ConfigError(f"--model {spec}: expected student:RUN, gate:RUN, backbone:PRESET, a run folder or a preset name")
    run = Path(ref)
    command = RunDir.command_of(run)
    if command not in STORED_AS or (kind != "run" and STORED_AS[command] != {"student": "student", "gate": "teacher"}[kind]):
        right = {"distill": "student", "train-gate": "gate"}.get(command)
        raise InputError(f"--model {spec}: {run} is a {command} run" + (f": give --model {right}:{run}" if right else ""))
    RUN_MODELS.names()  # loads the stages that register their runs
    model = RUN_MODELS.get(command)(run, device)
    return STORED_AS[command], ModelBackbone(STORED_AS[command], model, f"featcache-{command}-run:sha256:{sha256_file(RunDir(run).weights_file)}")


def run_embed(cfg: EmbedConfig) -> ExtractResult:
    """Write the features of ``cfg``'s images to ``cfg.out`` (resuming a run a kill left behind)."""
    from featcache.runtime import resolve_device

    if cfg.images is not None and not Path(cfg.images).is_dir():
        raise InputError(f"--images {cfg.images}: no such folder (expected a folder of images)")
    name, backbone = model_of(cfg.model, str(resolve_device(cfg.device)))
    size = backbone.image_size if backbone is not None else cfg.image_size
    if backbone is not None and cfg.image_size not in (None, backbone.image_size):
        raise InputError(f"--image-size {cfg.image_size[0]}x{cfg.image_size[1]}: {cfg.model} takes "
                         f"{size[0]}x{size[1]} images (the size it was trained at)")
    extract = ExtractConfig.from_dict({
        "dataset": cfg.dataset or "folder", "root": cfg.root or cfg.images, "backbones": [name], "out": cfg.out,
        "views": 1, "batch_size": cfg.batch_size, "device": cfg.device, "tokens": "none", "overwrite": cfg.overwrite,
        **({"image_size": list(size)} if size is not None else {}), **({"workers": cfg.workers} if cfg.workers is not None else {}),
    })
    return run_extract(extract, prebuilt={name: backbone} if backbone is not None else None)
