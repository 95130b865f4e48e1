"""BatchLoader: batches cut straight from an ArrayDataset's uint8 tensors (no per-item Python)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import torch

from qrobust.data.dataset import ArrayDataset
from qrobust.data.transforms import CropFlip, crop_flip_params
from qrobust.errors import ConfigError

log = logging.getLogger(__name__)

AUGMENT_PADDING = 4


@dataclasses.dataclass(frozen=True)
class BatchView:
    """Where the batch a loader just yielded came from: each image's dataset ``index`` (N,) and, when it
    was augmented, the :class:`~qrobust.data.transforms.CropFlip` applied (else None).

    Loaders expose it as ``loader.batch_view`` while the batch is in use; :func:`qrobust.fit` hands it to
    objectives that keep per-sample state (``objective.set_batch_view``), such as ODG-Q's carried
    perturbations.
    """

    index: torch.Tensor
    augment: CropFlip | None = None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class BatchLoader:
    """Iterate over (x float32 in [0, 1], y int64) batches of an :class:`ArrayDataset`.

    * ``shuffle``: the order is a permutation drawn from ``seed + epoch``; call :meth:`set_epoch` before
      each epoch (as with ``DistributedSampler``) — iterating twice without it repeats the same order.
    * ``rank``/``world_size``: each rank takes every ``world_size``-th index of the (shuffled) order. With
      ``drop_last=False`` the order is padded by repeating its first indices so that every rank gets the
      same number of samples and batches; with ``drop_last=True`` it is truncated to a multiple of
      ``world_size`` and each rank's last incomplete batch is dropped.
    * ``augment``: random crop (zero padding 4) + horizontal flip, only for 3×32×32 datasets; for anything
      else (digits, MNIST) it does nothing, since flipping corrupts digits.
    * ``device``: if given, the uint8 tensors are moved there once and batches are produced there.
    * ``batch_view``: a :class:`BatchView` of the batch last yielded (dataset indices, augmentation).
    """

    def __init__(
        self,
        ds: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool | str = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(ds, ArrayDataset):
            raise ConfigError(f"BatchLoader needs a qrobust.data.ArrayDataset, got {type(ds).__name__}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if not _is_int(world_size) or world_size < 1:
            raise ConfigError(f"world_size must be a positive int, got {world_size!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if not _is_int(seed):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        self.ds = ds
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = bool(drop_last)
        self.device = None if device is None else torch.device(device)
        self.epoch = 0
        shape = tuple(ds.images.shape[1:])
        self.augment = bool(augment) and shape == (3, 32, 32)
        if augment and augment != "auto" and not self.augment:  # "auto": the standard augmentation if any
            log.info(
                "augment=True ignored for %s: crop+flip applies to 3x32x32 images only, got %s",
                ds.info.name,
                shape,
            )
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self.batch_view: BatchView | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle (and augmentation) the next iteration uses."""
        if not _is_int(epoch) or epoch < 0:
            raise ConfigError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def _samples_per_rank(self) -> int:
        n = len(self.ds)
        if self.drop_last:
            return n // self.world_size
        return -(-n // self.world_size)

    def __len__(self) -> int:
        per_rank = self._samples_per_rank()
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order (int64)."""
        n = len(self.ds)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self._samples_per_rank() * self.world_size
        if total > n:  # pad by wrapping around the order (only when n is not a multiple of world_size)
            order = torch.cat([order, order.repeat(-(-(total - n) // max(n, 1)))[: total - n]])
        order = order[:total]
        idx = order[self.rank :: self.world_size]
        if self.drop_last:
            idx = idx[: len(self) * self.batch_size]
        return idx

    def _augment_generator(self) -> torch.Generator:
        # Distinct, reproducible streams for every (seed, epoch, rank).
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank, 0xA06]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device is None:
            return self.ds.images, self.ds.labels
        if self._images is None or self._labels is None:
            self._images = self.ds.images.to(self.device)
            self._labels = self.ds.labels.to(self.device)
        return self._images, self._labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self._tensors()
        idx = self.indices().to(images.device)
        gen = self._augment_generator() if self.augment else None
        for start in range(0, idx.numel(), self.batch_size):
            b = idx[start : start + self.batch_size]
            x = images.index_select(0, b)
            cf = None
            if gen is not None:
                cf = crop_flip_params(b.numel(), AUGMENT_PADDING, gen)
                x = cf.crop(cf.pad(x))
            self.batch_view = BatchView(b.cpu(), cf)
            yield x.to(torch.float32).div_(255.0), labels.index_select(0, b)
