"""open_clip ViT backbones: class token (pre- and post-projection), patch tokens, block attention maps
and the last block's class-token attention over patches.

Block outputs come from open_clip's public ``forward_intermediates``; the
pooled class token and the patch tokens are ``ln_post`` of the last block's
output (the class-token pooling of the CLIP ViTs; other poolings are refused).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from featcache.backbones.base import Backbone, WeightsNotFoundError, attention_map, register_family, sha256_file
from featcache.backbones.hub import SUPPLY
from featcache.backbones.presets import Preset, PresetError
from featcache.errors import InputError

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
            raise PresetError(f"{preset.name}: open_clip knows no model {preset.model!r}")
        cfg = {**base, "vision_cfg": {**base["vision_cfg"], "image_size": list(image_size)}}
        cfg.pop("quick_gelu", None)
        model = CLIP(**cfg, quick_gelu=preset.quick_gelu)
        if weights is not None:
            ckpt = _checkpoint_in(Path(weights).expanduser())
            _load(model, ckpt, preset)  # interpolates position embeddings to the patch grid
            self.weights_id = f"file:{ckpt.name}:sha256:{sha256_file(ckpt)}"
        elif preset.random_init or random_init:
            self.weights_id = "random-init:seed=0"
        else:
            ckpt = self._download(preset)
            _load(model, ckpt, preset)
            self.weights_id = f"open_clip:{preset.model}:{preset.pretrained}"
        self.visual = model.visual.eval().requires_grad_(False)
        object.__setattr__(self, "clip_model", model)  # the whole CLIP (not a submodule): what a checkpoint holds
        v = self.visual
        if getattr(v, "attn_pool", None) is not None or getattr(v, "final_ln_after_pool", False) or getattr(v, "pool_type", "tok") != "tok":
            raise PresetError(f"{preset.name}: only class-token pooling (pool_type 'tok', no attentional pooling) is supported")
        n_blocks = len(v.transformer.resblocks)
        if n_blocks < 2:
            raise PresetError(f"{preset.name}: a ViT of at least two blocks is needed (the last block's attention is read)")
        bad = [d for d in preset.attn_depths if not 1 <= d <= n_blocks]
        if bad:
            raise PresetError(f"{preset.name}: attn_depths {bad} outside 1..{n_blocks}")
        # forward_intermediates indices (0-based block outputs): the attention depths, the last block's input and output
        self._take = sorted({d - 1 for d in preset.attn_depths} | {n_blocks - 2, n_blocks - 1})
        self.grid = (image_size[0] // self.visual.patch_size[0], image_size[1] // self.visual.patch_size[1])

    @staticmethod
    def _download(preset: Preset) -> Path:
        """The tag's checkpoint from the local Hugging Face cache or the hub (``check_published_weights`` ran first)."""
        from huggingface_hub import constants
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        cfg = get_pretrained_cfg(preset.model, preset.pretrained)
        if not cfg:
            raise PresetError(f"{preset.name}: open_clip has no pretrained tag {preset.pretrained!r} for {preset.model}")
        where = cfg.get("hf_hub") or cfg.get("url")
        how = f"Supply them with --weights {preset.name}={SUPPLY['open_clip']}, or point HF_HOME at a cache that holds them."
        try:
            return Path(download_pretrained(cfg))
        except Exception as exc:  # network errors, missing files: all mean 'not found here'
            raise WeightsNotFoundError(
                f"{preset.name}: weights for open_clip {preset.model} pretrained={preset.pretrained!r} were not found. "
                f"Looked in the Hugging Face cache {constants.HF_HUB_CACHE} for {where} and tried to download it "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). {how}"
            ) from None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.visual
        res = v.forward_intermediates(x, indices=self._take, output_fmt="NLC", output_extra_tokens=True)
        patches = dict(zip(self._take, res["image_intermediates"]))        # block index -> (N, T, C)
        prefix = dict(zip(self._take, res["image_intermediates_prefix"]))  # block index -> (N, 1, C)
        n, (gh, gw), last = x.shape[0], self.grid, len(v.transformer.resblocks) - 1
        out: dict[str, torch.Tensor] = {}
        for d in self.preset.attn_depths:
            out[f"attn_{d:02d}"] = attention_map(patches[d - 1].transpose(1, 2).reshape(n, -1, gh, gw))
        before_last = torch.cat([prefix[last - 1], patches[last - 1]], dim=1)
        out["cls_attn"] = self._cls_attention(v.transformer.resblocks[last], before_last).view(n, gh, gw)
        final = v.ln_post(torch.cat([prefix[last], patches[last]], dim=1))
        out["pooled"] = final[:, 0]
        out["embed"] = res["image_features"]
        out["tokens"] = final[:, 1:]
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


def _load(model, ckpt: Path, preset: Preset) -> None:
    """Load an open_clip checkpoint, turning a file that is not one into a clear error."""
    import open_clip

    try:
        open_clip.load_checkpoint(model, str(ckpt))
    except Exception as exc:  # unreadable file, wrong architecture: the file is not this model's checkpoint
        _refuse_another_grid(model, ckpt, preset)
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise InputError(f"{ckpt} is not an open_clip checkpoint of {preset.model or preset.name} ({type(exc).__name__}: {first})") from None


def _refuse_another_grid(model, ckpt: Path, preset: Preset) -> None:
    """A checkpoint whose position embeddings cover another patch grid than this image size's: open_clip resizes
    only square grids, so a model trained at 128x64 (8x4 patches) cannot run at 64x32. Say so, or return."""
    from open_clip.factory import load_state_dict

    try:
        theirs = load_state_dict(str(ckpt)).get("visual.positional_embedding")
    except Exception:
        return
    ours = model.visual.positional_embedding
    if theirs is not None and theirs.shape != ours.shape and theirs.shape[1:] == ours.shape[1:]:
        grid = model.visual.grid_size
        raise InputError(f"{ckpt}: {preset.name} was trained at another image size ({theirs.shape[0] - 1} patches, this "
                         f"size's grid has {grid[0]}x{grid[1]} = {ours.shape[0] - 1}) and open_clip resizes only square "
                         "grids: extract at the size it was trained at (a stand-in's standin.json records it)")


@register_family("open_clip")
def build_clip(preset: Preset, image_size: tuple[int, int], weights: str | None, random_init: bool) -> Backbone:
    return ClipBackbone(preset, image_size, weights, random_init)
