"""Drop-in quantized layers: ``QuantConv2d``, ``QuantLinear`` (subclasses of the float layers), ``QuantAct``.

The float weights stay the parameters (``weight``/``bias``, same state-dict names as the float layer) and
are fake-quantized once per forward — standard quantization-aware training with straight-through
estimators. A quantizer's own parameters live under ``weight_quant.`` / ``act_quant.``.

Every layer has ``quant_enabled`` (True by default). When False, ``QuantConv2d``/``QuantLinear`` use the
float weight and ``QuantAct`` is exactly the activation it replaced (ReLU, ReLU6, SiLU …), whatever its α:
that is the float surrogate :func:`qrobust.quant.modes.quantization_disabled` gives attacks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant.modes import get_gradient_mode
from qrobust.quant.quantizers import Quantizer, RangeActQuantizer, _act_quantizer, _weight_quantizer
from qrobust.quant.spec import FLOAT_BITS, check_act_config, check_weight_clip, check_weight_combo, check_weight_config
from qrobust.validation import check_choice

__all__ = [
    "ACT_KINDS", "SIGNED_KINDS", "AddOperand", "QuantAct", "QuantConv2d", "QuantLinear", "signed_act_low",
]  # fmt: skip

ACT_KINDS = ("relu", "relu6", "silu", "gelu", "leaky_relu", "hardswish", "identity")
SIGNED_KINDS = ("silu", "gelu", "leaky_relu", "hardswish", "identity")  # outputs that go negative


class AddOperand(nn.Identity):
    """Marks an operand of an addition (a residual branch) that ``quantize`` quantizes when the spec sets
    ``add_bits``: it becomes a ``QuantAct(kind="identity")`` — symmetric levels on [−α, α] — so that the
    addition reads integers on both sides, as an integer runtime's QLinearAdd does. Float, it is the identity.
    Inserted by :func:`qrobust.quant.sites.separate_sites` (``additions=True``), never by hand."""


_MODULE_KINDS: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu", nn.LeakyReLU: "leaky_relu",
    nn.Hardswish: "hardswish", AddOperand: "identity",
}  # fmt: skip
_RELU6_MAX = 6.0


class _QuantWeightMixin:
    """Shared by QuantConv2d and QuantLinear: owns ``weight_quant`` and the ``quant_enabled`` flag."""

    weight: nn.Parameter
    weight_quant: Quantizer | None

    def _configure(self, weight_bits: int, weight_scheme: str, sign_grad: str, clip: float = 1.0) -> None:
        bits, self.weight_scheme, self.sign_grad = check_weight_config(weight_bits, weight_scheme, sign_grad)
        clip = check_weight_clip(clip)
        check_weight_combo(bits, self.weight_scheme, where=type(self).__name__, clip=clip)
        quantizer = _weight_quantizer(self.weight_scheme, bits, sign_grad=self.sign_grad, weight=self.weight,
                                      clip=clip)
        self.weight_bits = bits
        self.register_module("weight_quant", quantizer)  # type: ignore[attr-defined]
        self.quant_enabled = True

    def quantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with: fake-quantized, or the float weight when disabled/32-bit.

        Where no gradient can reach the weight or the quantizer's own parameters (an attack, which freezes
        them; ``torch.no_grad``), the fake-quantized weight is computed once and reused until the weight or
        the quantizer changes (an optimizer step, ``load_state_dict`` and any in-place write bump the
        tensors' versions, which the cache is keyed on): an attack's thousands of forwards then quantize each
        weight once (13 % of a Square attack's time on a w4a4 digits model before, measured).
        """
        q = self.weight_quant
        if q is None or not self.quant_enabled:
            return self.weight
        tensors = (self.weight, *q.parameters(), *q.buffers())
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            self._wq_cache = None
            return q(self.weight)
        key = (tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors),
               torch.is_inference_mode_enabled(), q.extra_repr())
        cache = getattr(self, "_wq_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            w = q(self.weight)
        self._wq_cache = (key, w)
        return w

    def reset_quantizer(self) -> None:
        """Re-initialise data-dependent quantizer state (LSQ's step) from the current float weight."""
        if self.weight_quant is not None:
            self.weight_quant.init_from(self.weight)

    def _quant_repr(self) -> str:
        scheme = "float" if self.weight_quant is None else self.weight_quant.scheme
        clip = getattr(self.weight_quant, "clip", 1.0)
        return f", weight_bits={self.weight_bits}, weight_scheme={scheme}" + (f", weight_clip={clip:g}"
                                                                               if clip != 1.0 else "")


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized on every forward.

    >>> conv = QuantConv2d(1, 1, 1, bias=False, weight_bits=2, weight_scheme="uniform")
    >>> with torch.no_grad():
    ...     _ = conv.weight.fill_(0.7)
    >>> conv(torch.ones(1, 1, 1, 2))
    tensor([[[[0.7000, 0.7000]]]], grad_fn=<ConvolutionBackward0>)
    >>> sorted(conv.state_dict())
    ['weight']
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        weight_bits: int = 4,
        weight_scheme: str = "dorefa",
        sign_grad: str = "identity",
        weight_clip: float = 1.0,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
        self._configure(weight_bits, weight_scheme, sign_grad, weight_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, *, weight_bits: int, weight_scheme: str = "dorefa", sign_grad: str = "identity",
        weight_clip: float = 1.0,
    ) -> QuantConv2d:
        """A QuantConv2d with the same configuration that *shares* ``conv``'s weight and bias parameters."""
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=conv.weight.dtype,
            weight_bits=FLOAT_BITS, weight_scheme=weight_scheme, sign_grad=sign_grad,
        )  # fmt: skip
        q.weight = conv.weight
        q.bias = conv.bias
        q._configure(weight_bits, weight_scheme, sign_grad, weight_clip)
        q.train(conv.training)
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized on every forward.

    >>> lin = QuantLinear(2, 1, weight_bits=1)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[0.5, -0.25]])); _ = lin.bias.zero_()
    >>> lin.quantized_weight()
    tensor([[ 0.3750, -0.3750]], grad_fn=<MulBackward0>)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        weight_bits: int = 4,
        weight_scheme: str = "dorefa",
        sign_grad: str = "identity",
        weight_clip: float = 1.0,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._configure(weight_bits, weight_scheme, sign_grad, weight_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, weight_bits: int, weight_scheme: str = "dorefa", sign_grad: str = "identity",
        weight_clip: float = 1.0,
    ) -> QuantLinear:
        """A QuantLinear that *shares* ``linear``'s weight and bias parameters."""
        q = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta",
            dtype=linear.weight.dtype, weight_bits=FLOAT_BITS, weight_scheme=weight_scheme, sign_grad=sign_grad,
        )  # fmt: skip
        q.weight = linear.weight
        q.bias = linear.bias
        q._configure(weight_bits, weight_scheme, sign_grad, weight_clip)
        q.train(linear.training)
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


