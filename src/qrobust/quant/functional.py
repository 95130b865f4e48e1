"""Quantizers as pure functions of tensors.

Naming follows Brevitas: ``*_ste`` helpers are *always* straight-through. Every other function rounds with
:func:`qrobust.quant.modes.round_q` / :func:`~qrobust.quant.modes.sign_q` (or the fused
:func:`~qrobust.quant.modes.fake_quant_q`), so its backward follows the gradient mode an attack chooses
("estimator": straight-through, or "native": the literal zero gradient of rounding).

Straight-through variants for the functions that take one (``ste=`` of :func:`uniform_quantize`,
``sign_grad=`` of the 1-bit :func:`binary_weight_quantize` and :func:`sign_activation`, the spec's field):

* ``"identity"`` — the rounding/sign passes the incoming gradient unchanged everywhere;
* ``"clipped"`` — same, but zero where the input lies beyond the clipping range ([qmin, qmax] on the
  integer grid for :func:`uniform_quantize`, |x| > 1 for sign: the hardtanh STE of BinaryNet).

Scales computed from the data (max |w|, mean |w|) are treated as constants in backward (detached), so the
straight-through gradient is exactly the definition above (DoReFa's tanh normalisation is the exception:
as in the paper, autograd differentiates it). Conventions for the integer grid match
``torch.fake_quantize_per_tensor_affine``: ``x`` is multiplied by the float32 reciprocal of the scale and
rounded half to even.

>>> import torch
>>> uniform_quantize(torch.tensor([-0.9, 0.1, 0.26, 2.0]), 0.25, qmin=-3, qmax=3)
tensor([-0.7500,  0.0000,  0.2500,  0.7500])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qrobust.errors import ConfigError
from qrobust.quant.modes import fake_quant_q, round_q, sign_q

__all__ = [
    "binary_weight_quantize",
    "clip_act_quantize",
    "dorefa_weight_quantize",
    "grad_scale",
    "lsq_grad_scale",
    "lsq_quantize",
    "pact_quantize",
    "round_ste",
    "sign_activation",
    "sign_ste",
    "symmetric_weight_quantize",
    "uniform_quantize",
]


def _check_bits(bits: int, *, low: int = 1) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 8:
        raise ConfigError(f"bits must be an integer in {low}–8 for this quantizer, got {bits!r}")
    return bits


def _check_variant(value: str, name: str) -> str:
    if value not in ("identity", "clipped"):
        raise ConfigError(f"{name} must be 'identity' or 'clipped', got {value!r}")
    return value


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` (half to even) with an identity gradient, whatever the gradient mode.

    >>> x = torch.tensor([0.4, 1.5, 2.5], requires_grad=True)
    >>> y = round_ste(x); y.sum().backward()
    >>> y.detach(), x.grad
    (tensor([0., 2., 2.]), tensor([1., 1., 1.]))
    """
    return x + (torch.round(x) - x).detach()


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign`` with sign(0) = +1 and an identity gradient, whatever the gradient mode.

    >>> sign_ste(torch.tensor([-0.3, 0.0, 2.0]))
    tensor([-1.,  1.,  1.])
    """
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return x + (s - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in forward, ``scale · grad`` in backward (LSQ's step-size gradient scaling).

    >>> s = torch.tensor(2.0, requires_grad=True)
    >>> (grad_scale(s, 0.1) * 3).backward(); s.grad
    tensor(0.3000)
    """
    y = x * scale
    return (x - y).detach() + y


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(numel · Q_P) (Esser et al., 2020)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


