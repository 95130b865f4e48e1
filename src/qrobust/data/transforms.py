"""Batched, torch-only augmentations (no per-image Python loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qrobust.errors import InputError

__all__ = ["random_crop_flip"]


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding, then a horizontal flip with probability 1/2, per sample.

    ``x`` is a batch (N, C, H, W) of any dtype; the result has the same shape, dtype and device. Every
    output image is an H×W window of the zero-padded input (offsets uniform in [0, 2·padding] along each
    axis), mirrored left-right for about half of the samples. Random numbers come from ``generator``
    (a CPU generator) so that a seeded generator gives the same batch every time.

    >>> x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    >>> random_crop_flip(x, padding=1, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 3, 4, 4])
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise InputError(
            f"random_crop_flip expects a batch tensor (N, C, H, W), got {getattr(x, 'shape', x)!r}"
        )
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise InputError(f"random_crop_flip: padding must be an int >= 0, got {padding!r}")
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    offsets, flip = offsets.to(x.device), flip.to(x.device)

    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[0, :, None] + ar_h  # (N, H)
    # A flipped sample reads its window's columns right-to-left.
    cols = offsets[1, :, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
