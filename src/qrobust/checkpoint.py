"""Safe checkpoints: safetensors weights plus JSON metadata, written atomically, never unpickled.

A checkpoint is one ``.safetensors`` file. Its header metadata holds one JSON document under the key
``"qrobust"``: the architecture and its arguments (``arch``, None for a model of one's own), the model's
class (``class``, its import path), the :class:`~qrobust.quant.QuantSpec` (``spec``, absent for float
models), a SHA-256 of the tensor bytes (``sha256``), the qrobust/torch versions, any user metadata
(dataset, recipe, metrics …) and ``header_sha256``: a SHA-256 of the rest of the document as canonical JSON
(sorted keys, no spaces), so one changed byte of the metadata (``weight_bits`` 4 → 2) is an error, not a
different model.

Formats: ``qrobust-checkpoint/2`` is written. ``/1`` files (written before the header was covered) still
load — their tensors are checked, and a logged note says their metadata is not.

Models: one from :func:`qrobust.models.build_model` (or a ``register_model`` builder) loads from the path
alone; any other ``nn.Module`` saves as well and loads into a skeleton of its own class,
``load(path, model=MyNet())`` — the skeleton is quantized to the saved spec first, then takes the weights.

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
import importlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qrobust import zoo
from qrobust._version import __version__
from qrobust.errors import CheckpointError, ConfigError, InputError
from qrobust.models import build_from_arch
from qrobust.quant import QuantSpec, is_quantized, quantize_as_saved
from qrobust.utils import atomic_write

FORMAT = "qrobust-checkpoint/2"
OLD_FORMATS = ("qrobust-checkpoint/1",)  # digest over the tensors only
FINAL_NAME = "final.safetensors"

log = logging.getLogger(__name__)


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


def _header_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of the document without its own ``header_sha256``, as canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "header_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _document(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """The header's JSON text for ``tensors`` (already plain) and ``meta``; CheckpointError if not JSON."""
    doc = {
        "format": FORMAT,
        "qrobust_version": __version__,
        "torch_version": torch.__version__,
        "sha256": _digest(tensors),
        **meta,
    }
    try:
        doc = json.loads(json.dumps(doc, default=_json_default))  # the values exactly as they will read back
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
    doc["header_sha256"] = _header_digest(doc)
    return json.dumps(doc)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Low level: write ``tensors`` and the JSON-serialisable ``meta`` to ``path`` atomically."""
    tensors = _plain_state(tensors)
    header = {"qrobust": _document(tensors, meta)}
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


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _meta_of(model: nn.Module, metadata: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "arch": getattr(model, "qrobust_arch", None),
        "class": _class_path(model),
        "spec": getattr(model, "qrobust_spec", None),
        "metadata": metadata,
    }
    composite = getattr(model, "qrobust_composite", None)
    record = composite() if callable(composite) else None
    if record is not None:  # a model made of registry models (an ensemble, a random-precision network)
        meta["composite"] = record
    return meta


def _build_composite(record: dict[str, Any]) -> nn.Module:
    """A composite model rebuilt by its class's ``from_composite(record, build)``; only qrobust's own classes
    are imported (a checkpoint never makes us import code of its choosing)."""
    path = record.get("class", "")
    module, _, name = str(path).rpartition(".")
    if not module.startswith("qrobust."):
        raise CheckpointError(f"checkpoint names a composite model class {path!r} outside qrobust; load it with "
                              f"qrobust.load(path, model=skeleton)")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot find the composite model class {path!r} of this checkpoint: {e}") from e
    return cls.from_composite(record, build_from_meta)


def _checked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(
            f"the state dict of {type(model).__name__} holds entries that are not tensors ({bad[:5]}); a "
            "safetensors checkpoint stores tensors only: keep extra state in metadata instead"
        )
    return state


def check_saveable(model: nn.Module, **metadata: Any) -> None:
    """Raise CheckpointError now if :func:`save` of ``model`` with ``metadata`` would fail (nothing written).

    ``fit`` calls it before training, so a run cannot end in a checkpoint that cannot be written.
    """
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"only a torch.nn.Module can be saved, got {type(model).__name__}")
    _document({}, _meta_of(model, metadata))
    _checked_state(model)


def save(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Save ``model``'s weights, spec and metadata (keyword arguments); any ``nn.Module`` can be saved.

    A model from :func:`qrobust.models.build_model` (quantized or not) records
    its ``qrobust_arch`` and loads back from the path alone; any other model loads back into a skeleton
    of its own class, ``load(path, model=skeleton)``.
    """
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"only a torch.nn.Module can be saved, got {type(model).__name__}")
    path = Path(path)
    save_tensors(path, _checked_state(model), _meta_of(model, metadata))
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
    """A checkpoint file, a run folder (its ``final.safetensors``, else its newest epoch checkpoint), or a
    zoo name ``"zoo:NAME"`` (:func:`qrobust.zoo.resolve`: the repository's ``zoo/`` or ``$QROBUST_ZOO``)."""
    if zoo.is_zoo_name(str(path)):
        return zoo.resolve(str(path))
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
    if not isinstance(meta, dict) or (meta.get("format") != FORMAT and meta.get("format") not in OLD_FORMATS):
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{p}: unknown checkpoint format {got!r}, expected {FORMAT!r}")
    if verify:
        if meta["format"] in OLD_FORMATS:
            log.info(
                "%s is a %s checkpoint of an earlier qrobust: its weights are checked, its metadata (arch, spec) "
                "is not covered by a digest; save it again to cover both", p, meta["format"],
            )  # fmt: skip
        elif meta.get("header_sha256") != _header_digest(meta):
            raise CheckpointError(
                f"{p}: the checkpoint's metadata (header) does not match its recorded SHA-256: it was changed "
                "after saving (an edited arch, spec or metadata would load as a different model); use the "
                "original file, or re-save the model"
            )
        if meta.get("sha256") != _digest(tensors):
            raise CheckpointError(f"{p}: the weights do not match their recorded SHA-256: the file is corrupt")
    return tensors, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata document of a checkpoint (arch, spec, user metadata, versions) without building a model."""
    return read_tensors(path)[1]


def build_from_meta(meta: dict) -> nn.Module:
    """An untrained model with the architecture (and quantization) a checkpoint describes."""
    if meta.get("composite"):
        return _build_composite(meta["composite"])
    arch = meta.get("arch")
    if arch is None:  # a model of one's own (epoch checkpoints of fit do not record the class)
        cls = meta.get("class") or "a class of yours"
        short = meta["class"].rpartition(".")[2] if meta.get("class") else "MyNet"
        raise CheckpointError(
            f"this checkpoint holds a model of your own ({cls}), not a registered architecture: "
            f"load it into a skeleton of its class, qrobust.load(path, model={short}"
            "(...)), or register its builder with qrobust.models.register_model so it loads from the path alone"
        )
    if not isinstance(arch, dict) or "name" not in arch:
        raise CheckpointError("checkpoint metadata has no valid 'arch' (architecture name and arguments)")
    try:
        model = build_from_arch(arch)
        if meta.get("spec"):
            model = quantize_as_saved(model, QuantSpec.from_dict(meta["spec"]))
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


def _into_skeleton(skeleton: nn.Module, meta: dict, source: str) -> nn.Module:
    """``skeleton`` quantized to the checkpoint's spec (in place), ready for the weights."""
    if not isinstance(skeleton, nn.Module):
        raise ConfigError(f"model= must be an nn.Module of the saved model's class, got {type(skeleton).__name__}")
    skeleton = _unwrap(skeleton)
    saved_class = meta.get("class")
    if saved_class and saved_class != _class_path(skeleton):
        log.warning("%s was saved from %s; loading it into a %s", source, saved_class, _class_path(skeleton))
    spec = meta.get("spec")
    if is_quantized(skeleton):
        if not spec or QuantSpec.from_dict(spec) != QuantSpec.coerce(getattr(skeleton, "qrobust_spec", None)):
            raise CheckpointError(
                f"model= is already quantized ({getattr(skeleton, 'qrobust_spec', {}).get('name', '?')}) but "
                f"{source} holds {(spec or {}).get('name', 'a float model')}: pass the float skeleton; load "
                "quantizes it to the saved spec"
            )
        return skeleton
    if spec:
        try:
            skeleton = quantize_as_saved(skeleton, QuantSpec.from_dict(spec))
        except ConfigError as e:
            raise CheckpointError(
                f"{source}: cannot quantize model= to the saved spec {spec.get('name')!r}: {e}"
            ) from e
    return skeleton


