"""Safe checkpoints: safetensors weights plus JSON metadata, written atomically, never unpickled.

A checkpoint is one ``.safetensors`` file. Its header metadata holds one JSON document under the key
``"qrobust"``: the architecture and its arguments (``arch``), the :class:`~qrobust.quant.QuantSpec`
(``spec``, absent for float models), a SHA-256 of the tensor bytes, the qrobust/torch versions and any
user metadata (dataset, recipe, metrics …).

>>> import torch, tempfile, os
>>> from qrobust.models import build_model
>>> from qrobust.checkpoint import save, load
>>> m = build_model("digits_cnn", in_channels=1, input_size=8)
>>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
>>> save(m, path, dataset="digits")
>>> load(path).training
False
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qrobust._version import __version__
from qrobust.errors import CheckpointError
from qrobust.models import build_model
from qrobust.quant import QuantSpec, quantize
from qrobust.utils import atomic_write

FORMAT = "qrobust-checkpoint/1"
FINAL_NAME = "final.safetensors"


# --------------------------------------------------------------------------------------------- writing
def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, non-shared CPU tensors
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Low level: write ``tensors`` and the JSON-serialisable ``meta`` to ``path`` atomically."""
    tensors = _plain_state(tensors)
    doc = {
        "format": FORMAT,
        "qrobust_version": __version__,
        "torch_version": torch.__version__,
        "sha256": _digest(tensors),
        **meta,
    }
    try:
        header = {"qrobust": json.dumps(doc, default=_json_default)}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
    atomic_write(Path(path), lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))


def _json_default(o: Any) -> Any:
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def save(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Save ``model``'s weights and what is needed to rebuild it; keyword arguments become metadata.

    The model must come from :func:`qrobust.models.build_model` (it then carries ``qrobust_arch``),
    optionally converted by :func:`qrobust.quant.quantize` (``qrobust_spec``).
    """
    model = _unwrap(model)
    arch = getattr(model, "qrobust_arch", None)
    if arch is None:
        raise CheckpointError(
            "this model has no 'qrobust_arch': build it with qrobust.models.build_model so that the "
            "checkpoint can rebuild it"
        )
    meta = {"arch": arch, "spec": getattr(model, "qrobust_spec", None), "metadata": metadata}
    path = Path(path)
    save_tensors(path, model.state_dict(), meta)
    return path


# --------------------------------------------------------------------------------------------- reading
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.safetensors")


def epoch_checkpoints(run: str | os.PathLike) -> list[Path]:
    """The epoch checkpoints of a run folder (``checkpoints/epoch_N.safetensors``), oldest first, ordered by
    their epoch number (``epoch_1000`` after ``epoch_999``, which a text sort gets wrong)."""
    folder = Path(run) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("epoch_*.safetensors")
             if (m := _EPOCH_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its ``final.safetensors``, else its newest epoch checkpoint)."""
    p = Path(path)
    if p.is_dir():
        if (p / FINAL_NAME).is_file():
            return p / FINAL_NAME
        epochs = epoch_checkpoints(p)
        if epochs:
            return epochs[-1]
        raise CheckpointError(
            f"{p} is a folder but holds no checkpoint: expected {p / FINAL_NAME} or "
            f"{p / 'checkpoints'}/epoch_NNN.safetensors"
        )
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def read_tensors(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Low level: the tensors and the qrobust metadata of a checkpoint file, checked for integrity."""
    p = resolve_checkpoint(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        tensors = safetensors.torch.load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors checkpoint (truncated or corrupt?): {e}") from e
    if "qrobust" not in header:
        raise CheckpointError(f"{p} is a safetensors file but not a qrobust checkpoint (no 'qrobust' metadata)")
    try:
        meta = json.loads(header["qrobust"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: the checkpoint's metadata is corrupt JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    if verify and meta.get("sha256") != _digest(tensors):
        raise CheckpointError(f"{p}: the weights do not match their recorded SHA-256: the file is corrupt")
    return tensors, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata document of a checkpoint (arch, spec, user metadata, versions) without building a model."""
    return read_tensors(path)[1]


def build_from_meta(meta: dict) -> nn.Module:
    """An untrained model with the architecture (and quantization) a checkpoint describes."""
    arch = meta.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise CheckpointError("checkpoint metadata has no valid 'arch' (architecture name and arguments)")
    try:
        model = build_model(arch["name"], **arch.get("kwargs", {}))
        if meta.get("spec"):
            model = quantize(model, QuantSpec.from_dict(meta["spec"]), inplace=True)
    except CheckpointError:
        raise
    except Exception as e:  # an arch/spec that this version cannot build
        raise CheckpointError(f"cannot rebuild the model the checkpoint describes ({arch}): {e}") from e
    return model


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with the mismatch explained as a CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shape = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if shape:
            parts.append(
                "shape mismatch "
                + ", ".join(f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in shape[:5])
            )
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(tensors, strict=True)


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path`` (file or run folder), in eval mode, expecting [0, 1] pixels.

    The metadata document is attached as ``model.qrobust_meta``.
    """
    tensors, meta = read_tensors(path)
    model = build_from_meta(meta)
    # epoch checkpoints also carry optimizer/RNG state under "__…" keys: not part of the model
    weights = {k: v for k, v in tensors.items() if not k.startswith("__")}
    load_state_into(model, weights, source=str(resolve_checkpoint(path)))
    model.qrobust_meta = meta
    return model.to(map_location).eval()
