"""The integers behind a fake-quantized weight: ``w_q = k · scale_c`` with ``k`` an integer per weight and one
scale per output channel — the one decomposition the ONNX export and the packed checkpoint both store.

Per weight scheme (see :mod:`qrobust.quant.quantizers`):

=======================  ==========================================  ===========================  =========
scheme                   k                                           scale                        levels
=======================  ==========================================  ===========================  =========
uniform(_per_channel)    −(2^(b−1)−1) … 2^(b−1)−1                    max|w| / (2^(b−1)−1)          2^b − 1
lsq                      −2^(b−1) … 2^(b−1)−1                        the learned step              2^b
dorefa                   odd −n, −n+2 … n, n = 2^b − 1               1/n (levels 2r/n − 1)         2^b
binary (1 bit)           −1, +1                                      α_c = mean |w_c|              2
=======================  ==========================================  ===========================  =========

``code = (k − k_min) / stride`` is the unsigned b-bit number a packed checkpoint stores (DoReFa's k moves in
steps of 2, so its code is the level index r). The decomposition is recomputed from the fake-quantized weight
the layer computes with and checked against it, so what is stored is what the simulation used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qrobust.errors import ExportError
from qrobust.quant.layers import QuantConv2d, QuantLinear
from qrobust.quant.quantizers import (
    BinaryWeightQuantizer,
    DoReFaWeightQuantizer,
    LSQWeightQuantizer,
    UniformWeightQuantizer,
)

__all__ = ["WeightCodes", "weight_codes"]


@dataclass
class WeightCodes:
    """``weight = k · scale`` (scale broadcast over the output channel, dim 0)."""

    k: torch.Tensor  # int64, the weight's shape
    scale: torch.Tensor  # float32, (C_out,)
    bits: int
    scheme: str
    k_min: int
    k_max: int
    stride: int = 1

    @property
    def codes(self) -> torch.Tensor:
        """Unsigned b-bit codes ``(k − k_min) / stride`` (uint8)."""
        return ((self.k - self.k_min) // self.stride).to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.k.dim() - 1)
        return self.k.to(torch.float32) * self.scale.view(shape)


def _per_channel(value: torch.Tensor | float, channels: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).detach().reshape(-1)
    return t.expand(channels).clone() if t.numel() == 1 else t.clone()


@torch.no_grad()
def weight_codes(layer: nn.Module, name: str = "") -> WeightCodes:
    """The integer weights and per-channel scales of a quantized Conv2d/Linear (ExportError if it has none)."""
    if not isinstance(layer, (QuantConv2d, QuantLinear)) or layer.weight_quant is None:
        raise ExportError(f"layer {name!r} has float weights: it has no integer form")
    q = layer.weight_quant
    w = layer.weight.detach().float()
    w_q = q(w).detach()
    c = w.shape[0]
    bits = layer.weight_bits
    stride = 1
    if isinstance(q, UniformWeightQuantizer):
        k_max = 2 ** (bits - 1) - 1
        k_min = -k_max
        dims = tuple(range(1, w.dim()))
        m = w.abs().amax(dim=dims) if q.per_channel and w.dim() > 1 else w.abs().amax()
        scale = _per_channel((m / k_max).clamp_min(torch.finfo(w.dtype).tiny), c)
    elif isinstance(q, LSQWeightQuantizer):
        k_min, k_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = _per_channel(q.step.detach().clamp_min(1e-8), c)
    elif isinstance(q, DoReFaWeightQuantizer):
        n = 2**bits - 1
        k_min, k_max, stride = -n, n, 2
        scale = _per_channel(1.0 / n, c)
    elif isinstance(q, BinaryWeightQuantizer):
        k_min, k_max, stride = -1, 1, 2
        dims = tuple(range(1, w.dim()))
        scale = _per_channel(w.abs().mean(dim=dims) if w.dim() > 1 else w.abs().mean(), c)
    else:  # pragma: no cover - every weight quantizer of qrobust is listed above
        raise ExportError(f"layer {name!r}: weight scheme {q.scheme!r} has no integer form in the exporter")
    shape = (-1,) + (1,) * (w.dim() - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).view(shape)
    k = torch.round(w_q / safe).to(torch.int64)
    k = torch.where((scale > 0).view(shape).expand_as(k), k, torch.zeros_like(k))
    codes = WeightCodes(k, scale, bits, q.scheme, k_min, k_max, stride)
    err = (codes.dequantize() - w_q).abs().max().item() if w_q.numel() else 0.0
    tol = 1e-5 * max(float(w_q.abs().max()) if w_q.numel() else 0.0, 1e-30)
    if err > tol or int(k.min()) < k_min or int(k.max()) > k_max or bool(((k - k_min) % stride != 0).any()):
        raise ExportError(
            f"layer {name!r}: its {bits}-bit {q.scheme} weights are not integers times one scale per channel "
            f"(error {err:.3g}); this is a bug in the exporter — please report it with the checkpoint"
        )
    return codes