def uniform_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    qmin: int,
    qmax: int,
    zero_point: int = 0,
    ste: str = "clipped",
) -> torch.Tensor:
    """Fake-quantize ``x`` onto ``scale · ({qmin … qmax} − zero_point)``.

    ``scale`` is a float or a tensor broadcastable to ``x`` (per-channel: shape (C, 1, …)); a scale that
    requires grad receives its autograd gradient (this is how LSQ learns its step). The value equals
    ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` bit for bit.
    ``ste="clipped"``: gradient 1 inside the range, 0 outside; ``"identity"``: 1 everywhere.

    >>> uniform_quantize(torch.tensor([0.3, 0.7, 9.0]), 0.5, qmin=0, qmax=3)
    tensor([0.5000, 0.5000, 1.5000])
    """
    _check_variant(ste, "ste")
    if isinstance(scale, torch.Tensor):
        inv = scale.reciprocal()
    else:
        scale = float(torch.tensor(scale, dtype=torch.float32))
        inv = float(1.0 / torch.tensor(scale, dtype=torch.float32))
    v = x * inv
    if zero_point:
        v = v + zero_point
    clamped = torch.clamp(v, qmin, qmax)
    v = clamped if ste == "clipped" else v + (clamped - v).detach()
    q = round_q(v)
    if zero_point:
        q = q - zero_point
    return q * scale


def symmetric_weight_quantize(w: torch.Tensor, bits: int, *, per_channel: bool = False, clip: float = 1.0
                              ) -> torch.Tensor:
    """Symmetric uniform quantization with scale = clip·max|w| / (2^(b−1) − 1), per tensor or per output channel.

    Levels are ``k · scale`` for k in [−(2^(b−1) − 1), 2^(b−1) − 1]: 2^b − 1 of them, zero included. The
    scale is detached and the range covers every weight by construction, so the gradient is 1 everywhere
    (there is nothing to clip; the clamp only guards against the last-ulp overshoot of ``max|w| / scale``).
    ``clip`` < 1 ends the grid at that fraction of max|w|: the weights beyond saturate at the top level (their
    gradient still passes unchanged, the straight-through choice of the unclipped grid). Needs ``bits >= 2``
    (at 1 bit use :func:`binary_weight_quantize`).

    >>> symmetric_weight_quantize(torch.tensor([[-1.0, -0.2, 0.3, 0.8]]), 2)
    tensor([[-1.,  0.,  0.,  1.]])
    >>> symmetric_weight_quantize(torch.tensor([[-1.0, -0.2, 0.3, 0.8]]), 3, clip=0.6)
    tensor([[-0.6000, -0.2000,  0.4000,  0.6000]])
    """
    qmax = 2 ** (_check_bits(bits, low=2) - 1) - 1
    with torch.no_grad():
        if per_channel and w.dim() > 1:
            m = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
        else:
            m = w.abs().amax()
        scale = (m * clip / qmax).clamp_min(torch.finfo(w.dtype).tiny)  # all-zero weights: scale tiny, output 0
    return uniform_quantize(w, scale, qmin=-qmax, qmax=qmax, ste="identity")


