"""Packed low-bit checkpoints: every quantized weight at its bit-width (4-bit two per byte, 2-bit four, 1-bit
eight, any b in 1–8 as a b-bit stream), loadable back to the same fake-quant graph with identical outputs.

The file is a qrobust checkpoint (:mod:`qrobust.checkpoint`'s safetensors format, digests and JSON header),
in which each quantized ``<layer>.weight`` is replaced by

* ``<layer>.weight.__packed`` — the unsigned b-bit codes ``(k − k_min)/stride`` of
  :func:`qrobust.export.integers.weight_codes`, bit-packed (``⌈n·b/8⌉`` bytes);
* ``<layer>.weight.__scale`` — one float32 per output channel for the schemes whose scale comes from the
  weights (uniform, binary); LSQ's step is already the quantizer's own state-dict entry and DoReFa needs none.

Everything else (biases, BatchNorm, PACT α, LSQ steps, the input normalisation) is stored as in a normal
checkpoint, so the file's size is what the bits say plus those float32 numbers and the header.

Loading rebuilds the architecture and spec from the header and gives each layer a *latent* float weight that
its quantizer maps to exactly the stored integers: ``k·s`` (uniform: the channel's largest ``|k|`` set to the
float whose ``/ q_max`` is exactly ``s``; binary: magnitudes within a few ulps of α, drawn until ``mean|w|`` is
exactly α), ``atanh(½(2r/n − 1))``
for DoReFa. The latent weights are not the trained ones — only their quantized values are kept, which is all
the fake-quant graph computes with, so fine-tuning resumes from the quantized point. A SHA-256 of the
fake-quantized weights is recorded at saving and checked at loading: a file that would load to a different
function is a CheckpointError.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qrobust.checkpoint import build_from_meta, load_state_into, read_tensors, resolve_checkpoint, save_tensors
from qrobust.errors import CheckpointError, ConfigError, ExportError
from qrobust.export.integers import WeightCodes, weight_codes
from qrobust.quant import QuantConv2d, QuantLinear, is_quantized
from qrobust.quant.quantizers import BinaryWeightQuantizer, DoReFaWeightQuantizer, UniformWeightQuantizer

__all__ = ["PACKED_KEY", "load_packed", "pack_bits", "packed_size_report", "save_packed", "unpack_bits"]

log = logging.getLogger(__name__)

PACKED_KEY = "packed"
_PACKED, _SCALE = ".__packed", ".__scale"


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit integers (any shape) as a uint8 bit stream of ``⌈n·bits/8⌉`` bytes.

    >>> pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist()   # 01 10 11 00
    [108]
    """
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    planes = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits:]  # most significant of the b bits first
    return torch.from_numpy(np.packbits(planes.reshape(-1)).copy())


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``n`` codes (int64).

    >>> unpack_bits(torch.tensor([108], dtype=torch.uint8), 2, 4).tolist()
    [1, 2, 3, 0]
    """
    stream = np.unpackbits(packed.numpy())[: n * bits].reshape(n, bits)
    full = np.zeros((n, 8), dtype=np.uint8)
    full[:, 8 - bits:] = stream
    return torch.from_numpy(np.packbits(full, axis=1)[:, 0].astype(np.int64))


def _wq_digest(model: nn.Module) -> str:
    """SHA-256 over the fake-quantized weight of every quantized layer (what the graph computes with)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quant is not None:
                h.update(name.encode())
                h.update(m.weight_quant(m.weight.detach().float()).contiguous().numpy().tobytes())
    return h.hexdigest()


def _quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quant is not None]