def _float_act(kind: str, x: torch.Tensor, *, inplace: bool, negative_slope: float, approximate: str) -> torch.Tensor:
    """The float activation a QuantAct of ``kind`` replaced."""
    if kind == "relu":
        return F.relu(x, inplace=inplace)
    if kind == "relu6":
        return F.relu6(x, inplace=inplace)
    if kind == "silu":
        return F.silu(x, inplace=inplace)
    if kind == "gelu":
        return F.gelu(x, approximate=approximate)
    if kind == "leaky_relu":
        return F.leaky_relu(x, negative_slope, inplace=inplace)
    if kind == "identity":
        return x
    return F.hardswish(x, inplace=inplace)


def signed_act_low(kind: str, clip: float, *, negative_slope: float = 0.01, approximate: str = "none") -> float:
    """The lowest output of a signed activation on inputs ≥ −clip (SiLU −0.278, GELU −0.170, Hardswish −0.375,
    LeakyReLU −slope·clip, the identity −clip): the bottom of its quantizer's range."""
    if kind == "identity":
        return -float(clip)
    grid = torch.linspace(-float(clip), 0.0, 20001, dtype=torch.float64)
    low = _float_act(kind, grid, inplace=False, negative_slope=negative_slope, approximate=approximate).min()
    return float(low)


