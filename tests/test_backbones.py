"""Presets as data, weights loading from local checkpoints, and errors when weights are missing."""

from __future__ import annotations

import json

import pytest
import torch

from featcache.backbones import PresetError, WeightsNotFoundError, available_presets, build_backbone, get_preset
from featcache.backbones.presets import Preset


def test_presets_listed_and_unknown_name_lists_them():
    assert {"clip-vit-b16", "align-b7", "clip-tiny", "align-tiny"} <= set(available_presets())
    with pytest.raises(PresetError, match="available: align-b7, align-mini, align-tiny, clip-mini, clip-tiny, clip-vit-b16"):
        get_preset("clip-huge")


def test_preset_rejects_unknown_keys():
    data = get_preset("clip-tiny").to_dict() | {"colour": "red"}
    with pytest.raises(PresetError, match="unknown preset keys \\['colour'\\]"):
        Preset.from_dict(json.loads(json.dumps(data)), "x.json")


@pytest.mark.parametrize("name, how", [("clip-vit-b16", "--weights clip-vit-b16=PATH"), ("align-b7", "--weights align-b7=DIR")])
def test_full_size_preset_without_weights_is_an_error(name, how):
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone(name, (64, 64))
    msg = str(err.value)
    assert how in msg and "Hugging Face cache" in msg


def test_clip_local_checkpoint_gives_the_saved_models_outputs(tmp_path):
    from open_clip.model import CLIP

    preset = get_preset("clip-tiny")
    torch.manual_seed(123)  # other weights than the preset's own random init
    cfg = dict(preset.model_cfg)
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": [64, 64]}
    src = CLIP(**cfg).eval()
    ckpt = tmp_path / "tiny.pt"
    torch.save(src.state_dict(), ckpt)
    bb = build_backbone("clip-tiny", (64, 64), weights=str(ckpt)).eval()
    assert bb.weights_id.startswith("file:tiny.pt:sha256:")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = bb(x)
        ref = src.visual(x)
    torch.testing.assert_close(out["embed"], ref)
    default = build_backbone("clip-tiny", (64, 64)).eval()
    with torch.inference_mode():
        assert not torch.allclose(default(x)["embed"], ref)
    # position embeddings are interpolated when the checkpoint's grid differs
    wide = build_backbone("clip-tiny", (64, 32), weights=str(ckpt))
    assert wide.output_specs()["tokens"].shape == (8, 96)


def test_align_local_directory_gives_the_saved_models_outputs(tmp_path):
    from transformers import AlignVisionConfig, AlignVisionModel

    torch.manual_seed(7)
    src = AlignVisionModel(AlignVisionConfig(**get_preset("align-tiny").model_cfg)).eval()
    src.save_pretrained(tmp_path / "align")
    bb = build_backbone("align-tiny", (64, 64), weights=str(tmp_path / "align")).eval()
    assert bb.weights_id.startswith("dir:align:sha256:")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(bb(x)["pooled"], src(pixel_values=x).pooler_output)
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        build_backbone("align-tiny", (64, 64), weights=str(tmp_path))


def test_outputs_cover_the_cache_contract():
    clip = build_backbone("clip-tiny", (64, 32)).output_specs()
    assert clip["pooled"].shape == (96,) and clip["tokens"].shape == (8, 96) and clip["cls_attn"].shape == (4, 2)
    assert sum(k.startswith("attn_") for k in clip) >= 4 and clip["attn_01"].dtype == "float32"
    align = build_backbone("align-tiny", (64, 64)).output_specs()
    assert sum(k.startswith("attn_") for k in align) >= 4 and align["tokens"].token


@pytest.mark.parametrize("name", ["clip-tiny", "align-tiny"])
def test_random_presets_give_image_dependent_features(name):
    """Random weights must still carry the images: no vanishing activations, no constant outputs."""
    torch.manual_seed(0)
    bb = build_backbone(name, (64, 64)).eval()
    x = torch.rand(6, 3, 64, 64) * 255
    with torch.inference_mode():
        out = bb(bb.normalize(x))
    pooled = out["pooled"]
    assert pooled.abs().mean() > 1e-3
    assert (pooled.std(0) / pooled.abs().mean()).mean() > 1e-2  # varies across images, relative to its scale
    attn = [v for k, v in out.items() if k.startswith("attn_")]
    assert all(a.std() > 0 for a in attn)