def load(
    path: str | os.PathLike, *, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild the model saved at ``path`` (file, run folder or ``"zoo:NAME"``), in eval mode, expecting [0, 1]
    pixels.

    ``model`` — a freshly built *float* instance of the saved model's class, as for ``load_state_dict`` —
    receives the checkpoint instead of a rebuilt registry architecture: it is quantized to the saved spec
    (in place) and takes the weights; a skeleton whose layers do not match is a CheckpointError naming the
    missing, unexpected and mis-shaped entries. The metadata document is attached as ``model.qrobust_meta``.
    """
    tensors, meta = read_tensors(path)
    source = str(resolve_checkpoint(path))
    if meta.get("packed"):
        raise CheckpointError(f"{source} is a packed low-bit checkpoint (weights at their bit-widths): load it with "
                              "qrobust.export.load_packed(path)")
    net = build_from_meta(meta) if model is None else _into_skeleton(model, meta, source)
    # epoch checkpoints also carry optimizer/RNG state under "__…" keys: not part of the model
    weights = {k: v for k, v in tensors.items() if not k.startswith("__")}
    if model is not None and meta.get("class"):
        source = f"{source} (saved from {meta['class']})"
    load_state_into(net, weights, source=source)
    net.qrobust_meta = meta
    return net.to(map_location).eval()


def check_fits(model: Any, info: Any, what: str) -> None:
    """A checkpoint's input shape and class count must fit the dataset's, else one line before any work."""
    kw = (getattr(model, "qrobust_arch", None) or {}).get("kwargs", {})
    shape = tuple(info.input_shape) if getattr(info, "input_shape", None) else None
    c, size = kw.get("in_channels"), kw.get("input_size")
    if shape and ((c is not None and c != shape[0]) or (size is not None and size != shape[1])):
        trained = (getattr(model, "qrobust_meta", {}).get("metadata") or {}).get("dataset")
        hint = f" (--dataset {trained})" if trained else ""
        raise InputError(
            f"{what} takes {c}×{size}×{size} images but {info.name} images are "
            f"{'×'.join(map(str, shape))}: use it on the dataset it was trained on{hint}"
        )
    classes = kw.get("num_classes")
    if classes is not None and info.num_classes is not None and info.num_classes > classes:
        raise InputError(f"{what} has {classes} outputs but {info.name} has {info.num_classes} classes: use a "
                         f"model made for {info.name}")
