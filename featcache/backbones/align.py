"""ALIGN's EfficientNet vision tower (transformers): pooled feature, final feature map as tokens,
and stage-output attention maps."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from featcache.backbones.base import Backbone, WeightsNotFoundError, attention_map, register_family, sha256_file
from featcache.backbones.hub import SUPPLY
from featcache.backbones.presets import Preset, PresetError

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def quiet_transformers() -> None:
    """transformers' own progress bars (loading and writing weights) draw with carriage returns even into a log
    file; featcache reports its own progress, so they are switched off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load_local(path: Path):
    """A ``save_pretrained`` directory of an AlignModel (vision tower taken) or an AlignVisionModel."""
    from transformers import AlignModel, AlignVisionModel

    quiet_transformers()

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WeightsNotFoundError(f"no transformers checkpoint at {path}: expected a directory with config.json and {' or '.join(_WEIGHT_FILES)}")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type == "align":
        model = AlignModel.from_pretrained(path).vision_model
    elif model_type == "align_vision_model":
        model = AlignVisionModel.from_pretrained(path)
    else:
        raise WeightsNotFoundError(f"{cfg_file}: model_type {model_type!r} is not an ALIGN model ('align' or 'align_vision_model')")
    model = model.float()  # float32 whatever the file stores (a checkpoint saved in half precision)
    weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
    ident = f"dir:{path.name}:sha256:{sha256_file(weights)}" if weights else f"dir:{path}"
    return model, ident


def _load_hub(preset: Preset):
    """The model from the local Hugging Face cache or the hub (``check_published_weights`` ran first)."""
    from huggingface_hub import constants
    from transformers import AlignModel

    try:
        model = AlignModel.from_pretrained(preset.model).vision_model  # local cache first (check_published_weights ran)
    except OSError as exc:
        raise WeightsNotFoundError(
            f"{preset.name}: weights for {preset.model!r} were not found. Looked in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and tried to download them ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            f"Supply them with --weights {preset.name}={SUPPLY['align']}, or point HF_HOME at a cache that holds them."
        ) from None
    return model, f"hf:{preset.model}@{getattr(model.config, '_commit_hash', None) or 'unknown-revision'}"


def _efficientnet_init(model: torch.nn.Module, image_size: tuple[int, int]) -> None:
    """EfficientNet's own initialisation (He, fan-out) and calibrated BN statistics, for random-init presets.

    With transformers' default init (conv std 0.02) and BN's default running
    statistics (mean 0, variance 1), activations vanish through the blocks
    (pooled features around 1e-29), and a random preset would feed later stages
    zeros. After He init, one pass of a fixed seeded noise batch in training
    mode sets each BN's running statistics to the activations' real scale; the
    model then runs in eval mode as usual, so extraction stays per-image.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the statistics of exactly this batch
    noise = torch.rand(16, 3, *image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.train()
    with torch.no_grad():
        model(pixel_values=noise)
    model.eval()
    for m, mom in zip(bns, momenta):
        m.momentum = mom


class AlignBackbone(Backbone):
    family = "align"

    def __init__(self, preset: Preset, image_size: tuple[int, int], weights: str | None, random_init: bool) -> None:
        super().__init__(preset, image_size)
        from transformers import AlignVisionConfig, AlignVisionModel

        torch.manual_seed(0)
        if weights is not None:
            model, self.weights_id = _load_local(Path(weights).expanduser())
        elif preset.random_init or random_init:
            cfg = AlignVisionConfig(**preset.model_cfg)
            model = AlignVisionModel(cfg)
            _efficientnet_init(model, image_size)
            self.weights_id = "random-init:seed=0"
        else:
            model, self.weights_id = _load_hub(preset)
        self.model = model.eval().requires_grad_(False)
        cfg = self.model.config
        repeats = [math.ceil(cfg.depth_coefficient * r) for r in cfg.num_block_repeats]
        ends = [sum(repeats[: s + 1]) - 1 for s in range(len(repeats))]
        bad = [d for d in preset.attn_depths if not 1 <= d <= len(ends)]
        if bad:
            raise PresetError(f"{preset.name}: attn_depths {bad} outside stages 1..{len(ends)}")
        self._taps = {ends[d - 1]: d for d in preset.attn_depths}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        h = self.model.embeddings(x)
        for i, blk in enumerate(self.model.encoder.blocks):
            h = blk(h)
            if i in self._taps:
                out[f"attn_{self._taps[i]:02d}"] = attention_map(h)
        pooled = self.model.pooler(h).reshape(h.shape[:2])
        out["pooled"] = pooled
        out["tokens"] = h.flatten(2).transpose(1, 2)
        return dict(sorted(out.items()))

    def _doc(self, name: str) -> str:
        return {
            "pooled": "mean-pooled final EfficientNet feature map (the ALIGN image embedding)",
            "tokens": "final feature map as (H*W, C), row-major",
        }.get(name, f"sum_c |F^c| of the output of EfficientNet stage {name[5:]} (Eq. 11)")


@register_family("align")
def build_align(preset: Preset, image_size: tuple[int, int], weights: str | None, random_init: bool) -> Backbone:
    return AlignBackbone(preset, image_size, weights, random_init)
