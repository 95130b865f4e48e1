"""Any data a user hands qrobust — an ArrayDataset, a DataLoader/BatchLoader, an ``(x, y)`` pair of tensors —
as what a room needs: batches for training (:func:`as_batches`) or one in-memory pair for evaluation
(:func:`as_tensors`). The one place that knows the kinds of data qrobust accepts.

>>> import torch
>>> x, y = torch.rand(10, 1, 4, 4), torch.arange(10) % 3
>>> [len(b[1]) for b in as_batches((x, y), 4, shuffle=False, augment=False, seed=0)]
[4, 4, 2]
>>> xs, ys, name = as_tensors((x, y), 6)
>>> xs.shape[0], name
(6, None)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from qrobust.data.dataset import ArrayDataset
from qrobust.data.loader import BatchLoader, BatchView
from qrobust.errors import ConfigError, InputError

ACCEPTED = "an ArrayDataset, a DataLoader or an (x, y) pair of tensors"


def _is_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


class TensorBatches:
    """Batches of an in-memory ``(x, y)`` pair, reshuffled per epoch from a seed; DDP-sharded."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.batch_view: Any = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        per = n // self.world_size
        return idx[self.rank * per : (self.rank + 1) * per] if self.world_size > 1 else idx

    def __len__(self) -> int:
        return math.ceil(len(self.y) // self.world_size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        for i in range(0, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            self.batch_view = BatchView(j)
            yield self.x[j], self.y[j]


def as_batches(
    data: Any, batch_size: int, *, shuffle: bool, augment: bool | None, seed: int, rank: int = 0, world_size: int = 1
) -> Iterable:
    """Anything qrobust trains or evaluates on — an ArrayDataset, a DataLoader/BatchLoader, an (x, y) pair —
    as an iterable of ``(x, y)`` batches."""
    if isinstance(data, ArrayDataset):
        if len(data) == 0:
            raise InputError(f"the dataset {data.info.name!r} has no samples: nothing to train or evaluate on")
        if augment is None:
            augment = "auto" if shuffle else False  # the standard one: crop+flip for 32×32 RGB, none for digits
        return BatchLoader(
            data, batch_size, shuffle=shuffle, augment=augment, seed=seed, rank=rank, world_size=world_size
        )
    if _is_pair(data):
        x, y = data
        if len(x) != len(y):
            raise ConfigError(f"x and y have different lengths: {len(x)} vs {len(y)}")
        check_pixels_and_labels(x, y)
        return TensorBatches(x, y, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    if isinstance(data, Iterable):
        return data
    raise ConfigError(f"cannot train or evaluate on a {type(data).__name__}: give {ACCEPTED}")


def check_pixels_and_labels(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x`` a non-empty float tensor of finite pixels in [0, 1], ``y`` integer labels ``(N,)`` ≥ 0, else a
    one-line InputError that says what to change (0–255 pixels are the usual mistake)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise InputError(f"x must be a float tensor N×… with pixels in [0, 1], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if y.dtype == torch.bool or y.is_floating_point() or y.dim() != 1:
        raise InputError(f"y must be int64 labels of shape (N,), got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise InputError("no samples: x and y are empty")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x holds NaN or infinite values; pixels must be finite, in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        hint = ("they look like 0–255 pixels: divide by 255" if hi > 1 and lo >= 0 else
                "they look normalized: pass [0, 1] pixels and put the normalization inside the model "
                "(nn.Sequential(Normalize(mean, std), model))")
        raise InputError(f"x must be pixels in [0, 1], got values in [{lo:g}, {hi:g}]; {hint}")
    if int(y.min()) < 0:
        raise InputError(f"labels must be class indices ≥ 0, got {int(y.min())}")


def check_label_range(y: torch.Tensor, num_classes: int) -> None:
    """Labels must index the model's ``num_classes`` outputs."""
    if y.numel() and int(y.max()) >= num_classes:
        raise InputError(f"label {int(y.max())} is out of range for a model with {num_classes} outputs "
                         f"(labels must be 0…{num_classes - 1}); check the dataset or the model's num_classes")


def as_tensors(data: Any, n: int | None) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """The first ``n`` samples (all if ``None``) of ``data`` in memory: ``(x float32 in [0, 1] on the CPU,
    y int64, the dataset's name if known)``; a loader is read only until ``n`` samples have come."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be a positive integer (number of test samples), got {n!r}")
    name = None
    if isinstance(data, ArrayDataset):
        x, y = data.tensors(n)
        name = data.info.name
    elif _is_pair(data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise InputError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
        if n is not None:
            x, y = x[:n], y[:n]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        xs, ys, count = [], [], 0
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise InputError(f"a data loader must yield (x, y) batches, got {type(batch).__name__}")
            bx, by = batch[0], batch[1]
            xs.append(bx.detach().cpu())
            ys.append(torch.as_tensor(by).detach().cpu())
            count += bx.shape[0]
            if n is not None and count >= n:
                break
        if not xs:
            raise InputError("the data loader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
        if n is not None:
            x, y = x[:n], y[:n]
        ds = getattr(data, "dataset", None) or getattr(data, "ds", None)
        info = getattr(ds, "info", None)
        name = getattr(info, "name", None)
    else:
        raise ConfigError(f"cannot evaluate on a {type(data).__name__}: give {ACCEPTED}")
    check_pixels_and_labels(x, y)
    return x.detach().cpu().float().contiguous(), y.detach().cpu().long(), name
