"""A quantized model as an ONNX QDQ graph run by onnxruntime: integer weights, the learned scales, checked.

:func:`to_onnx` traces the model (torch.fx, :func:`qrobust.quant.sites.trace`) and writes each node as ONNX:

* **weights** — every quantized Conv2d/Linear becomes an 8-bit integer initializer ``k`` and a
  ``DequantizeLinear`` with one scale per output channel (:mod:`qrobust.export.integers`: uniform and
  per-channel scales as computed from the weights, LSQ steps and binary α as learned, DoReFa's 1/n), so the
  graph holds exactly the integers the simulation used. A BatchNorm after a convolution is **folded** into
  the per-channel scale (``k`` is unchanged: ``γ/σ · k · s = k · (γ s/σ)``; a negative ``γ`` flips the sign
  of ``k``) and the bias. The first/last-layer bits and per-layer overrides are those of the layers
  themselves, so they are honoured by construction.
  Below 8 bits ``k`` is *stretched* towards the int8 range — stored as ``M·k`` with scale ``s/M``, ``M ≤ ⌊127 /
  max|k|⌋`` (18 at 4 bits, 127 at 2 and 1 bits; chosen per channel, see the bias below) — because an integer kernel
  adds the bias on its accumulator's grid ``s_x·s_w`` (int32): unstretched, that rounding is half a step of a coarse
  grid, a large fraction of an activation level at 2 bits (measured on digits: w2a2 agreement 89.7 % unstretched, 99.7
  % stretched; binary 86.6 % vs 100 %). The weights are stored as ``int8`` ``k`` where the layer's input has at most 7
  bits, and as ``uint8`` ``k + 128`` with zero point 128 after 8-bit (or signed) activations: onnxruntime's u8·s8
  kernels on x86 without VNNI sum pairs of products in saturating int16 (its documented "u8s8 overflow": 2·255·127 >
  2^15), which cost w8a8 digits 0.6 points of agreement (99.16 % vs 99.72 %); u8·u8 does not saturate, and 2·127·127 <
  2^15 cannot (``weight_dtype=`` forces one). A layer whose input is float — the first, reading the normalised image,
  which the simulation does not quantize either — has no integer kernel to run on: its weights are stored as the
  float32 values of their levels, exactly ``k·s`` (what a DequantizeLinear would compute), so that onnxruntime runs
  its fast float kernels there.
* **activations** — a ``QuantAct`` ReLU/ReLU6 with clip or PACT range [0, α] at b bits becomes
  ``QuantizeLinear(scale = α/(2^b − 1), zero point 0, uint8)`` → ``DequantizeLinear``; the saturation of
  uint8 is the ReLU. Below 8 bits a ``Clip`` on the *integers* (uint8 0 … 2^b − 1) sits between them: the
  values are held in int8/uint8 tensors (ONNX Runtime's integer kernels are 8-bit), which the metadata and
  the log say. Where the next layer reads such an activation, a second Q/DQ pair re-expresses its integers
  0…n as multiples of ``A = ⌊128/n⌋`` (scale ``s/A``: the same values, exactly), so that the integer kernel's
  int32 bias grid is ``s_x·s_w/(A·M)`` — at 4 bits 1/144 of the unstretched grid, which deep 4-bit networks
  need (an adversarially trained ResNet-20 w4a4: 96.3 % agreement unstretched, 99.9 % stretched;
  docs/deploy.md); ``2·A·n·127 < 2^15`` keeps u8·s8 kernels from saturating, so the weights stay int8.
  A binary (sign) activation is exported exactly, as a comparison —
  ``Where(x ≥ 0, +1, −1)`` — followed by a Q/DQ pair of scale 1 (±1 are integers), so the next layer reads
  integers too.
* **the rest** — a max-pool right after an activation quantizer runs before it (max-pooling commutes with a
  monotone quantizer: the same values, a quarter of them to quantize, onnxruntime's fast float pooling);
  the input ``Normalize`` (``Sub``/``Div``), other max-pooling, flatten, slicing and zero padding
  (ResNet's option-A shortcut) keep their input's integer grid (a Q/DQ pair with the same scale follows, so
  onnxruntime can run them on integers), additions and average pooling are float, as in the simulation.
  The first convolution reads the normalised float input (the simulation does not quantize it either).

Anything else — an op or module the exporter has no mapping for, a signed activation (SiLU, GELU …),
8-bit DoReFa weights (255 odd levels ±k/255 do not fit int8) — is an :class:`~qrobust.errors.ExportError`
naming it; a layer the spec left at 32 bits is exported in float and *named* in the log and the metadata.
Nothing silently runs in float.

**The bias.** A convolution whose output goes straight into an activation quantizer is run by onnxruntime as
QLinearConv, which adds an int32 bias ``B`` on its accumulator's grid ``g = s_x·s_w`` — a bias off that grid
moves every pre-activation of the channel by the same ``e = B·g − b``. Trained quantized networks put many
pre-activations at the *same* value (a constant image region gives the same integer sum), and some such value
lies a hair from a level boundary: in the zoo's CIFAR-10 ResNet-20 w4a4 one channel of the first block holds
1.5·10⁻⁵ levels above one on 1.5 activations per image, and the plain rounding of ``B`` flipped them all — 1.7 %
of test predictions (98.3 % agreement). So the exporter writes ``B`` itself (``DequantizeLinear(int32 B,
s_x·s_w)``), choosing per channel the weight stretch ``M`` (any ``M ≤ ⌊127/max|k|⌋`` stores the weights
exactly) and the rounding direction that flip the fewest *calibration* pre-activations within
:data:`TIE_WINDOW` of a boundary (:func:`_fit_bias`); and where no choice avoids a flip, and agreement improves
by it, the layer runs as ``ConvInteger`` — the same exact int32 sums — with the scale and the bias applied in
float as the simulation applies them (one layer in that ResNet: 100 % agreement on 1,000 calibration and 1,000
held-out images). Other convolutions (those feeding a float residual addition, the classifier) run in float
with the exact float bias.

**Agreement.** The graph is run by onnxruntime on the calibration images before anything is written and
compared with the fake-quant model: the fraction of equal predictions, the largest logit difference. What can
differ is only rounding — ``QuantizeLinear`` divides by the scale where the simulation multiplies by
its float32 reciprocal, the folded BatchNorm changes the last bits, the int32 bias is off the float one by
``|e| < TIE_WINDOW`` levels (above), float sums round where integer kernels accumulate exactly. The graph *as
written* (fusions off, ``onnx_session(optimize=False)``: DequantizeLinear and float convolutions) is measured
too (``agreement["graph_reference"]``). Each such difference moves an activation by at most one level, and
only when its pre-activation lies within rounding of a boundary; a prediction changes only if that reaches the
argmax. So a correct export agrees on all but a few in ten thousand predictions, while any real mistake (a
wrong scale, layout or range) changes a large fraction of them. :data:`DEFAULT_MIN_AGREEMENT` = 0.99
separates the two with a wide margin on both sides: below it the export is refused (nothing is written).
"""