class QuantAct(nn.Module):
    """An activation module replaced by a quantized activation (``act_quant``), or itself at 32 bits.

    Kinds: ``relu``/``relu6`` — ``clip`` is α of the "clip" scheme (the initial α of "pact") and the range is
    [0, α]; for ``relu6`` α is capped at 6 so the quantized range never exceeds ReLU6's. ``silu``, ``gelu``,
    ``leaky_relu`` (``negative_slope``) and ``hardswish`` go negative: their output is quantized by a
    signed :class:`~qrobust.quant.quantizers.RangeActQuantizer` on [lo, α], lo the activation's lowest
    output on inputs ≥ −α (:func:`signed_act_low`); they take the "clip" (and, at 1 bit, "sign") scheme.
    With quantization disabled (or 32 bits) the layer is exactly the float activation again.
    :meth:`act_range` is the range the quantizer got.

    >>> act = QuantAct(2, clip=3.0)
    >>> act(torch.tensor([-1.0, 0.4, 1.2, 9.0]))
    tensor([0., 0., 1., 3.])
    >>> act.quant_enabled = False
    >>> act(torch.tensor([-1.0, 0.4, 1.2, 9.0]))
    tensor([0.0000, 0.4000, 1.2000, 9.0000])
    >>> [round(v, 3) for v in QuantAct(4, kind="silu").act_range()]
    [-0.429, 6.0]
    """

    def __init__(
        self,
        bits: int = 4,
        *,
        scheme: str = "clip",
        clip: float = 6.0,
        sign_grad: str = "identity",
        kind: str = "relu",
        inplace: bool = False,
        negative_slope: float = 0.01,
        approximate: str = "none",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.kind = check_choice("QuantAct kind", kind, ACT_KINDS, casefold=True)
        bits, self.scheme, clip, self.sign_grad = check_act_config(bits, scheme, clip, sign_grad)
        if self.kind == "relu6":
            clip = min(clip, _RELU6_MAX)
        self.negative_slope = float(negative_slope)
        self.approximate = str(approximate)
        if self.kind in SIGNED_KINDS and self.scheme == "pact" and bits != FLOAT_BITS:
            raise ConfigError(
                f"act_scheme='pact' learns the clip of ReLU/ReLU6 activations; a {self.kind} activation takes "
                "'clip' (its range set by act_clip or calibrate=data): use act_scheme='clip' or an override"
            )
        if self.kind in SIGNED_KINDS and self.scheme == "clip" and bits != FLOAT_BITS:
            low = signed_act_low(self.kind, clip, negative_slope=self.negative_slope, approximate=self.approximate)
            quantizer: Quantizer | None = RangeActQuantizer(bits, lo=low, hi=clip)
        else:
            quantizer = _act_quantizer(
                self.scheme, bits, clip=clip, sign_grad=self.sign_grad, device=device, dtype=dtype
            )
        self.bits = bits
        self.clip = clip
        self.inplace = bool(inplace)
        self.register_module("act_quant", quantizer)
        self.quant_enabled = True

    @classmethod
    def from_float(
        cls,
        act: nn.Module,
        *,
        bits: int,
        scheme: str = "clip",
        clip: float = 6.0,
        sign_grad: str = "identity",
        device: Any = None,
        dtype: Any = None,
    ) -> QuantAct:
        """The QuantAct replacing ``act`` (``nn.ReLU``, ``ReLU6``, ``SiLU``, ``GELU``, ``LeakyReLU``, ``Hardswish``)."""
        kind = _MODULE_KINDS.get(type(act))
        if kind is None:
            raise ConfigError(
                f"QuantAct replaces nn.{', nn.'.join(t.__name__ for t in _MODULE_KINDS)} modules, "
                f"got {type(act).__name__}"
            )
        q = cls(
            bits,
            scheme=scheme,
            clip=clip,
            sign_grad=sign_grad,
            kind=kind,
            inplace=getattr(act, "inplace", False),
            negative_slope=getattr(act, "negative_slope", 0.01),
            approximate=getattr(act, "approximate", "none"),
            device=device,
            dtype=dtype,
        )
        q.train(act.training)
        return q

    def _float(self, x: torch.Tensor, *, inplace: bool) -> torch.Tensor:
        return _float_act(
            self.kind, x, inplace=inplace, negative_slope=self.negative_slope, approximate=self.approximate
        )

    def act_range(self) -> tuple[float, float] | None:
        """``(lo, hi)`` of the quantizer's levels (PACT: the current α), None at 32 bits."""
        q = self.act_quant
        if q is None:
            return None
        if isinstance(q, RangeActQuantizer):
            return q.range()
        if q.scheme == "sign":
            return (-1.0, 1.0)
        alpha = q.alpha
        return (0.0, float(alpha.detach()) if isinstance(alpha, torch.Tensor) else float(alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.act_quant
        if q is None or not self.quant_enabled or not q.quant_enabled:
            return self._float(x, inplace=self.inplace)
        mode = get_gradient_mode()
        if self.kind in SIGNED_KINDS and self.scheme != "sign":
            f = self._float(x, inplace=False)
            if mode == "bpda":
                return f + (q(f) - f).detach()
            return q(f)
        if mode == "bpda" or (mode == "attack" and self.scheme == "sign"):
            # quantized value forward, the float activation's gradient backward (a sign activation replaced its
            # ReLU by a symmetric one: its BPDA surrogate is the identity; an attack's "ste" uses it too)
            f = x if self.scheme == "sign" else self._float(x, inplace=False)
            return f + (q(x) - f).detach()
        return q(x)

    def extra_repr(self) -> str:
        scheme = "float" if self.act_quant is None else self.act_quant.scheme
        extra = f", negative_slope={self.negative_slope:g}" if self.kind == "leaky_relu" else ""
        return f"bits={self.bits}, scheme={scheme}, clip={self.clip:g}, kind={self.kind}{extra}"
