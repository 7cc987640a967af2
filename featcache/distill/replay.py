"""View replay on the device: a batch of letterboxed uint8 images and their stored view parameters -> the exact
views extraction fed the backbones, built where the student trains.

``featcache.preprocess.view_of`` is the rule, one image at a time in NumPy: pad by ``AUG_PAD`` zeros, crop
(H, W) at (dy, dx), flip left-right if asked, then fill the erased rectangle (ex, ey, ew, eh) of the result.
Every step is integer indexing, so the batched torch version here gives the same bytes on any device (a test
on CPU torch holds it equal to ``view_of`` for every stored parameter). It is what lets the student's input
path run on the GPU from uint8 pixels resident there, instead of replaying views in DataLoader workers.
"""

from __future__ import annotations

import torch

from featcache.preprocess import AUG_PAD


def replay_views(base: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 letterboxed images and (N, 10) view parameters (``preprocess.PARAMS``, or N x 3: dx, dy,
    flip) -> (N, 3, H, W) uint8 views, on ``base``'s device, in channels_last strides (the layout they are built in;
    ``.contiguous()`` gives the default one)."""
    if base.dim() != 4 or base.shape[-1] != 3 or base.dtype != torch.uint8:
        raise ValueError(f"base: expected (N, H, W, 3) uint8, got {tuple(base.shape)} {base.dtype}")
    n, h, w, _ = base.shape
    dev = base.device
    p = params.to(dev).long()
    padded = torch.nn.functional.pad(base.permute(0, 3, 1, 2), (AUG_PAD, AUG_PAD, AUG_PAD, AUG_PAD))  # (N, 3, H+2P, W+2P)
    ys = p[:, 1, None] + torch.arange(h, device=dev)[None, :]                  # (N, H) rows of the crop
    xs = torch.arange(w, device=dev)[None, :].expand(n, w)
    xs = torch.where(p[:, 2, None] > 0, w - 1 - xs, xs) + p[:, 0, None]        # (N, W) columns, flipped where asked
    out = padded[torch.arange(n, device=dev)[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (N, H, W, 3)
    if p.shape[1] >= 10:
        ex, ey, ew, eh = (p[:, k, None, None] for k in (3, 4, 5, 6))
        y = torch.arange(h, device=dev)[None, :, None]
        x = torch.arange(w, device=dev)[None, None, :]
        inside = (ew > 0) & (eh > 0) & (y >= ey) & (y < ey + eh) & (x >= ex) & (x < ex + ew)   # (N, H, W)
        fill = p[:, 7:10].to(torch.uint8)[:, None, None, :]
        out = torch.where(inside[..., None], fill, out)
    return out.permute(0, 3, 1, 2)
