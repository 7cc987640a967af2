"""open_clip ViT backbones: class token (pre- and post-projection), patch tokens, block attention maps
and the last block's class-token attention over patches."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from featcache.backbones.base import Backbone, WeightsNotFoundError, attention_map, register_family, sha256_file
from featcache.backbones.presets import Preset

logger = logging.getLogger(__name__)

_CKPT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


def _checkpoint_in(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in _CKPT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted([*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        if found:
            return found[0]
    raise WeightsNotFoundError(f"no open_clip checkpoint at {path} (looked for a file, or {', '.join(_CKPT_NAMES)} / *.safetensors / *.bin / *.pt in a directory)")


class ClipBackbone(Backbone):
    family = "open_clip"

    def __init__(self, preset: Preset, image_size: tuple[int, int], weights: str | None, random_init: bool) -> None:
        super().__init__(preset, image_size)
        import open_clip
        from open_clip.model import CLIP

        torch.manual_seed(0)  # random-init presets are reproducible: same seed, same weights
        base = preset.model_cfg or open_clip.get_model_config(preset.model)
        if not base:
            raise ValueError(f"{preset.name}: open_clip knows no model {preset.model!r}")
        cfg = {**base, "vision_cfg": {**base["vision_cfg"], "image_size": list(image_size)}}
        cfg.pop("quick_gelu", None)
        model = CLIP(**cfg, quick_gelu=preset.quick_gelu)
        if weights is not None:
            ckpt = _checkpoint_in(Path(weights).expanduser())
            open_clip.load_checkpoint(model, str(ckpt))  # interpolates position embeddings to the patch grid
            self.weights_id = f"file:{ckpt.name}:sha256:{sha256_file(ckpt)}"
        elif preset.random_init or random_init:
            self.weights_id = "random-init:seed=0"
        else:
            ckpt = self._download(preset)
            open_clip.load_checkpoint(model, str(ckpt))
            self.weights_id = f"open_clip:{preset.model}:{preset.pretrained}"
        self.visual = model.visual.eval().requires_grad_(False)
        if not self.visual.transformer.batch_first:
            raise ValueError(f"{preset.name}: open_clip transformer with batch_first=False is not supported")
        n_blocks = len(self.visual.transformer.resblocks)
        bad = [d for d in preset.attn_depths if not 1 <= d <= n_blocks]
        if bad:
            raise ValueError(f"{preset.name}: attn_depths {bad} outside 1..{n_blocks}")
        self.grid = (image_size[0] // self.visual.patch_size[0], image_size[1] // self.visual.patch_size[1])

    @staticmethod
    def _download(preset: Preset) -> Path:
        """Find the tag's checkpoint in the Hugging Face cache (downloading if the network allows)."""
        from huggingface_hub import constants
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        cfg = get_pretrained_cfg(preset.model, preset.pretrained)
        if not cfg:
            raise WeightsNotFoundError(f"{preset.name}: open_clip has no pretrained tag {preset.pretrained!r} for {preset.model}")
        try:
            return Path(download_pretrained(cfg))
        except Exception as exc:  # network errors, missing cache entries: all mean 'not found here'
            raise WeightsNotFoundError(
                f"{preset.name}: weights for open_clip {preset.model} pretrained={preset.pretrained!r} were not found. "
                f"Looked in the Hugging Face cache {constants.HF_HUB_CACHE} for {cfg.get('hf_hub') or cfg.get('url')} "
                f"and tried to download it ({type(exc).__name__}: {exc}). Supply them with "
                f"--weights {preset.name}=PATH (an open_clip checkpoint file, .safetensors/.bin/.pt, or a directory holding one), "
                "or point HF_HOME at a cache that holds them."
            ) from None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.visual
        h = v._embeds(x)
        blocks = v.transformer.resblocks
        out: dict[str, torch.Tensor] = {}
        n, gh, gw = x.shape[0], *self.grid
        for i, blk in enumerate(blocks, 1):
            if i == len(blocks):
                out["cls_attn"] = self._cls_attention(blk, h).view(n, gh, gw)
            h = blk(h)
            if i in self.preset.attn_depths:
                patches = h[:, 1:].transpose(1, 2).reshape(n, -1, gh, gw)
                out[f"attn_{i:02d}"] = attention_map(patches)
        pooled, tokens = v._pool(h)
        out["pooled"] = pooled
        out["embed"] = pooled @ v.proj if v.proj is not None else pooled
        out["tokens"] = tokens
        return dict(sorted(out.items()))

    @staticmethod
    def _cls_attention(blk, h: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the class token over the patch tokens in ``blk``, averaged over heads."""
        attn = blk.attn
        y = blk.ln_1(h)
        d = y.shape[-1]
        q, k = F.linear(y, attn.in_proj_weight[: 2 * d], attn.in_proj_bias[: 2 * d] if attn.in_proj_bias is not None else None).split(d, -1)
        nh = attn.num_heads
        q = q[:, :1].reshape(y.shape[0], 1, nh, d // nh).transpose(1, 2)
        k = k.reshape(y.shape[0], -1, nh, d // nh).transpose(1, 2)
        w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d // nh), dim=-1)  # (N, heads, 1, 1+T)
        return w.mean(1)[:, 0, 1:]

    def _doc(self, name: str) -> str:
        return {
            "pooled": "class token after ln_post, before projection",
            "embed": "projected CLIP image embedding",
            "tokens": "patch tokens after ln_post, row-major over the patch grid",
            "cls_attn": "last block's class-token attention over patches, mean over heads",
        }.get(name, f"sum_c |F^c| of block {name[5:]} patch tokens (Eq. 11)")


@register_family("open_clip")
def build_clip(preset: Preset, image_size: tuple[int, int], weights: str | None, random_init: bool) -> Backbone:
    return ClipBackbone(preset, image_size, weights, random_init)
