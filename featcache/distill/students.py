"""The students: torchvision backbones cut into four stages, with the paper's head (§3.1).

Each architecture is a code variant in the ``STUDENTS`` registry (timm's
decorator pattern): a function that splits a torchvision model into four
stages at strides 4, 8, 16 and 32, whose outputs give the four attention maps
L_att pairs with the teacher's (at 256x256: 64², 32², 16², 8², the grids of
ALIGN's stages 2, 3, 5 and 7). The head is FC(width -> 2048) + BN + ReLU and an
ID classifier. The FC output (before BN, signed) is the counterpart of the
teacher's F_t, the fused feature before its BN neck: the triplet loss reads
it, and L_feat and L_rel with ``kd_space`` literal. Retrieval uses the 2048-d
BN output, as the teacher's does, and by default L_feat and L_rel compare it,
L2-normalised, with the teacher's retrieval feature; the classifier reads it
after the ReLU (BNNeck: the triplet before the BN, the ID loss after it).

Initialisation: ``imagenet`` loads torchvision's ImageNet weights from its own
cache (``TORCH_HOME``) or downloads them, and fails at once, naming the file it
looked for, when neither can be had; ``random`` is for tests and the demo; a
path loads a local file (safetensors, or a torch state dict read with
``weights_only=True``), either a torchvision state dict of the architecture or
a featcache student's weights.
"""

from __future__ import annotations

import functools

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from featcache.backbones.base import WeightsNotFoundError, attention_map
from featcache.errors import InputError
from featcache.registry import Registry

logger = logging.getLogger(__name__)

EMBED_DIM = 2048
#: the students' input normalisation (ImageNet's, as torchvision's weights expect)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Arch:
    """How to build one architecture: the torchvision constructor name and the split into four stages."""

    tv_name: str
    split: Callable[[nn.Module], list[nn.Module]]
    width: int


STUDENTS: Registry[Arch] = Registry("--student")


def _resnet_stages(m: nn.Module) -> list[nn.Module]:
    return [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1), m.layer2, m.layer3, m.layer4]


def _features_stages(cuts: tuple[int, int, int]) -> Callable[[nn.Module], list[nn.Module]]:
    """Split ``model.features`` at ``cuts``: the last block of each stride (4, 8, 16) ends a stage."""
    a, b, c = cuts

    def split(m: nn.Module) -> list[nn.Module]:
        f = m.features
        return [nn.Sequential(*f[:a]), nn.Sequential(*f[a:b]), nn.Sequential(*f[b:c]), nn.Sequential(*f[c:])]

    return split


STUDENTS.register("resnet18", "ResNet-18 (the paper's student, 11.7 M parameters in torchvision)")(Arch("resnet18", _resnet_stages, 512))
STUDENTS.register("resnet50", "ResNet-50 (the paper's Table 5 base)")(Arch("resnet50", _resnet_stages, 2048))
STUDENTS.register("mobilenet_v3_large", "MobileNetV3-Large")(Arch("mobilenet_v3_large", _features_stages((4, 7, 13)), 960))
STUDENTS.register("efficientnet_b0", "EfficientNet-B0")(Arch("efficientnet_b0", _features_stages((3, 4, 6)), 1280))


def known_students() -> list[str]:
    return STUDENTS.names()


@dataclass
class StudentOutputs:
    embedding: torch.Tensor    # (N, 2048) FC output before BN (the counterpart of F_t): L_feat, L_rel, triplet
    feature: torch.Tensor      # (N, 2048) BN output: retrieval
    logits: torch.Tensor       # (N, C) ID logits
    maps: list[torch.Tensor]   # four (N, h, w) attention maps, sum_c |F^c| of each stage's output