def test_forward_intermediates_gives_the_tensors_of_the_manual_forward():
    """The public open_clip path equals the block-by-block reference (embeddings, blocks, ln_post pooling)."""
    from featcache.backbones.clip import ClipBackbone
    from featcache.backbones.base import attention_map

    bb = build_backbone("clip-tiny", (64, 32)).eval()
    x = torch.randn(3, 3, 64, 32)
    v = bb.visual
    with torch.inference_mode():
        out = bb(x)
        h = v._embeds(x)  # the reference: open_clip's own private steps, as featcache 0.1 called them
        n, (gh, gw) = x.shape[0], bb.grid
        blocks = v.transformer.resblocks
        ref = {}
        for i, blk in enumerate(blocks, 1):
            if i == len(blocks):
                ref["cls_attn"] = ClipBackbone._cls_attention(blk, h).view(n, gh, gw)
            h = blk(h)
            if i in bb.preset.attn_depths:
                ref[f"attn_{i:02d}"] = attention_map(h[:, 1:].transpose(1, 2).reshape(n, -1, gh, gw))
        pooled, tokens = v._pool(h)
        ref.update(pooled=pooled, tokens=tokens, embed=pooled @ v.proj)
    assert set(out) == set(ref)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["clip-vit-b16", "align-b7"])
def test_missing_weights_fail_before_any_download_or_model_build(name, monkeypatch):
    """Without the weights in the local cache and without network, nothing is downloaded or built: the error comes first."""
    import open_clip.pretrained
    import transformers

    from featcache.backbones import hub

    def forbidden(*a, **k):
        raise AssertionError("a download or a model build was attempted")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError(101, "Network is unreachable")))
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", forbidden)
    monkeypatch.setattr(transformers.AlignModel, "from_pretrained", forbidden)
    monkeypatch.setattr("open_clip.model.CLIP.__init__", forbidden)
    with pytest.raises(WeightsNotFoundError, match=f"cannot be reached \\(Network is unreachable\\). Supply them with --weights {name}="):
        build_backbone(name, (64, 64))


def test_your_own_preset_by_file_or_by_folder(market_root, tmp_path, monkeypatch):
    """--backbone ./my-preset.json, or a folder of presets in $FEATCACHE_PRESETS (as open_clip's add_model_config)."""
    import json

    from click.testing import CliRunner

    from featcache.backbones.presets import PRESET_DIR
    from featcache.cli import main

    data = json.loads((PRESET_DIR / "clip-tiny.json").read_text())
    mine = tmp_path / "presets"
    mine.mkdir()
    (mine / "my-clip.json").write_text(json.dumps({**data, "name": "my-clip", "description": "my own tiny ViT"}))
    r = CliRunner()
    out = tmp_path / "c.h5"
    res = r.invoke(main, ["extract", "--dataset", "market1501", "--root", str(market_root), "--backbone", str(mine / "my-clip.json"),
                          "--out", str(out), "--image-size", "64x32", "--views", "1"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["eval", "--cache", str(out), "--model", "backbone:my-clip"])
    assert res.exit_code == 0, res.output
    saved = (tmp_path / "c.h5.config.yaml").read_text()
    assert "my-clip" in saved and str(mine / "my-clip.json") in saved  # a rerun from the saved config finds the file
    monkeypatch.setenv("FEATCACHE_PRESETS", str(mine))
    assert "my-clip" in r.invoke(main, ["backbones"]).output and str(mine / "my-clip.json") in r.invoke(main, ["backbones"]).output
    (mine / "clip-tiny.json").write_text(json.dumps(data))  # a built-in's name: refused
    res = r.invoke(main, ["backbones"])
    assert res.exit_code == 2 and "is a built-in preset's name" in res.output