def dorefa_weight_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa-Net weights: ``2·quantize_b(tanh(w) / (2·max|tanh w|) + 1/2) − 1`` ∈ [−1, 1].

    Levels are ``k · 2/(2^b − 1) − 1`` for k = 0 … 2^b − 1 (2^b of them, ±1 included, no exact zero for any
    b). As in the paper the normalisation (tanh and the max) is differentiated by autograd; the rounding is
    straight-through. Needs ``bits >= 2`` (at 1 bit use :func:`binary_weight_quantize`).

    >>> dorefa_weight_quantize(torch.tensor([-2.0, -0.1, 0.1, 2.0]), 2)
    tensor([-1.0000, -0.3333,  0.3333,  1.0000])
    """
    n = 2 ** _check_bits(bits, low=2) - 1
    t = torch.tanh(w)
    t = t / (2 * t.abs().max().clamp_min(torch.finfo(w.dtype).tiny)) + 0.5
    return round_q(t * n) * (2.0 / n) - 1.0


def binary_weight_quantize(w: torch.Tensor, *, sign_grad: str = "identity") -> torch.Tensor:
    """XNOR-Net binary weights: ``α_c · sign(w)`` with α_c the mean |w| of output channel c (sign(0) = +1).

    α is detached; the gradient is ``α_c`` (``"identity"``) or ``α_c · 1{|w| ≤ 1}`` (``"clipped"``).

    >>> binary_weight_quantize(torch.tensor([[0.5, -1.5], [2.0, 0.0]]))
    tensor([[ 1., -1.],
            [ 1.,  1.]])
    """
    _check_variant(sign_grad, "sign_grad")
    with torch.no_grad():
        if w.dim() > 1:
            alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        else:
            alpha = w.abs().mean()
    s = sign_q(torch.clamp(w, -1.0, 1.0) if sign_grad == "clipped" else w)
    return alpha * s


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, *, bits: int, signed: bool = True) -> torch.Tensor:
    """LSQ (Esser et al., 2020): ``round(clamp(x/s, −Q_N, Q_P)) · s`` with the step's gradient scaled by
    g = 1/sqrt(numel(x) · Q_P).

    Signed: Q_N = 2^(b−1), Q_P = 2^(b−1) − 1 (2^b levels, needs b >= 2); unsigned: Q_N = 0, Q_P = 2^b − 1.
    Gradients are the paper's: ∂/∂x = 1 inside the range, 0 outside; ∂/∂s = g·(round(x/s) − x/s) inside,
    g·(−Q_N or Q_P) outside.

    >>> lsq_quantize(torch.tensor([-5.0, -0.3, 0.3, 0.8]), torch.tensor(0.5), bits=2)
    tensor([-1.0000, -0.5000,  0.5000,  0.5000])
    """
    bits = _check_bits(bits, low=2 if signed else 1)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s = grad_scale(step, lsq_grad_scale(x.numel(), qmax))
    return uniform_quantize(x, s, qmin=qmin, qmax=qmax, ste="clipped")


def clip_act_quantize(x: torch.Tensor, alpha: float, bits: int) -> torch.Tensor:
    """Clipped uniform activation: ``clamp(x, 0, α)`` on 2^b levels ``k · α/(2^b − 1)``, k = 0 … 2^b − 1.

    Equals ``torch.fake_quantize_per_tensor_affine(x, α/(2^b−1), 0, 0, 2^b−1)`` bit for bit. Gradient under
    "estimator": 1 for 0 < x < α, else 0 — exactly ReLU6's gradient when α = 6. At 1 bit the levels are {0, α}.

    >>> clip_act_quantize(torch.tensor([-1.0, 0.4, 1.2, 7.0]), 6.0, 2)
    tensor([0., 0., 2., 6.])
    """
    n = 2 ** _check_bits(bits) - 1
    return fake_quant_q(x, float(alpha) / n, 0, n)


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """PACT (Choi et al., 2018): ``clamp(x, 0, α)`` with learnable α, on 2^b levels ``k · α/(2^b − 1)``.

    Gradients are PACT's: ∂y/∂x = 1 for 0 < x < α (straight-through rounding), ∂y/∂α = 1{x ≥ α}
    (the rounding's dependence on α through the scale is ignored, as in the paper).

    >>> pact_quantize(torch.tensor([-1.0, 0.4, 1.0, 7.0]), torch.tensor(3.0), 2)
    tensor([0., 0., 1., 3.])
    """
    n = 2 ** _check_bits(bits) - 1
    y = torch.where(x < alpha, F.relu(x), alpha)
    scale = alpha.detach().clamp_min(1e-8) / n
    return round_q(y * scale.reciprocal()) * scale


def sign_activation(x: torch.Tensor, *, sign_grad: str = "identity") -> torch.Tensor:
    """Binary activation ``sign(x)`` ∈ {−1, +1} (sign(0) = +1); ``"clipped"`` is BinaryNet's hardtanh STE.

    >>> sign_activation(torch.tensor([-0.5, 0.0, 3.0]))
    tensor([-1.,  1.,  1.])
    """
    _check_variant(sign_grad, "sign_grad")
    return sign_q(torch.clamp(x, -1.0, 1.0) if sign_grad == "clipped" else x)
