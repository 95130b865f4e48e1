"""Batched, torch-only augmentations (no per-image Python loop)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from qrobust.errors import InputError

__all__ = ["CropFlip", "crop_flip_params", "random_crop_flip"]


@dataclasses.dataclass(frozen=True)
class CropFlip:
    """Where each augmented image came from: window ``offsets`` (2, N) — row and column of its top-left
    corner in the zero-padded image — and ``flip`` (N,), for a batch augmented by :func:`random_crop_flip`.

    It lets a perturbation follow its image across epochs (ODG-Q's carried perturbations): keep it in the
    padded frame, :meth:`crop` it to the augmented view and :meth:`paste` the updated view back.

    >>> cf = CropFlip(torch.tensor([[0], [2]]), torch.tensor([True]), padding=1)
    >>> frame = torch.arange(16.0).reshape(1, 1, 4, 4)  # a padded 2×2 image
    >>> cf.crop(frame)[0, 0].tolist()  # rows 0–1, columns 2–3, mirrored
    [[3.0, 2.0], [7.0, 6.0]]
    >>> cf.paste(torch.zeros(1, 1, 4, 4), cf.crop(frame)).equal(frame * torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1],
    ...                                                           [0, 0, 0, 0], [0, 0, 0, 0.]]))
    True
    """

    offsets: torch.Tensor
    flip: torch.Tensor
    padding: int

    def _index(self, n: int, c: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        offsets, flip = self.offsets.to(device), self.flip.to(device)
        ar_h = torch.arange(h, device=device)
        ar_w = torch.arange(w, device=device)
        rows = offsets[0, :, None] + ar_h  # (N, H)
        # A flipped sample reads its window's columns right-to-left.
        cols = offsets[1, :, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (N, W)
        batch = torch.arange(n, device=device)[:, None, None, None]
        chan = torch.arange(c, device=device)[None, :, None, None]
        return batch, chan, rows[:, None, :, None], cols[:, None, None, :]

    def _view_size(self, frame: torch.Tensor) -> tuple[int, int]:
        h, w = frame.shape[-2] - 2 * self.padding, frame.shape[-1] - 2 * self.padding
        if frame.ndim != 4 or frame.shape[0] != self.flip.numel() or h < 1 or w < 1:
            raise InputError(f"CropFlip: expected a padded frame ({self.flip.numel()}, C, H+{2 * self.padding}, "
                             f"W+{2 * self.padding}), got {tuple(frame.shape)}")
        return h, w

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) zero-padded to the frame the windows index."""
        p = self.padding
        return F.pad(x, (p, p, p, p)) if p else x

    def crop(self, frame: torch.Tensor) -> torch.Tensor:
        """The augmented views (N, C, H, W) of a padded frame (N, C, H+2p, W+2p)."""
        h, w = self._view_size(frame)
        return frame[self._index(frame.shape[0], frame.shape[1], h, w, frame.device)]

    def paste(self, frame: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """A copy of ``frame`` with ``views`` written back where :meth:`crop` read them (the inverse)."""
        h, w = self._view_size(frame)
        out = frame.clone()
        out[self._index(frame.shape[0], frame.shape[1], h, w, frame.device)] = views.to(frame.dtype)
        return out


def crop_flip_params(n: int, padding: int, generator: torch.Generator | None = None) -> CropFlip:
    """Random windows (offsets uniform in [0, 2·padding] per axis) and flips (probability 1/2) for ``n``
    images, drawn from ``generator`` on the CPU."""
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return CropFlip(offsets, flip, padding)


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None, *, return_params: bool = False
) -> torch.Tensor | tuple[torch.Tensor, CropFlip]:
    """Random crop after zero padding, then a horizontal flip with probability 1/2, per sample.

    ``x`` is a batch (N, C, H, W) of any dtype; the result has the same shape, dtype and device. Every
    output image is an H×W window of the zero-padded input (offsets uniform in [0, 2·padding] along each
    axis), mirrored left-right for about half of the samples. Random numbers come from ``generator``
    (a CPU generator) so that a seeded generator gives the same batch every time. ``return_params`` also
    returns the :class:`CropFlip` that was applied.

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
    cf = crop_flip_params(x.shape[0], padding, generator)
    out = x.clone() if x.shape[0] == 0 else cf.crop(cf.pad(x))
    return (out, cf) if return_params else out