def save_packed(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Save the quantized ``model`` with its weights packed at their bit-widths (see the module docstring).

    The model must be rebuildable from its header (a registry model: ``qrobust_arch``). Returns the path.
    """
    if not isinstance(model, nn.Module) or not is_quantized(model):
        raise ConfigError("save_packed stores a quantized model's integer weights; quantize the model first")
    if getattr(model, "qrobust_arch", None) is None or getattr(model, "qrobust_composite", None) is not None:
        raise ConfigError("save_packed needs a registry model (build_model(...), quantized): a packed file is "
                          "rebuilt from its architecture record; save a model of your own with qrobust.save")
    state = {k: v for k, v in model.state_dict().items()}
    packed: dict[str, Any] = {}
    for name, m in _quant_layers(model):
        codes = weight_codes(m, name)
        key = f"{name}.weight"
        del state[key]
        state[key + _PACKED] = pack_bits(codes.codes, codes.bits)
        if isinstance(m.weight_quant, (UniformWeightQuantizer, BinaryWeightQuantizer)):
            state[key + _SCALE] = codes.scale.float()
        packed[key] = {"bits": codes.bits, "scheme": codes.scheme, "shape": list(m.weight.shape),
                       "k_min": codes.k_min, "stride": codes.stride}
    meta = {
        "arch": model.qrobust_arch,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "spec": getattr(model, "qrobust_spec", None),
        "metadata": metadata,
        PACKED_KEY: {"layers": packed, "quantized_weights_sha256": _wq_digest(model)},
    }
    path = Path(path)
    save_tensors(path, state, meta)
    return path


def _nudged(target: float, fn: Any, start: float) -> float | None:
    """A float32 ``v`` near ``start`` with ``fn(v) == target`` (searching ±64 ulps), else None."""
    t = torch.tensor(start, dtype=torch.float32)
    up, down = t.clone(), t.clone()
    for _ in range(65):
        for v in (up, down):
            if fn(v) == target:
                return float(v)
        up = torch.nextafter(up, torch.tensor(math.inf))
        down = torch.nextafter(down, torch.tensor(-math.inf))
    return None


def _latent(layer: nn.Module, codes: WeightCodes, name: str) -> torch.Tensor:
    """A float weight that ``layer``'s quantizer maps to exactly ``codes`` (see the module docstring)."""
    q = layer.weight_quant
    k = codes.k
    shape = (-1,) + (1,) * (k.dim() - 1)
    if isinstance(q, DoReFaWeightQuantizer):
        n = 2**codes.bits - 1
        r = (k + n) // 2
        return torch.atanh(0.5 * (2.0 * r.double() / n - 1.0)).float()
    w = (k.float() * codes.scale.view(shape)).float()
    if isinstance(q, UniformWeightQuantizer):
        qmax = codes.k_max
        groups = range(k.shape[0]) if q.per_channel and k.dim() > 1 else [None]
        for c in groups:
            kc = k if c is None else k[c]
            s = codes.scale[0 if c is None else c]
            top = kc.abs() == kc.abs().max()
            if int(kc.abs().max()) != qmax:  # an all-zero channel: scale = tiny, nothing to match
                continue
            v = _nudged(float(s), lambda t: float(t / qmax), float(s) * qmax)
            if v is None:
                raise CheckpointError(f"{name}: no float32 reproduces the stored scale {float(s)!r}")
            sel = w if c is None else w[c]
            sel[top] = torch.sign(kc[top].float()) * v
    elif isinstance(q, BinaryWeightQuantizer):  # magnitudes α·(1 + jitter of a few ulps), drawn until mean|w|
        dims = tuple(range(1, k.dim()))  # — as the quantizer reduces it — is exactly the stored α (the
        gen = torch.Generator().manual_seed(0)  # reduction's rounding makes ±α alone miss it by a few ulps)
        tries = 256
        for c in range(k.shape[0]):
            alpha = codes.scale[c].float()
            ulp = torch.nextafter(alpha, alpha + 1) - alpha
            shift = torch.linspace(-8, 8, tries).view((tries,) + (1,) * (k.dim() - 1)) * ulp
            jitter = (torch.rand((tries, *k[c].shape), generator=gen) - 0.5) * (16 * ulp)
            cand = (alpha + shift + jitter).clamp_min(torch.finfo(torch.float32).tiny)
            means = cand.mean(dim=dims) if dims else cand
            hits = (means == alpha).nonzero()
            if not len(hits):
                raise CheckpointError(f"{name}: no float32 weights reproduce the stored binary scale α of channel "
                                      f"{c}")
            w[c] = k[c].float() * cand[int(hits[0])]
    return w


def load_packed(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The fake-quant model of a packed checkpoint (eval mode), its quantized weights exactly the stored ones."""
    tensors, meta = read_tensors(path)
    info = meta.get(PACKED_KEY)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} is a qrobust checkpoint but not a packed one: load it with qrobust.load")
    net = build_from_meta(meta)
    modules = dict(net.named_modules())
    state = {k: v for k, v in tensors.items() if not k.endswith((_PACKED, _SCALE))}
    for key, rec in info["layers"].items():
        name = key[: -len(".weight")]
        layer = modules.get(name)
        if layer is None or not isinstance(layer, (QuantConv2d, QuantLinear)) or layer.weight_quant is None:
            raise CheckpointError(f"{path}: packed layer {name!r} is not a quantized layer of the rebuilt model")
        shape = tuple(rec["shape"])
        n = int(np.prod(shape))
        codes = unpack_bits(tensors[key + _PACKED], int(rec["bits"]), n).reshape(shape)
        k = codes * int(rec["stride"]) + int(rec["k_min"])
        if key + _SCALE in tensors:
            scale = tensors[key + _SCALE].float()
        elif isinstance(layer.weight_quant, DoReFaWeightQuantizer):
            scale = torch.full((shape[0],), 1.0 / (2 ** int(rec["bits"]) - 1))
        else:  # LSQ: the step is the quantizer's own entry
            scale = tensors[f"{name}.weight_quant.step"].float().reshape(-1).expand(shape[0])
        wc = WeightCodes(k, scale, int(rec["bits"]), rec["scheme"], int(rec["k_min"]), 0, int(rec["stride"]))
        state[key] = _latent(layer, wc, name)
    load_state_into(net, state, source=str(resolve_checkpoint(path)))
    if _wq_digest(net) != info.get("quantized_weights_sha256"):
        raise CheckpointError(f"{path}: the unpacked weights do not quantize to the saved ones (digest mismatch); "
                              "the file is corrupt or was written by an incompatible qrobust")
    net.qrobust_meta = meta
    return net.to(map_location).eval()


def packed_size_report(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Bytes on disk of a packed file against what the bits say: ``{"file_bytes", "weight_bytes"
    (Σ ⌈n·b/8⌉), "float32_bytes" (every other stored tensor), "ideal_bytes", "overhead_bytes"}``."""
    tensors, _ = read_tensors(path)
    weight = sum(t.numel() for k, t in tensors.items() if k.endswith(_PACKED))
    other = sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.endswith(_PACKED))
    size = Path(path).stat().st_size
    ideal = sum(math.ceil(m.weight.numel() * m.weight_bits / 8) for _, m in _quant_layers(model))
    if ideal != weight:
        raise ExportError(f"{path}: the packed weights take {weight} bytes, the bits say {ideal}")
    return {"file_bytes": size, "weight_bytes": weight, "float32_bytes": other, "ideal_bytes": weight + other,
            "overhead_bytes": size - weight - other}