class Student(nn.Module):
    """Four stages, global average pooling, FC -> 2048 + BN (+ ReLU -> ID classifier); see the module doc.

    ``forward`` returns the 2048-d retrieval embedding (what ``eval`` and the
    ONNX export use); ``outputs`` gives everything distillation needs.
    """

    def __init__(self, arch: str, n_classes: int, body: nn.Module | None = None) -> None:
        super().__init__()
        spec = STUDENTS.get(arch)
        if body is None:
            body = _torchvision(spec.tv_name)
        self.arch = arch
        self.stages = nn.ModuleList(spec.split(body))
        self.fc = nn.Linear(spec.width, EMBED_DIM)
        self.bn = nn.BatchNorm1d(EMBED_DIM)
        self.classifier = nn.Linear(EMBED_DIM, n_classes, bias=False)
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out")
        nn.init.zeros_(self.fc.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return x, maps

    def _embed(self, last: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(last, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) ImageNet-normalised -> (N, 2048) retrieval feature (the BN output)."""
        last, _ = self._trunk(x)
        return self.bn(self._embed(last))

    def outputs(self, x: torch.Tensor) -> StudentOutputs:
        last, stages = self._trunk(x)
        embedding = self._embed(last)
        feature = self.bn(embedding)
        return StudentOutputs(embedding, feature, self.classifier(F.relu(feature)), [attention_map(s) for s in stages])


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> ImageNet-normalised float (in the input's memory format)."""
    mean, std = _imagenet_stats(images_uint8.device)
    return (images_uint8.float() / 255.0 - mean) / std


@functools.lru_cache(maxsize=None)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std as (1, 3, 1, 1) tensors on ``device``, made once: a copy from host lists each step would
    make the host wait for the GPU each step."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def _torchvision(name: str) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def imagenet_file(arch: str) -> tuple[Path, str]:
    """Where torchvision keeps the ImageNet weights of ``arch`` (its hub cache under TORCH_HOME), and their URL."""
    import torchvision

    weights = torchvision.models.get_model_weights(STUDENTS.get(arch).tv_name).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url), weights.url


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    from urllib.parse import urlparse

    from featcache.backbones.hub import probe

    path, url = imagenet_file(arch)
    if not path.is_file():
        u = urlparse(url)
        reason = probe(u.hostname or "download.pytorch.org", u.port or 443)
        if reason is not None:
            raise WeightsNotFoundError(
                f"--student {arch} --student-init imagenet: torchvision's ImageNet weights not found. Looked for {path} "
                f"(torchvision's cache; TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}); not downloaded: {reason}. "
                f"Supply them: copy {os.path.basename(url)} (from {url}) there, or pass --student-init PATH to a local file")
        logger.info("downloading %s to %s", url, path)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # a refused download, a proxy error, a hash mismatch, a damaged file
        raise WeightsNotFoundError(
            f"--student {arch} --student-init imagenet: torchvision's ImageNet weights could not be loaded from {path} "
            f"or {url} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Supply them: copy "
            f"{os.path.basename(url)} there, or pass --student-init PATH to a local file") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--student-init {path}: no such file (expected imagenet, random, or a weights file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"--student-init {path}: cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"--student-init {path}: expected a state dict of tensors")
    return sd


def build_student(arch: str, n_classes: int, init: str = "random", seed: int | None = None) -> Student:
    """A student with ``init`` weights in its stages (the head is always new, except from a featcache student file)."""
    spec = STUDENTS.get(arch)
    if seed is not None:
        torch.manual_seed(seed)
    body = _torchvision(spec.tv_name)
    own: dict[str, torch.Tensor] | None = None
    if init == "imagenet":
        body.load_state_dict(_imagenet_state(arch))
    elif init != "random":
        sd = read_weights(Path(init))
        if any(k.startswith("stages.") for k in sd):
            own = sd
        else:
            body_keys = set(body.state_dict())
            matched = {k: v for k, v in sd.items() if k in body_keys}
            if not matched:
                raise InputError(f"--student-init {init}: none of its {len(sd)} tensors are weights of torchvision's {spec.tv_name} "
                                 f"(e.g. {next(iter(sd), '-')!r}); expected a {arch} state dict or a featcache student")
            try:
                body.load_state_dict(matched, strict=False)
            except RuntimeError as exc:
                raise InputError(f"--student-init {init}: shapes do not fit {arch} ({str(exc).splitlines()[1].strip()})") from None
            missing = body_keys - set(matched) - {k for k in body_keys if k.startswith(("fc.", "classifier."))}
            if missing:
                raise InputError(f"--student-init {init}: lacks {len(missing)} weights of {arch}'s stages (e.g. {sorted(missing)[0]!r})")
    model = Student(arch, n_classes, body)
    if own is not None:
        own = {k: v for k, v in own.items() if not k.startswith("classifier.") or v.shape[0] == n_classes}
        try:
            model.load_state_dict(own, strict=False)
        except RuntimeError as exc:
            raise InputError(f"--student-init {init}: a featcache student of another architecture ({str(exc).splitlines()[1].strip()})") from None
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
