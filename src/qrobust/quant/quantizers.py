"""Stateful quantizers: small ``nn.Module`` wrappers around :mod:`qrobust.quant.functional`.

Every quantizer has ``bits``, a ``scheme`` name and a ``quant_enabled`` flag (True by default; False makes
it the identity — see :func:`qrobust.quant.modes.quantization_disabled`). Weight quantizers map a latent
float weight to its fake-quantized value; activation quantizers include the activation's own clipping.

Scheme names (as in :class:`~qrobust.quant.spec.QuantSpec`):

========================  =====================================================================
weights ``dorefa``        tanh-normalised DoReFa, 2^b levels in [−1, 1]
weights ``uniform``       symmetric, scale = max|w| / (2^(b−1) − 1), 2^b − 1 levels
``uniform_per_channel``   the same with one scale per output channel
weights ``lsq``           learned step size (LSQ), 2^b levels, step initialised to 2·mean|w|/√Q_P
weights ``binary``        α_c · sign(w), α_c = mean |w| per output channel (XNOR-Net); what every
                          weight scheme becomes at 1 bit
acts ``clip``             clamp to [0, α] (fixed α), 2^b levels k·α/(2^b − 1); {0, α} at 1 bit
acts ``pact``             the same with α learned (PACT)
acts ``sign``             binary activations in {−1, +1} (1 bit only)
acts ``clip``, signed     SiLU/GELU/LeakyReLU/Hardswish outputs, which go negative: 2^b affine levels
                          on [lo, α] with zero exact (:class:`RangeActQuantizer`)
========================  =====================================================================
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant import functional as QF
from qrobust.quant.modes import fake_quant_q
from qrobust.quant.spec import (
    FLOAT_BITS,
    SIGN_GRADS,
    check_act_config,
    check_bits,
    check_clip,
    check_weight_clip,
    check_weight_config,
)
from qrobust.validation import check_choice

__all__ = [
    "BinaryWeightQuantizer",
    "ClipActQuantizer",
    "DoReFaWeightQuantizer",
    "LSQWeightQuantizer",
    "PACTActQuantizer",
    "Quantizer",
    "RangeActQuantizer",
    "SignActQuantizer",
    "UniformWeightQuantizer",
    "make_act_quantizer",
    "make_weight_quantizer",
]


def _multi_bits(bits: int, low: int, what: str) -> int:
    bits = check_bits(bits, name=f"{what} bits")
    if not low <= bits <= 8:
        raise ConfigError(f"{what} needs {low}–8 bits, got {bits}")
    return bits


class Quantizer(nn.Module):
    """Base class: ``forward(x)`` is ``quantize(x)`` when ``quant_enabled``, else the identity."""

    scheme: str = ""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.quant_enabled = True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return x
        return self.quantize(x)

    def num_scales(self, weight: torch.Tensor | None = None) -> int:
        """How many float numbers (scales, steps, clip levels) a deployed model must store for it."""
        return 1

    def init_from(self, weight: torch.Tensor) -> None:
        """(Re)initialise data-dependent state from ``weight``; a no-op for quantizers without any."""

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DoReFaWeightQuantizer(Quantizer):
    """DoReFa-Net weight quantizer: 2^b levels ``2k/(2^b − 1) − 1`` in [−1, 1] (bits 2–8).

    >>> q = DoReFaWeightQuantizer(2)
    >>> q(torch.tensor([-3.0, -0.2, 0.2, 3.0]))
    tensor([-1.0000, -0.3333,  0.3333,  1.0000])
    """

    scheme = "dorefa"

    def __init__(self, bits: int) -> None:
        super().__init__(_multi_bits(bits, 2, "dorefa"))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return QF.dorefa_weight_quantize(x, self.bits)

    def num_scales(self, weight: torch.Tensor | None = None) -> int:
        return 0  # the levels are fixed numbers in [-1, 1]


class UniformWeightQuantizer(Quantizer):
    """Symmetric uniform weights, scale = max|w| / (2^(b−1) − 1) per tensor or per output channel (bits 2–8).

    >>> q = UniformWeightQuantizer(2)
    >>> q(torch.tensor([[-1.0, -0.2, 0.3, 0.8]]))
    tensor([[-1.,  0.,  0.,  1.]])
    >>> UniformWeightQuantizer(3, per_channel=True)(torch.tensor([[0.3, -0.1], [3.0, 1.1]]))
    tensor([[ 0.3000, -0.1000],
            [ 3.0000,  1.0000]])
    """

    def __init__(self, bits: int, *, per_channel: bool = False, clip: float = 1.0) -> None:
        super().__init__(_multi_bits(bits, 2, "uniform"))
        self.per_channel = bool(per_channel)
        self.clip = check_weight_clip(clip, name="clip")

    @property
    def scheme(self) -> str:  # type: ignore[override]
        return "uniform_per_channel" if self.per_channel else "uniform"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return QF.symmetric_weight_quantize(x, self.bits, per_channel=self.per_channel, clip=self.clip)

    def num_scales(self, weight: torch.Tensor | None = None) -> int:
        return int(weight.shape[0]) if self.per_channel and weight is not None and weight.dim() > 1 else 1

    def extra_repr(self) -> str:
        clip = f", clip={self.clip:g}" if self.clip != 1.0 else ""
        return f"bits={self.bits}, per_channel={self.per_channel}{clip}"


class LSQWeightQuantizer(Quantizer):
    """Learned step size (LSQ) for signed weights: levels ``k·s``, k ∈ [−2^(b−1), 2^(b−1) − 1] (bits 2–8).

    The step ``s`` is a parameter (state-dict key ``step``), initialised to ``2·mean|w| / √Q_P`` from the
    weight given here, or from the first tensor quantized; its gradient is scaled by 1/√(numel·Q_P).

    >>> q = LSQWeightQuantizer(2, weight=torch.tensor([0.5, -0.5]))
    >>> round(q.step.item(), 4)
    1.0
    >>> q(torch.tensor([-3.0, -0.4, 0.6, 2.0]))
    tensor([-2.,  0.,  1.,  1.], grad_fn=<MulBackward0>)
    """

    scheme = "lsq"

    def __init__(self, bits: int, *, weight: torch.Tensor | None = None) -> None:
        super().__init__(_multi_bits(bits, 2, "lsq"))
        self.qmax = 2 ** (self.bits - 1) - 1
        device = weight.device if weight is not None else None
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        self.step = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self._initialized = False
        if weight is not None:
            self.init_from(weight)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        value = 2.0 * weight.detach().abs().mean() / math.sqrt(self.qmax)
        self.step.copy_(value.clamp_min(1e-8))
        self._initialized = True

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "step" in state_dict:
            self._initialized = True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            self.init_from(x)
        return QF.lsq_quantize(x, self.step.clamp_min(1e-8), bits=self.bits, signed=True)


class BinaryWeightQuantizer(Quantizer):
    """XNOR-Net binary weights ``α_c · sign(w)``, α_c = mean |w| of output channel c (1 bit).

    >>> BinaryWeightQuantizer()(torch.tensor([[0.5, -1.5], [2.0, -0.0]]))
    tensor([[ 1., -1.],
            [ 1.,  1.]])
    """

    scheme = "binary"

    def __init__(self, *, sign_grad: str = "identity") -> None:
        super().__init__(1)
        self.sign_grad = check_choice("sign_grad", sign_grad, SIGN_GRADS, casefold=True)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return QF.binary_weight_quantize(x, sign_grad=self.sign_grad)

    def num_scales(self, weight: torch.Tensor | None = None) -> int:
        return int(weight.shape[0]) if weight is not None and weight.dim() > 1 else 1

    def extra_repr(self) -> str:
        return f"bits=1, sign_grad={self.sign_grad}"


class ClipActQuantizer(Quantizer):
    """Clipped uniform activations on [0, α] with 2^b levels ``k·α/(2^b − 1)`` (fixed α, bits 1–8).

    >>> ClipActQuantizer(2, alpha=3.0)(torch.tensor([-1.0, 0.4, 1.2, 2.6, 9.0]))
    tensor([0., 0., 1., 3., 3.])
    """

    scheme = "clip"

    def __init__(self, bits: int, *, alpha: float = 6.0) -> None:
        super().__init__(_multi_bits(bits, 1, "clip activation"))
        self.alpha = check_clip(alpha, name="alpha")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return QF.clip_act_quantize(x, self.alpha, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={self.alpha:g}"


class RangeActQuantizer(Quantizer):
    """Signed activations on [lo, hi] (lo ≤ 0 < hi): 2^b affine levels ``k·s``, s ≈ (hi − lo)/(2^b − 1), 0 exact.

    The levels run from ``−z·s`` to ``(2^b − 1 − z)·s = hi`` with the zero point z = round(−lo/s) — the
    grid of ``torch.fake_quantize_per_tensor_affine(x, s, z, 0, 2^b − 1)`` (s is then rounded so that the
    top level is exactly hi; a lo smaller than half a step rounds to 0). Gradient under "estimator": 1 inside
    that range, 0 outside. It quantizes an activation's *output* (SiLU, GELU … go slightly negative).

    >>> q = RangeActQuantizer(2, lo=-1.0, hi=2.0)
    >>> q(torch.tensor([-3.0, 0.2, 0.6, 1.4, 5.0]))
    tensor([-1.,  0.,  1.,  1.,  2.])
    >>> q.range()
    (-1.0, 2.0)
    """

    scheme = "clip"

    def __init__(self, bits: int, *, lo: float, hi: float) -> None:
        super().__init__(_multi_bits(bits, 1, "signed activation"))
        hi = check_clip(hi, name="hi")
        if not (math.isfinite(lo) and lo <= 0):
            raise ConfigError(f"a signed activation range needs a finite lo ≤ 0, got {lo!r}")
        n = 2**self.bits - 1
        zero_point = min(max(round(-lo * n / (hi - lo)), 0), n - 1)
        self.scale = float(torch.tensor(hi / (n - zero_point), dtype=torch.float32))  # the top level is hi
        self.qmin, self.qmax = -zero_point, n - zero_point

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_q(x, self.scale, self.qmin, self.qmax)

    def range(self) -> tuple[float, float]:
        """The lowest and highest level."""
        return self.qmin * self.scale, self.qmax * self.scale

    def extra_repr(self) -> str:
        lo, hi = self.range()
        return f"bits={self.bits}, range=[{lo:.4g}, {hi:.4g}]"


class PACTActQuantizer(Quantizer):
    """PACT: clipped uniform activations with a learned clip α (state-dict key ``alpha``), bits 1–8.

    Add an L2 penalty on ``alpha`` in the objective if you follow the paper's recipe.

    >>> q = PACTActQuantizer(2, alpha=3.0)
    >>> q(torch.tensor([-1.0, 0.4, 1.2, 9.0]))
    tensor([0., 0., 1., 3.], grad_fn=<MulBackward0>)
    """

    scheme = "pact"

    def __init__(
        self, bits: int, *, alpha: float = 6.0, device: torch.device | str | None = None, dtype: Any = None
    ) -> None:
        super().__init__(_multi_bits(bits, 1, "pact activation"))
        self.alpha = nn.Parameter(torch.tensor(check_clip(alpha, name="alpha"), device=device, dtype=dtype))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return QF.pact_quantize(x, self.alpha, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class SignActQuantizer(Quantizer):
    """Binary activations ``sign(x)`` ∈ {−1, +1} (1 bit); ``sign_grad="clipped"`` is the hardtanh STE.

    >>> SignActQuantizer()(torch.tensor([-0.5, 0.0, 3.0]))
    tensor([-1.,  1.,  1.])
    """

    scheme = "sign"

    def __init__(self, *, sign_grad: str = "identity") -> None:
        super().__init__(1)
        self.sign_grad = check_choice("sign_grad", sign_grad, SIGN_GRADS, casefold=True)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return QF.sign_activation(x, sign_grad=self.sign_grad)

    def num_scales(self, weight: torch.Tensor | None = None) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"bits=1, sign_grad={self.sign_grad}"


def make_weight_quantizer(
    scheme: str, bits: int, *, sign_grad: str = "identity", weight: torch.Tensor | None = None
) -> Quantizer | None:
    """The weight quantizer for ``scheme`` at ``bits``: None at 32 bits (float), binary at 1 bit.

    Checks its arguments with :func:`~qrobust.quant.spec.check_weight_config`, the spec's own check.

    >>> make_weight_quantizer("uniform", 1)
    BinaryWeightQuantizer(bits=1, sign_grad=identity)
    >>> make_weight_quantizer("lsq", 32) is None
    True
    """
    bits, scheme, sign_grad = check_weight_config(bits, scheme, sign_grad)
    return _weight_quantizer(scheme, bits, sign_grad=sign_grad, weight=weight)


def _weight_quantizer(
    scheme: str, bits: int, *, sign_grad: str, weight: torch.Tensor | None = None, clip: float = 1.0
) -> Quantizer | None:
    """:func:`make_weight_quantizer` for values already checked (the layers call this)."""
    if bits == FLOAT_BITS:
        return None
    if bits == 1:
        return BinaryWeightQuantizer(sign_grad=sign_grad)
    if scheme == "dorefa":
        return DoReFaWeightQuantizer(bits)
    if scheme in ("uniform", "uniform_per_channel"):
        return UniformWeightQuantizer(bits, per_channel=scheme == "uniform_per_channel", clip=clip)
    return LSQWeightQuantizer(bits, weight=weight)


def make_act_quantizer(
    scheme: str,
    bits: int,
    *,
    clip: float = 6.0,
    sign_grad: str = "identity",
    device: torch.device | str | None = None,
    dtype: Any = None,
) -> Quantizer | None:
    """The activation quantizer for ``scheme`` at ``bits`` (None at 32 bits).

    Checks its arguments with :func:`~qrobust.quant.spec.check_act_config`, the spec's own check.

    >>> make_act_quantizer("clip", 4, clip=2.0)
    ClipActQuantizer(bits=4, alpha=2)
    """
    bits, scheme, clip, sign_grad = check_act_config(bits, scheme, clip, sign_grad)
    return _act_quantizer(scheme, bits, clip=clip, sign_grad=sign_grad, device=device, dtype=dtype)


def _act_quantizer(
    scheme: str,
    bits: int,
    *,
    clip: float,
    sign_grad: str,
    device: torch.device | str | None = None,
    dtype: Any = None,
) -> Quantizer | None:
    """:func:`make_act_quantizer` for values already checked (the layers call this)."""
    if bits == FLOAT_BITS:
        return None
    if scheme == "sign":
        return SignActQuantizer(sign_grad=sign_grad)
    if scheme == "pact":
        return PACTActQuantizer(bits, alpha=clip, device=device, dtype=dtype)
    return ClipActQuantizer(bits, alpha=clip)
