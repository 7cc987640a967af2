"""Each stand-in's view of the world during pre-training (a small registry of code variants, as timm's).

The views decide what each expert learns to rely on, and so where it is strong: an expert that only ever sees
images with shuffled or removed colours learns shape and pattern; one that only sees blurred images learns colour
and layout. On a dataset with monochrome (night) and out-of-focus (blur) cameras, a gate has a reason to route.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision.transforms.v2.functional as TF

from featcache.registry import Registry

VIEWS: Registry[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = Registry("stand-in view")


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@VIEWS.register("colour-jitter", "colours shuffled or removed, brightness and contrast jittered: shape and pattern, not colour")
def colour_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``x``: float (N, 3, H, W) in [0, 1]. Per image: its RGB channels in a random order, then grayscale with
    probability 0.5, then contrast and brightness scaled by 0.6-1.4 and 0.7-1.3, so that no colour identifies a person."""
    n = x.shape[0]
    perm = torch.argsort(torch.rand(n, 3, generator=g), dim=1)
    x = x.gather(1, perm[:, :, None, None].expand_as(x))
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    x = torch.where((torch.rand(n, generator=g) < 0.5)[:, None, None, None], gray, x)
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    bright = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    return _flip(((x - mean) * contrast + mean * bright).clamp(0, 1), g)


@VIEWS.register("blur", "a strong Gaussian blur, colours kept: colour and layout, no fine pattern")
def blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sigma = float(1.5 + 1.5 * torch.rand((), generator=g)) * x.shape[-1] / 64
    k = 2 * int(3 * sigma) + 1
    return _flip(TF.gaussian_blur(x, [k, k], [sigma, sigma]), g)
