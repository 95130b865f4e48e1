"""Small helpers shared by every room: progress bars, seeding, devices."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None, leave: bool = False) -> Iterator[T]:
    """A tqdm bar that stays quiet when stderr is not a terminal (CI, pipes) or QROBUST_NO_PROGRESS is set."""
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) or bool(os.environ.get("QROBUST_NO_PROGRESS"))
    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
