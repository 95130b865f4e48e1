"""Small helpers shared by every room: progress bars, seeding, a model's device, eval mode, atomic writes, and
quieting native code that prints."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
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


def model_device_dtype(
    model: torch.nn.Module, fallback: torch.dtype = torch.float32
) -> tuple[torch.device, torch.dtype]:
    """Where ``model`` computes and in which float dtype: its first floating parameter (else buffer); a model
    with no float tensors reports ``fallback``, one with no tensors at all the CPU."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.device, b.dtype
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device, fallback
    return torch.device("cpu"), fallback


def default_device() -> torch.device:
    """Where a run goes when nobody says: the current CUDA device (under torchrun, the rank's own) where there
    is one, else the CPU — what ``fit`` and the CLI's evaluations use."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s tensors (CPU for a model without any)."""
    return model_device_dtype(model)[0]


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 autocast runs on native bf16 units of ``device``: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16/AMX (oneDNN's own check). On an AVX2-only CPU bf16 is emulated: a ResNet-20 training
    step measured 10.6× *slower* than float32 there (bench/results/at_step_cost.json), so asking for bf16 is
    then worth a warning, not a speed-up.

    >>> isinstance(bf16_is_fast("cpu"), bool)
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return True  # other accelerators: trust the user's choice
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the op: assume emulated
        return False


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put every submodule of ``model`` in eval mode; restore each one's own train/eval flag afterwards
    (also when the body raises), so a model with some modules frozen in eval comes back exactly as it was."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to /dev/null for the body (scipy's HiGHS MIP solver
    prints debugging lines there that no option turns off); Python's own ``sys.stdout`` is flushed first and
    the descriptor restored afterwards, also when the body raises."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, fsync: bool = True) -> Path:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then move it over ``path`` in one rename:
    a reader never sees a half-written file, and an interrupted write leaves the old file (or none).

    The file gets the user's normal permissions (0666 less the umask), not the 0600 of a temporary file, and
    temporary files an interrupted earlier write of the same target left behind are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # a writer killed mid-write (SIGKILL leaves no chance to clean up) left its temporary file: once the
    # target is whole again, that leftover is garbage
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (UTF-8) atomically; see :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a binary file atomically; see :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)