from __future__ import annotations

import copy
import json
import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from qrobust._version import __version__
from qrobust.errors import ConfigError, ExportError
from qrobust.export.integers import weight_codes
from qrobust.models.layers import Normalize
from qrobust.quant import QuantAct, QuantConv2d, QuantLinear, describe, is_quantized, size_totals
from qrobust.quant.quantizers import ClipActQuantizer, PACTActQuantizer, RangeActQuantizer, SignActQuantizer
from qrobust.quant.sites import trace
from qrobust.utils import atomic_write_bytes, atomic_write_text, eval_mode
from qrobust.validation import check_choice

__all__ = [
    "DEFAULT_MIN_AGREEMENT", "FORMAT", "ExportResult", "format_onnx_description", "measure_agreement", "onnx_session",
    "read_onnx_metadata", "sidecar_path", "to_onnx",
]

log = logging.getLogger(__name__)

OPSET = 17
FORMAT = "qrobust-onnx/1"
METADATA_KEY = "qrobust"
#: the agreement (fraction of equal predictions on the calibration images) below which an export is refused
DEFAULT_MIN_AGREEMENT = 0.99
WEIGHT_DTYPES = ("auto", "uint8", "int8")
INSTALL_HINT = "install the deploy extra: pip install -e '.[deploy]' (onnx and onnxruntime)"


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or ExportError saying how to install them (deferred: an optional extra)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"ONNX export and deployment need the packages onnx and onnxruntime ({e}); "
                          f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


def onnx_session(model: Any, *, threads: int | None = None, optimize: bool = True) -> Any:
    """An onnxruntime CPU session of ``model`` (a path, bytes or an onnx ModelProto); ``threads`` intra-op
    threads (default: torch's thread count, so one-thread tests and benches stay on one thread).
    ``optimize=False`` runs the graph as written — DequantizeLinear, float convolutions — without
    onnxruntime's fusion into integer kernels: the reference semantics of the QDQ graph (slow)."""
    onnx, ort = require_onnx()
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------- the builder
@dataclass
class _Grid:
    """The value is ``DequantizeLinear(q, scale, zero_point)`` of integers q in [lo, hi]."""

    scale: float
    zero_point: int
    lo: int
    hi: int
    signed: bool

    @property
    def full(self) -> tuple[int, int]:
        return (-128, 127) if self.signed else (0, 255)


@dataclass
class _Value:
    name: str
    grid: _Grid | None = None
    #: the integer tensor (QuantizeLinear/Clip output) whose DequantizeLinear ``name`` is, where there is one
    codes: str | None = None


