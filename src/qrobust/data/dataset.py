"""In-memory datasets: uint8 images plus int64 labels, and the static facts about a dataset."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from qrobust.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: what a model built for it needs to know.

    ``mean``/``std`` are per-channel, on the [0, 1] pixel scale (for the model's ``Normalize`` layer).
    For ``imagefolder`` before loading, everything but ``name`` is unknown (``None``); a loaded image-folder
    dataset carries the classes it found and the mean/std of the split it loaded.
    ``display_name`` is what reports should print, e.g. ``"CIFAR-10 (JPEG)"`` when the pixels came from the
    JPEG export rather than the official python batches.
    """

    name: str
    num_classes: int | None
    input_shape: tuple[int, int, int] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    classes: list[str] | None
    display_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for checkpoint metadata and result files)."""
        d = asdict(self)
        for key in ("input_shape", "mean", "std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        def tup(v: Any) -> tuple | None:
            return None if v is None else tuple(v)

        return cls(
            name=d["name"],
            num_classes=d.get("num_classes"),
            input_shape=tup(d.get("input_shape")),
            mean=tup(d.get("mean")),
            std=tup(d.get("std")),
            classes=None if d.get("classes") is None else list(d["classes"]),
            display_name=d.get("display_name", ""),
        )


class ArrayDataset(Dataset):
    """A whole split held in memory as ``images`` (uint8, N×C×H×W) and ``labels`` (int64, N).

    Items and :meth:`tensors` are float32 pixels in [0, 1]. ``split`` and ``source`` say where the data came
    from (for logs and result files).
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        info: DatasetInfo,
        *,
        split: str = "",
        source: str = "",
    ) -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(
                f"{info.name}: images must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}; the loader produced something unexpected - clear the cache, reload"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{info.name}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}; "
                "the files disagree on the number of samples"
            )
        labels = labels.to(torch.int64)
        if labels.numel() and (
            int(labels.min()) < 0 or (info.num_classes and int(labels.max()) >= info.num_classes)
        ):
            raise DataError(
                f"{info.name}: labels range over [{int(labels.min())}, {int(labels.max())}] but there are "
                f"{info.num_classes} classes; the label file is corrupt or belongs to another dataset"
            )
        if info.input_shape is not None and tuple(images.shape[1:]) != tuple(info.input_shape):
            raise DataError(
                f"{info.name}: images have shape {tuple(images.shape[1:])}, expected {info.input_shape}"
            )
        self.images = images.contiguous()
        self.labels = labels.contiguous()
        self.info = info
        self.split = split
        self.source = source

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].to(torch.float32).div_(255.0), int(self.labels[i])

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return (
            f"ArrayDataset({self.info.name!r}, split={self.split!r}, n={len(self)}, shape=({c}, {h}, {w}), "
            f"classes={self.info.num_classes})"
        )

    def tensors(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples (all if ``None``) as (float32 pixels in [0, 1], int64 labels)."""
        if n is None:
            n = len(self)
        if n < 0:
            raise ConfigError(f"tensors(n): n must be >= 0, got {n}")
        if n > len(self):
            log.warning(
                "%s/%s has only %d samples; tensors(%d) returns all of them",
                self.info.name,
                self.split,
                len(self),
                n,
            )
            n = len(self)
        return self.images[:n].to(torch.float32).div_(255.0), self.labels[:n].clone()

    def subset(self, n: int, *, seed: int = 0, stratified: bool = False) -> ArrayDataset:
        """A reproducible random subset of ``n`` samples, kept in their original order.

        ``stratified=True`` takes from every class in proportion to its size (largest remainders get the
        leftover slots), so a small subset still covers every class.
        """
        total = len(self)
        if not 0 <= n <= total:
            raise ConfigError(
                f"subset(n): n must be in [0, {total}] for {self.info.name}/{self.split}, got {n}"
            )
        rng = np.random.default_rng(seed)
        if not stratified:
            idx = rng.permutation(total)[:n]
        else:
            labels = self.labels.numpy()
            classes, counts = np.unique(labels, return_counts=True)
            exact = counts * (n / total)
            take = np.floor(exact).astype(np.int64)
            leftover = n - int(take.sum())
            order = np.argsort(-(exact - take), kind="stable")
            take[order[:leftover]] += 1
            parts = []
            for cls, k in zip(classes, take):
                members = np.flatnonzero(labels == cls)
                parts.append(rng.permutation(members)[:k])
            idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        index = torch.from_numpy(np.sort(idx).astype(np.int64))
        return ArrayDataset(
            self.images.index_select(0, index),
            self.labels.index_select(0, index),
            self.info,
            split=self.split,
            source=self.source,
        )