@dataclass
class _Builder:
    nodes: list[Any] = field(default_factory=list)
    inits: list[Any] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    counter: int = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}#{self.counter}"

    def const(self, base: str, array: Any) -> str:
        onnx, _ = require_onnx()
        name = self.fresh(base)
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        onnx, _ = require_onnx()
        out = self.fresh(base)
        self.nodes.append(onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def quant_dequant(self, x: str, grid: _Grid, base: str, *, clip: bool = True) -> _Value:
        dtype = np.int8 if grid.signed else np.uint8
        s = self.const(f"{base}.scale", np.float32(grid.scale))
        z = self.const(f"{base}.zero_point", dtype(grid.zero_point))
        q = self.node("QuantizeLinear", [x, s, z], f"{base}.q")
        if clip and (grid.lo, grid.hi) != grid.full:
            q = self.node("Clip", [q, self.const(f"{base}.lo", dtype(grid.lo)),
                                   self.const(f"{base}.hi", dtype(grid.hi))], f"{base}.clip")
        return _Value(self.node("DequantizeLinear", [q, s, z], f"{base}.dq"), grid, q)

    def keep_grid(self, out: str, source: _Value, base: str) -> _Value:
        """``out`` computed from ``source`` by an op that keeps its integer grid (max-pool, reshape, slice …)."""
        if source.grid is None:
            return _Value(out)
        return self.quant_dequant(out, source.grid, base, clip=False)


#: how close (in output levels) a calibration pre-activation must lie to a rounding boundary to be counted by
#: :func:`_fit_bias`; candidates that would move the channel's pre-activations further are not considered
TIE_WINDOW = 0.02


def _fit_bias(scale: torch.Tensor, bias: torch.Tensor, input_scale: float, most: int,
              target: tuple[float, torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each output channel's weight stretch ``M ∈ 1…most`` and int32 bias ``B`` (module docstring, "the bias").

    An integer kernel adds an int32 bias ``B`` on its accumulator's grid ``g = s_x·s_w/M``, so the channel's
    every pre-activation moves by the same ``e = B·g − b`` — and a level flips wherever a pre-activation lies
    between a rounding boundary and that boundary moved by ``e``. Trained quantized networks put many
    pre-activations at the *same* value (constant image regions give the same integer sum), some within
    10⁻⁵ of a level's boundary, so a flip is systematic, not rare. Any ``M`` stores the weights exactly
    (``M·k`` with scale ``s/M``) and ``B`` may be rounded either way, so both are free: this picks, per
    channel, the pair that flips the fewest ``target`` pre-activations — ``(s_y, channels, d)``: the output
    quantizer's step and the calibration pre-activations' signed distances ``d`` to their nearest boundary,
    in levels, where ``|d| < TIE_WINDOW`` — then the smallest ``|e|``, then the largest ``M``.
    Returns ``(M, B, bias scale float64 (C,), e in output levels (C,), flips (C,))``; the scales are float32
    values, as stored. A channel where every pair flips some (``flips > 0``) makes the layer a ConvInteger.
    """
    channels = scale.shape[0]
    m = torch.arange(most, 0, -1, dtype=torch.float64)  # largest first: argmin keeps the first of equal scores
    sx = float(np.float32(input_scale))
    sw = (scale.double()[:, None] / m[None, :]).float().double()  # the stored float32 weight scale per M
    grid = torch.from_numpy((np.float32(sx) * sw.numpy().astype(np.float32)).astype(np.float64))  # (C, most)
    b = bias.double()[:, None, None]
    lo = torch.floor(b[..., 0] / grid)
    cand = torch.stack([lo, lo + 1], dim=-1)  # (C, most, 2) integers
    err = cand * grid[..., None] - b  # (C, most, 2), in bias units
    step, chans, d = target
    err = err / step
    flips = torch.where(err.abs() < TIE_WINDOW, torch.zeros_like(err), torch.full_like(err, float("inf")))
    order = torch.argsort(chans)
    chans, d = chans[order], d[order].double()
    counts = torch.bincount(chans, minlength=channels).tolist()
    for c, dc in enumerate(torch.split(d, counts)):
        if dc.numel() == 0:
            continue
        e = err[c].reshape(-1, 1)  # (most·2, 1)
        crossed = ((dc >= 0) & (dc + e < 0)) | ((dc < 0) & (dc + e >= 0))
        flips[c] += crossed.sum(dim=1).reshape(most, 2).double()
    score = flips + err.abs().clamp_max(0.999)
    best = score.reshape(channels, -1).argmin(dim=1)
    mi, bi = best // 2, best % 2
    r = torch.arange(channels)
    stretch = m[mi].long()
    codes = cand[r, mi, bi].long()
    if int(codes.abs().max()) >= 2**31:
        raise ExportError("a bias does not fit int32 on its integer kernel's grid; this layer cannot be exported")
    return stretch, codes, grid[r, mi], err[r, mi, bi], flips[r, mi, bi]


def _levels(m: QuantAct) -> tuple[int, int] | None:
    """The integer levels ``(lo, hi)`` of an activation quantizer the exporter writes as QuantizeLinear — a
    ReLU/ReLU6 clip or PACT range (0 … 2^b − 1) or an addition operand's symmetric one (−2^(b−1) … 2^(b−1) − 1)
    — or None."""
    q = m.act_quant
    if m.kind in ("relu", "relu6") and isinstance(q, (ClipActQuantizer, PACTActQuantizer)):
        return 0, 2**m.bits - 1
    if m.kind == "identity" and isinstance(q, RangeActQuantizer):
        return q.qmin, q.qmax
    return None


def _act_step(m: QuantAct) -> float:
    """The step of an activation quantizer :func:`_levels` maps, as the simulation computes it."""
    q = m.act_quant
    if isinstance(q, RangeActQuantizer):
        return float(q.scale)
    n = 2**m.bits - 1
    if isinstance(q, PACTActQuantizer):
        return float(q.alpha.detach().float().clamp_min(1e-8) / n)  # as pact_quantize computes it, in float32
    return float(torch.tensor(float(q.alpha) / n, dtype=torch.float32))  # as fake_quant_q does


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def _bn_fold(bn: nn.BatchNorm2d, channels: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g, mean, beta)`` in float64 with ``BN(z) = g·(z − mean) + beta``."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"BatchNorm {name!r} keeps no running statistics: it cannot be folded for deployment")
    var = bn.running_var.detach().double()
    g = 1.0 / torch.sqrt(var + bn.eps)
    if bn.affine:
        g = g * bn.weight.detach().double()
        beta = bn.bias.detach().double()
    else:
        beta = torch.zeros(channels, dtype=torch.float64)
    return g, bn.running_mean.detach().double(), beta


class _Exporter:
    def __init__(self, model: nn.Module, weight_dtype: str, calib: torch.Tensor | None = None,
                 batch_size: int = 256, *, targets: dict | None = None, exact: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.weight_dtype = weight_dtype
        self.calib = calib
        self.batch_size = batch_size
        self.b = _Builder()
        self.modules = dict(model.named_modules())
        #: conv node → (its output quantizer's step, calibration ties) where an integer kernel adds its bias
        #: (given: those of an earlier build of the same graph)
        self.targets: dict[fx.Node, tuple[float, torch.Tensor, torch.Tensor]] = targets if targets is not None else {}
        self._have_targets = targets is not None
        #: convolutions to run as ConvInteger with a float bias (:meth:`_conv_integer`)
        self.exact = exact

    def _collect_targets(self, graph: fx.Graph, folds: dict) -> None:
        """For each convolution whose output (BatchNorm folded) goes straight into a ReLU activation quantizer —
        the layers onnxruntime runs as QLinearConv, adding an int32 bias — the calibration pre-activations
        within :data:`TIE_WINDOW` levels of a rounding boundary (channel, signed distance)."""
        if self.calib is None or self._have_targets:
            return
        sites: dict[str, fx.Node] = {}
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(self.modules[str(node.target)], nn.Conv2d):
                continue
            if not isinstance(self.modules[str(node.target)], QuantConv2d):
                continue
            out = folds.get(node, node)
            if len(out.users) != 1:
                continue
            (user,) = out.users
            act = self.modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(act, QuantAct) and _levels(act) is not None:
                sites[str(user.target)] = node
        if not sites:
            return
        found: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in sites}
        steps = {k: _act_step(self.modules[k]) for k in sites}

        def hook(name: str) -> Any:
            lo, hi = _levels(self.modules[name])

            def pre(_mod: nn.Module, args: tuple) -> None:
                u = args[0].detach().double() / steps[name]
                d = u - (torch.floor(u).clamp(lo, hi - 1) + 0.5)
                near = (d.abs() < TIE_WINDOW).nonzero()
                found[name].append((near[:, 1], d[tuple(near.t())].float()))
            return pre

        handles = [self.modules[k].register_forward_pre_hook(hook(k)) for k in sites]
        try:
            with torch.no_grad():
                for xb in self.calib.split(self.batch_size):
                    self.model(xb)
        finally:
            for h in handles:
                h.remove()
        for k, conv in sites.items():
            chans = torch.cat([c for c, _ in found[k]]) if found[k] else torch.zeros(0, dtype=torch.long)
            d = torch.cat([v for _, v in found[k]]) if found[k] else torch.zeros(0)
            self.targets[conv] = (steps[k], chans, d)

    # ---- weights
    def _weight(self, layer: nn.Module, name: str, fold: torch.Tensor | None, x: _Value,
                bias: torch.Tensor | None = None, target: tuple[float, torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[str, torch.Tensor, dict, tuple[torch.Tensor, torch.Tensor] | None]:
        """A DequantizeLinear of the 8-bit weight (scale folded with ``fold``) → (name, scale float64, row,
        the int32 bias and its scale or None). ``bias`` — the (folded) bias the layer adds; ``target`` — where
        an integer kernel will add it, the output quantizer's step and the calibration pre-activations near its
        boundaries (:func:`_fit_bias`), which then choose each channel's stretch and int32 bias."""
        b = self.b
        if isinstance(layer, (QuantConv2d, QuantLinear)) and layer.weight_quant is not None:
            codes = weight_codes(layer, name)
            k = codes.k.clone()
            scale = codes.scale.double()
            if fold is not None:
                scale = scale * fold
            shape = (-1,) + (1,) * (k.dim() - 1)
            k = torch.where((scale < 0).view(shape), -k, k)
            scale = scale.abs()
            zero = scale == 0
            scale = torch.where(zero, torch.ones_like(scale), scale)  # an all-zero channel: k is 0 there
            levels = f"{codes.k_min}…{codes.k_max}" + (" step 2" if codes.stride == 2 else "")
            if x.grid is None:  # a float input (the first layer): no integer kernel reads it, see the docstring
                values = k.float() * scale.float().view(shape)  # exactly what DequantizeLinear computes
                row = {"weight_bits": codes.bits, "scheme": codes.scheme, "levels": levels, "stretch": 1,
                       "storage": "float32 (its levels k·s exactly: the input is float)", "scales": int(k.shape[0])}
                return b.const(f"{name}.weight_levels", values.numpy()), torch.empty(0), row, None
            most = max(1, 127 // max(-codes.k_min, codes.k_max))  # see the module docstring
            if bias is not None and target is not None:
                stretch, bias_codes, bias_scale, bias_err, flips = _fit_bias(scale, bias, x.grid.scale, most,
                                                                              target)
            else:
                stretch = torch.full((k.shape[0],), most, dtype=torch.long)
            k, scale = k * stretch.view(shape), scale / stretch
            if int(k.min()) < -128 or int(k.max()) > 127:
                raise ExportError(
                    f"layer {name!r}: its {codes.bits}-bit {codes.scheme} weights need integers in "
                    f"[{int(k.min())}, {int(k.max())}], outside int8 (8-bit DoReFa has 255 odd levels ±k/255, "
                    "and an 8-bit LSQ weight of −128 under a negative BatchNorm γ flips to +128); use "
                    "uniform_per_channel weights at 8 bits"
                )
            dtype = self.weight_dtype
            if dtype == "auto":  # u8·s8 is safe from int16 saturation when 2·hi·127 < 2^15 (activations ≤ 7 bits)
                dtype = "int8" if not x.grid.signed and 2 * x.grid.hi * 127 < 2**15 else "uint8"
            if dtype == "uint8":  # k + 128 with zero point 128 (see the module docstring)
                w = b.const(f"{name}.weight_uint8", (k.numpy() + 128).astype(np.uint8))
                z = b.const(f"{name}.weight_zero_point", np.full(k.shape[0], 128, dtype=np.uint8))
            else:
                w = b.const(f"{name}.weight_int8", k.numpy().astype(np.int8))
                z = b.const(f"{name}.weight_zero_point", np.zeros(k.shape[0], dtype=np.int8))
            s = b.const(f"{name}.weight_scale", scale.float().numpy())
            out = b.node("DequantizeLinear", [w, s, z], f"{name}.weight", axis=0)
            row = {"weight_bits": codes.bits, "scheme": codes.scheme,
                   "storage": "int8" if dtype == "int8" else "uint8 (k + 128, zero point 128)",
                   "levels": levels, "stretch": int(stretch.max()), "stretch_min": int(stretch.min()),
                   "scales": int(k.shape[0])}
            if bias is not None and target is not None:  # an integer kernel will add it: int32, chosen here
                row["bias"] = {"storage": "int32", "max_error_levels": float(bias_err.abs().max()),
                               "calibration_flips": int(flips.sum())}
                return out, scale.float().double(), row, (bias_codes, bias_scale)
            return out, scale.float().double(), row, None
        w = layer.weight.detach().double()
        if fold is not None:
            w = w * fold.view((-1,) + (1,) * (w.dim() - 1))
        self.b.float_layers.append(name)
        row = {"weight_bits": 32, "scheme": "float", "storage": "float32", "levels": "-", "scales": 0}
        return b.const(f"{name}.weight", w.float().numpy()), torch.empty(0), row, None

    def _bias(self, bias: torch.Tensor | None, name: str) -> str | None:
        """The float bias of a layer run on float kernels (an integer kernel's int32 bias: :func:`_fit_bias`)."""
        if bias is None:
            return None
        return self.b.const(f"{name}.bias", bias.float().numpy())

    def conv(self, node: fx.Node, x: _Value, bn: tuple[str, nn.BatchNorm2d] | None) -> _Value:
        name = str(node.target)
        m = self.modules[name]
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ExportError(f"convolution {name!r}: padding {m.padding!r} / padding_mode {m.padding_mode!r} is "
                              "not mapped; the exporter takes numeric zero padding")
        fold = None
        bias = m.bias.detach().double() if m.bias is not None else None
        if bn is not None:
            g, mean, beta = _bn_fold(bn[1], m.out_channels, bn[0])
            fold = g
            bias = ((bias if bias is not None else 0.0) - mean) * g + beta
        target = self.targets.get(node)
        ph, pw = _pair(m.padding)
        geometry = {"kernel_shape": _pair(m.kernel_size), "strides": _pair(m.stride), "pads": [ph, pw, ph, pw],
                    "dilations": _pair(m.dilation), "group": int(m.groups)}
        w, scale, row, bias_q = self._weight(m, name, fold, x, bias, target)
        if name in self.exact and bias_q is not None and x.codes is not None and not x.grid.signed:
            return self._conv_integer(m, name, fold, x, bias, geometry, row, bn)
        ins = [x.name, w]
        if bias_q is not None:  # DequantizeLinear(int32 B, s_x·s_w): what the integer kernel adds, exactly
            codes, bscale = bias_q
            ins.append(self.b.node("DequantizeLinear", [
                self.b.const(f"{name}.bias_int32", codes.numpy().astype(np.int32)),
                self.b.const(f"{name}.bias_scale", bscale.numpy().astype(np.float32)),
                self.b.const(f"{name}.bias_zero_point", np.zeros(codes.shape[0], dtype=np.int32))],
                f"{name}.bias", axis=0))
        else:
            bname = self._bias(bias, name)
            if bname is not None:
                ins.append(bname)
        out = self.b.node("Conv", ins, name, **geometry)
        self.b.layers.append({"name": name, "op": "Conv", **row, "batchnorm_folded": bn[0] if bn else None})
        return _Value(out)

    def _conv_integer(self, m: nn.Conv2d, name: str, fold: torch.Tensor | None, x: _Value,
                      bias: torch.Tensor | None, geometry: dict, fitted: dict, bn: tuple | None) -> _Value:
        """The convolution as ``ConvInteger`` (exact int32 sums of the integers) with a float epilogue —
        ``acc · s_x·s_w + b`` — for a layer whose int32 bias, however rounded, would flip calibration
        pre-activations that lie a hair from a level boundary (:func:`_fit_bias`): the sums are the integer
        kernel's, the bias is added in float as the simulation adds it. Slower than QLinearConv (about a float
        convolution's time), so only where needed."""
        b = self.b
        codes = weight_codes(m, name)
        k = codes.k.clone()
        scale = codes.scale.double() * (fold if fold is not None else 1.0)
        shape = (-1,) + (1,) * (k.dim() - 1)
        k = torch.where((scale < 0).view(shape), -k, k)
        scale = scale.abs()
        assert x.grid is not None and x.codes is not None
        w = b.const(f"{name}.weight_uint8", (k.numpy() + 128).astype(np.uint8))
        acc = b.node("ConvInteger", [x.codes, w, b.const(f"{name}.input_zero_point", np.uint8(x.grid.zero_point)),
                                     b.const(f"{name}.weight_zero_point", np.uint8(128))], f"{name}.acc",
                     **geometry)
        y = b.node("Cast", [acc], f"{name}.float", to=1)
        channel = (1, -1, 1, 1)
        y = b.node("Mul", [y, b.const(f"{name}.acc_scale", (scale * x.grid.scale).float().numpy().reshape(channel))],
                   f"{name}.scaled")
        if bias is not None:
            y = b.node("Add", [y, b.const(f"{name}.bias", bias.float().numpy().reshape(channel))], name)
        row = {**fitted, "storage": "uint8 (k + 128, zero point 128)", "stretch": 1, "stretch_min": 1,
               "kernel": "ConvInteger + float bias",
               "bias": {"storage": "float32", "why": f"an int32 bias would flip "
                        f"{fitted['bias']['calibration_flips']} calibration pre-activations near a level boundary"}}
        b.layers.append({"name": name, "op": "ConvInteger", **row, "batchnorm_folded": bn[0] if bn else None})
        return _Value(y)

    def linear(self, node: fx.Node, x: _Value) -> _Value:
        name = str(node.target)
        m = self.modules[name]
        bias = m.bias.detach().double() if m.bias is not None else None
        w, scale, row, _ = self._weight(m, name, None, x)
        ins = [x.name, w]
        bname = self._bias(bias, name)
        if bname is not None:
            ins.append(bname)
        out = self.b.node("Gemm", ins, name, transB=1)
        self.b.layers.append({"name": name, "op": "Gemm", **row, "batchnorm_folded": None})
        return _Value(out)

    # ---- activations
    def act(self, node: fx.Node, x: _Value) -> _Value:
        name = str(node.target)
        m: QuantAct = self.modules[name]
        q = m.act_quant
        if q is None:
            self.b.float_layers.append(name)
            self.b.layers.append({"name": name, "op": "Relu", "act_bits": 32, "scheme": "float", "storage": "float32"})
            if m.kind == "relu":
                return _Value(self.b.node("Relu", [x.name], name))
            if m.kind == "relu6":
                return _Value(self.b.node("Clip", [x.name, self.b.const(f"{name}.lo", np.float32(0)),
                                                   self.b.const(f"{name}.hi", np.float32(6))], name))
            raise ExportError(f"activation {name!r}: a float {m.kind} is not mapped by the exporter")
        if isinstance(q, SignActQuantizer):
            cond = self.b.node("GreaterOrEqual", [x.name, self.b.const(f"{name}.zero", np.float32(0))],
                               f"{name}.ge")
            pm = self.b.node("Where", [cond, self.b.const(f"{name}.plus", np.float32(1)),
                                       self.b.const(f"{name}.minus", np.float32(-1))], f"{name}.sign")
            self.b.layers.append({"name": name, "op": "Sign", "act_bits": 1, "scheme": "sign",
                                  "storage": "int8 (±1)", "range": [-1.0, 1.0]})
            return self.b.quant_dequant(pm, _Grid(1.0, 0, -1, 1, True), name, clip=False)
        if m.kind == "identity" and isinstance(q, RangeActQuantizer):  # an addition operand (add_bits)
            scale, zero = _act_step(m), -q.qmin
            n = q.qmax - q.qmin
            self.b.layers.append({"name": name, "op": "QuantizeLinear", "act_bits": m.bits, "scheme": "symmetric",
                                  "storage": f"uint8 (zero point {zero}" + (f", 0…{n} by Clip)" if n < 255 else ")"),
                                  "range": list(q.range())})
            return self.b.quant_dequant(x.name, _Grid(scale, zero, 0, n, False), name)
        if m.kind not in ("relu", "relu6") or not isinstance(q, (ClipActQuantizer, PACTActQuantizer)):
            raise ExportError(
                f"activation {name!r}: a quantized {m.kind} ({type(q).__name__}) is not supported by the ONNX "
                "exporter, which maps ReLU/ReLU6 with clip or PACT ranges and sign activations; use relu "
                "activations for a model meant for deployment"
            )
        n = 2**m.bits - 1
        scale = _act_step(m)
        self.b.layers.append({"name": name, "op": "QuantizeLinear", "act_bits": m.bits, "scheme": q.scheme,
                              "storage": "uint8" + (f" (0…{n} by Clip)" if n < 255 else ""),
                              "range": [0.0, scale * n]})
        out = self.b.quant_dequant(x.name, _Grid(scale, 0, 0, n, False), name)
        stretch = max(1, 128 // n)  # A (module docstring): the next layer's int32 bias grid A× finer
        if stretch > 1:
            out = self.b.quant_dequant(out.name, _Grid(scale / stretch, 0, 0, n * stretch, False),
                                       f"{name}.stretch", clip=False)
        self.b.layers[-1]["act_stretch"] = stretch
        return out

    # ---- the graph
    def run(self, graph: fx.Graph, input_shape: tuple[int, ...]) -> Any:
        onnx, _ = require_onnx()
        b = self.b
        env: dict[fx.Node, _Value] = {}
        folds: dict[fx.Node, fx.Node] = {}  # conv node → its BatchNorm node
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[str(node.target)], nn.BatchNorm2d):
                src = node.args[0]
                if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                        and isinstance(self.modules[str(src.target)], nn.Conv2d)):
                    folds[src] = node
        bn_of_conv = {bn: conv for conv, bn in folds.items()}
        self._collect_targets(graph, folds)
        # max-pooling commutes with a monotone activation quantizer (round(clamp(x/s)) never reverses an order),
        # so a MaxPool right after a QuantAct used only by it runs first, in float, then is quantized: the same
        # values, a quarter of them to quantize, and onnxruntime's fast float pooling
        pooled_acts: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[str(node.target)], nn.MaxPool2d):
                src = node.args[0]
                if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                        and isinstance(self.modules[str(src.target)], QuantAct)
                        and self.modules[str(src.target)].act_quant is not None):
                    pooled_acts[node] = src
        deferred = set(pooled_acts.values())
        inputs: list[str] = []
        output: str | None = None
        for node in graph.nodes:
            where = f"node {node.name} ({node.format_node()})"
            if node.op == "placeholder":
                if inputs:
                    raise ExportError(f"the model's forward takes more than one input ({where}); the exporter "
                                      "takes forward(x)")
                inputs.append("input")
                env[node] = _Value("input")
            elif node.op == "output":
                arg = node.args[0]
                if not isinstance(arg, fx.Node):
                    raise ExportError(f"the model must return one logits tensor, it returns {arg!r}")
                output = env[arg].name
            elif node.op == "call_module" and node in deferred:
                continue  # emitted after the MaxPool that follows it
            elif node.op == "call_module" and node in pooled_acts:
                act = pooled_acts[node]
                pool = self._module(node, {**env, act: env[act.args[0]]}, folds, bn_of_conv)
                env[node] = self.act(act, pool)
            elif node.op == "call_module":
                env[node] = self._module(node, env, folds, bn_of_conv)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._function(node, env)
            else:
                raise ExportError(f"the exporter has no mapping for {where}")
        assert output is not None
        b.nodes.append(onnx.helper.make_node("Identity", [output], ["logits"], name="logits"))
        graph_proto = onnx.helper.make_graph(
            b.nodes, "qrobust",
            [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", *input_shape[1:]])],
            [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", None])],
            initializer=b.inits,
        )
        proto = onnx.helper.make_model(graph_proto, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                       producer_name="qrobust", producer_version=__version__)
        proto.ir_version = min(proto.ir_version, 9)
        onnx.checker.check_model(proto)
        return proto

    def _module(self, node: fx.Node, env: dict, folds: dict, bn_of_conv: dict) -> _Value:
        name = str(node.target)
        m = self.modules[name]
        x = env[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
        if x is None or len(node.args) != 1 or node.kwargs:
            raise ExportError(f"module {name!r} ({type(m).__name__}) is called with arguments the exporter does "
                              "not map; it takes module(x)")
        b = self.b
        if isinstance(m, nn.Conv2d):
            bn = folds.get(node)
            return self.conv(node, x, (str(bn.target), self.modules[str(bn.target)]) if bn is not None else None)
        if isinstance(m, nn.BatchNorm2d):
            if node in bn_of_conv:
                return x  # folded into the convolution before it
            raise ExportError(f"BatchNorm {name!r} does not directly follow a convolution used only by it, so it "
                              "cannot be folded; the exporter runs no float BatchNorm")
        if isinstance(m, nn.Linear):
            return self.linear(node, x)
        if isinstance(m, QuantAct):
            return self.act(node, x)
        if isinstance(m, Normalize):
            sub = b.node("Sub", [x.name, b.const(f"{name}.mean", m.mean.detach().float().numpy())], f"{name}.sub")
            return _Value(b.node("Div", [sub, b.const(f"{name}.std", m.std.detach().float().numpy())], name))
        if type(m) in (nn.Dropout, nn.Identity):
            return x
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise ExportError(f"max-pool {name!r} returns indices; not mapped")
            ph, pw = _pair(m.padding)
            attrs: dict[str, Any] = {"dilations": _pair(m.dilation)} if _pair(m.dilation) != [1, 1] else {}
            if m.ceil_mode:
                attrs["ceil_mode"] = 1
            if ph or pw:
                attrs["pads"] = [ph, pw, ph, pw]
            out = b.node("MaxPool", [x.name], name, kernel_shape=_pair(m.kernel_size),
                         strides=_pair(m.stride if m.stride is not None else m.kernel_size), **attrs)
            return b.keep_grid(out, x, f"{name}.grid")
        if type(m) is nn.AvgPool2d and m.divisor_override is None:
            ph, pw = _pair(m.padding)
            out = b.node("AveragePool", [x.name], name, kernel_shape=_pair(m.kernel_size),
                         strides=_pair(m.stride if m.stride is not None else m.kernel_size),
                         pads=[ph, pw, ph, pw], ceil_mode=int(m.ceil_mode),
                         count_include_pad=int(m.count_include_pad))
            return _Value(out)
        if type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) == [1, 1]:
            return _Value(b.node("GlobalAveragePool", [x.name], name))
        if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
            return b.keep_grid(b.node("Flatten", [x.name], name, axis=1), x, f"{name}.grid")
        raise ExportError(
            f"module {name!r} ({type(m).__name__}) has no mapping in the ONNX exporter (it maps Conv2d, Linear, "
            "QuantAct, BatchNorm after a convolution, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, "
            "Dropout, Identity and Normalize); it would have to run in float, which the exporter does not do "
            "silently"
        )

    def _function(self, node: fx.Node, env: dict) -> _Value:
        b = self.b
        target = node.target
        what = node.format_node()
        args = list(node.args)

        def val(a: Any) -> _Value:
            if not isinstance(a, fx.Node):
                raise ExportError(f"{what}: a constant operand where a tensor is expected is not mapped")
            return env[a]

        if node.op == "call_function" and target in (operator.add, torch.add) and len(args) == 2 and not node.kwargs:
            ins = [val(a).name if isinstance(a, fx.Node) else b.const(f"{node.name}.c", np.float32(a))
                   for a in args]
            return _Value(b.node("Add", ins, node.name))
        is_flatten = (node.op == "call_method" and target == "flatten") or (
            node.op == "call_function" and target is torch.flatten)
        if is_flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                raise ExportError(f"{what}: only flatten(1) (start_dim=1, end_dim=-1) is mapped")
            x = val(args[0])
            return b.keep_grid(b.node("Flatten", [x.name], node.name, axis=1), x, f"{node.name}.grid")
        if node.op == "call_function" and target is operator.getitem and isinstance(args[1], tuple) and all(
                isinstance(s, slice) for s in args[1]):
            x = val(args[0])
            starts, ends, axes, steps = [], [], [], []
            for axis, s in enumerate(args[1]):
                if s == slice(None):
                    continue
                starts.append(0 if s.start is None else int(s.start))
                ends.append(2**62 if s.stop is None else int(s.stop))
                axes.append(axis)
                steps.append(1 if s.step is None else int(s.step))
            if not axes:
                return x
            ins = [x.name] + [b.const(f"{node.name}.{k}", np.array(v, dtype=np.int64))
                              for k, v in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
            return b.keep_grid(b.node("Slice", ins, node.name), x, f"{node.name}.grid")
        if node.op == "call_function" and target is F.pad:
            x = val(args[0])
            pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
            mode = args[2] if len(args) > 2 else node.kwargs.get("mode", "constant")
            value = args[3] if len(args) > 3 else node.kwargs.get("value", None)
            if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (tuple, list)):
                raise ExportError(f"{what}: only constant zero padding is mapped")
            pairs = [(int(pad[i]), int(pad[i + 1])) for i in range(0, len(pad), 2)]  # last dim first
            rank = 4
            begins, finals = [0] * rank, [0] * rank
            for i, (lo, hi) in enumerate(pairs):
                begins[rank - 1 - i], finals[rank - 1 - i] = lo, hi
            out = b.node("Pad", [x.name, b.const(f"{node.name}.pads", np.array(begins + finals, dtype=np.int64))],
                         node.name, mode="constant")
            return b.keep_grid(out, x, f"{node.name}.grid")
        raise ExportError(
            f"the ONNX exporter has no mapping for {what} ({getattr(target, '__name__', target)}); an op it "
            "cannot map would have to run in float, which it does not do silently — express it with the "
            "modules it maps or leave it out of the deployed model"
        )


# ------------------------------------------------------------------------------------------- the export
@dataclass
class ExportResult:
    """What :func:`to_onnx` wrote: the path, its JSON sidecar and the metadata document (agreement included)."""

    path: Path
    sidecar: Path
    info: dict[str, Any]

    @property
    def agreement(self) -> float:
        return float(self.info["agreement"]["agreement"])


def _images(calib: Any) -> torch.Tensor:
    if hasattr(calib, "tensors") and callable(calib.tensors):
        calib = calib.tensors()[0]
    elif isinstance(calib, (tuple, list)) and calib and isinstance(calib[0], torch.Tensor):
        calib = calib[0]
    if not isinstance(calib, torch.Tensor) or not calib.is_floating_point() or calib.dim() != 4 or not len(calib):
        raise ConfigError("calib= must hold calibration images (N, C, H, W) in [0, 1]: an ArrayDataset, an (x, y) "
                          "pair or a tensor — a few hundred test or training images")
    return calib.detach().float().cpu()


@torch.no_grad()
def measure_agreement(model: nn.Module, session: Any, x: torch.Tensor, *, batch_size: int = 256) -> dict[str, Any]:
    """Prediction agreement and logit differences of the torch ``model`` and an onnxruntime ``session``."""
    ref, dep = [], []
    with eval_mode(model):
        for xb in x.split(batch_size):
            ref.append(model(xb).float())
            dep.append(torch.from_numpy(session.run(["logits"], {"input": xb.numpy()})[0]))
    r, d = torch.cat(ref), torch.cat(dep)
    diff = (r - d).abs()
    spread = (r.amax(1) - r.amin(1)).clamp_min(1e-12)
    return {
        "n": int(x.shape[0]),
        "agreement": float((r.argmax(1) == d.argmax(1)).float().mean()),
        "disagreements": int((r.argmax(1) != d.argmax(1)).sum()),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_rel_logit_diff": float((diff.amax(1) / spread).max()),
    }


def _input_shape(model: nn.Module, example: torch.Tensor | None, x: torch.Tensor) -> tuple[int, ...]:
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() != 4:
            got = getattr(example, "shape", example)
            raise ConfigError(f"example= must be an image batch (N, C, H, W), got {got!r}")
        if tuple(example.shape[1:]) != tuple(x.shape[1:]):
            raise ConfigError(f"example= has shape {tuple(example.shape[1:])} per image but calib= has "
                              f"{tuple(x.shape[1:])}: give images of the shape the model takes")
        return tuple(example.shape)
    return tuple(x.shape)


def sidecar_path(path: str | Path) -> Path:
    """Where the JSON beside an export goes: ``model.onnx`` → ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def to_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    calib: Any,
    example: torch.Tensor | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    batch_size: int = 256,
    source: dict[str, Any] | None = None,
    weight_dtype: str = "auto",
) -> ExportResult:
    """Export the quantized ``model`` to ``path`` as an ONNX QDQ graph and prove it computes the same function.

    ``calib`` — calibration images (an ArrayDataset, an ``(x, y)`` pair or a tensor) on which onnxruntime's
    predictions are compared with the fake-quant model's before anything is written; below ``min_agreement``
    (default :data:`DEFAULT_MIN_AGREEMENT`, justified in the module docstring) the export is refused with an
    ExportError and no file is left. ``example`` — an input batch fixing the image shape (default: calib's).
    ``source`` — what to record about the checkpoint it came from (path, sha256). Writes ``path`` (the
    metadata document under the key ``"qrobust"`` of the model's metadata_props) and the same document as
    JSON beside it (:func:`sidecar_path`). ``weight_dtype`` — ``"auto"`` (default: ``int8`` where the layer's
    input has at most 7 bits, ``uint8`` k + 128 with zero point 128 after 8-bit or signed activations),
    ``"uint8"`` or ``"int8"`` everywhere (see the module docstring).
    Returns an :class:`ExportResult`.
    """
    onnx, _ = require_onnx()
    if not isinstance(model, nn.Module) or not is_quantized(model):
        raise ConfigError("to_onnx exports a quantized model (QuantConv2d/QuantLinear/QuantAct from "
                          "qrobust.quantize or a quantized checkpoint); quantize the model first")
    if not (isinstance(min_agreement, (int, float)) and 0 <= min_agreement <= 1):
        raise ConfigError(f"min_agreement must be a fraction in [0, 1], got {min_agreement!r}")
    weight_dtype = check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    x = _images(calib)
    shape = _input_shape(model, example, x)
    net = copy.deepcopy(model).cpu().float().eval()
    graph, why = trace(net)
    if graph is None:
        raise ExportError(f"the model's forward cannot be traced for export: {why}")
    exporter = _Exporter(net, weight_dtype, x, batch_size)
    proto = exporter.run(graph, shape)
    session = onnx_session(proto)
    agreement = measure_agreement(net, session, x, batch_size=batch_size)
    # a layer whose int32 bias, however chosen, moves calibration pre-activations across a level boundary runs
    # as ConvInteger with a float bias instead — one at a time, most flips first, kept only where it removes
    # disagreements (8-bit flips are a 255th of the range and seldom reach a prediction; a 4-bit one can)
    flips = {r["name"]: r["bias"]["calibration_flips"] for r in exporter.b.layers
             if isinstance(r.get("bias"), dict) and r["bias"].get("calibration_flips")}
    exact: frozenset[str] = frozenset()
    for name in sorted(flips, key=lambda k: -flips[k]):
        if agreement["disagreements"] == 0:
            break
        trial = _Exporter(net, weight_dtype, x, batch_size, targets=exporter.targets, exact=exact | {name})
        trial_proto = trial.run(graph, shape)
        trial_session = onnx_session(trial_proto)
        trial_agreement = measure_agreement(net, trial_session, x, batch_size=batch_size)
        if trial_agreement["disagreements"] < agreement["disagreements"]:
            exact = exact | {name}
            exporter, proto, session, agreement = trial, trial_proto, trial_session, trial_agreement
    if exact:
        log.info("export: %s run(s) as ConvInteger with a float bias — no int32 bias keeps their calibration "
                 "pre-activations on their side of the level boundaries (%s)", ", ".join(sorted(exact)),
                 ", ".join(f"{k}: {flips[k]} flips" for k in sorted(exact)))
    reference = measure_agreement(net, onnx_session(proto, optimize=False), x, batch_size=batch_size)
    agreement["graph_reference"] = {k: reference[k] for k in ("agreement", "disagreements", "max_abs_logit_diff",
                                                              "mean_abs_logit_diff")}
    if agreement["agreement"] < min_agreement:
        why = ("the graph itself agrees on {:.2%} when run as written (onnxruntime's optimizations off): the rest is "
               "the integer kernels' int32 rounding of the biases, amplified through the layers — pass a lower "
               "min_agreement to export it anyway").format(reference["agreement"]) if (
            reference["agreement"] >= min_agreement) else "please report it with the checkpoint"
        raise ExportError(
            f"the ONNX graph run by onnxruntime agrees with the fake-quant model on only {agreement['agreement']:.2%} "
            f"of {agreement['n']} calibration predictions (largest logit difference "
            f"{agreement['max_abs_logit_diff']:.3g}), below min_agreement={min_agreement:.2%}, so nothing was "
            f"written; {why}"
        )
    b = exporter.b
    spec = getattr(model, "qrobust_spec", None) or {}
    low = sorted({r["weight_bits"] for r in b.layers if 1 < r.get("weight_bits", 32) < 8}
                 | {r["act_bits"] for r in b.layers if 1 < r.get("act_bits", 32) < 8})
    note = ("values below 8 bits are held in int8/uint8 tensors (ONNX Runtime's integer kernels are 8-bit): "
            f"the {', '.join(map(str, low))}-bit levels are exact, the storage is 8 bits per weight — the packed "
            "checkpoint (qrobust export --format packed) stores them at their bit-widths") if low else None
    totals = size_totals(describe(net))
    info: dict[str, Any] = {
        "format": FORMAT,
        "qrobust_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "opset": OPSET,
        "arch": getattr(model, "qrobust_arch", None),
        "spec": spec,
        "source": source,
        "input_shape": list(shape[1:]),
        "weight_dtype": weight_dtype,
        "layers": b.layers,
        "float_layers": b.float_layers,
        "low_bit_storage": note,
        "simulated_size_bits": totals["size_bits"],
        "float_size_bits": totals["float_bits"],
        "agreement": {**agreement, "min_agreement": min_agreement, "reference": "fake-quant model (torch)"},
    }
    meta = proto.metadata_props.add()
    meta.key, meta.value = METADATA_KEY, json.dumps(info)
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    info["onnx_bytes"] = path.stat().st_size
    side = sidecar_path(path)
    atomic_write_text(side, json.dumps(info, indent=2) + "\n")
    log.info("exported %s (%s) to %s: %d bytes, agreement %.2f%% on %d calibration images (largest logit "
             "difference %.3g)", spec.get("name", "?"), (model.qrobust_arch or {}).get("name", type(model).__name__)
             if hasattr(model, "qrobust_arch") else type(model).__name__, path, info["onnx_bytes"],
             100 * agreement["agreement"], agreement["n"], agreement["max_abs_logit_diff"])
    if note:
        log.warning("export: %s", note)
    if b.float_layers:
        log.warning("export: %d layer(s) the spec leaves at 32 bits run in float in the ONNX graph: %s",
                    len(b.float_layers), ", ".join(b.float_layers))
    return ExportResult(path, side, info)


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The qrobust metadata document of an exported ONNX file (ExportError if it has none)."""
    onnx, _ = require_onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any failure to parse is "not a readable ONNX file"
        raise ExportError(f"{path} is not a readable ONNX file: {e}") from e
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            info = json.loads(p.value)
            info["onnx_bytes"] = Path(path).stat().st_size
            return info
    raise ExportError(f"{path} is an ONNX file but not a qrobust export (no {METADATA_KEY!r} metadata); export "
                      "with qrobust export CKPT --format onnx")


def format_onnx_description(info: dict[str, Any]) -> str:
    """A plain-text account of an export: size on disk vs float32, per-layer bits and storage, agreement."""
    size = info.get("onnx_bytes")
    flt = info.get("float_size_bits", 0) / 8
    lines = [f"format {info.get('format')} (opset {info.get('opset')}), {(info.get('arch') or {}).get('name', '?')} "
             f"spec={(info.get('spec') or {}).get('name')}"]
    src = info.get("source") or {}
    if src.get("checkpoint"):
        lines.append(f"  exported from: {src['checkpoint']} (weights sha256 {str(src.get('sha256', ''))[:12]}…)")
    if size:
        lines.append(f"  size on disk: {size:,} bytes vs {flt:,.0f} bytes of float32 parameters "
                     f"({flt / size:.2f}x smaller); the bits alone would take "
                     f"{info.get('simulated_size_bits', 0) / 8:,.0f} bytes (qrobust export --format packed)")
    a = info.get("agreement") or {}
    if a:
        lines.append(f"  agreement with the fake-quant model: {a['agreement']:.2%} of {a['n']} predictions "
                     f"({a['disagreements']} differ), logits |Δ| mean {a['mean_abs_logit_diff']:.3g} max "
                     f"{a['max_abs_logit_diff']:.3g} (refused below {a.get('min_agreement', 0):.2%})")
        ref = a.get("graph_reference")
        if ref:
            lines.append(f"  the graph as written (onnxruntime optimizations off): {ref['agreement']:.2%}, logits |Δ| "
                         f"mean {ref['mean_abs_logit_diff']:.3g} max {ref['max_abs_logit_diff']:.3g}")
    header = ("layer", "op", "w bits", "a bits", "scheme", "storage", "BN folded")
    body = [(r["name"], r["op"], str(r.get("weight_bits", "-")), str(r.get("act_bits", "-")), r.get("scheme", "-"),
             r.get("storage", "-"), r.get("batchnorm_folded") or "-") for r in info.get("layers", [])]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    for row in (header, tuple("-" * w for w in widths), *body):
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    if info.get("low_bit_storage"):
        lines.append(f"  note: {info['low_bit_storage']}")
    if info.get("float_layers"):
        lines.append(f"  float in the graph (the spec leaves them at 32 bits): {', '.join(info['float_layers'])}")
    return "\n".join(lines)
