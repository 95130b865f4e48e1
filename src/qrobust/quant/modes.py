"""How gradients flow through quantizers, switchable at run time.

Four quantizer gradient modes (:data:`GRADIENT_MODES`):

* ``"estimator"`` (the default) — the training estimators: straight-through rounding/sign, zero gradient
  outside an activation's clip range;
* ``"native"`` — the literal autograd of the fake-quantized graph (``round``/``sign`` have zero gradient
  almost everywhere), which is what a naive attacker gets and what masks gradients;
* ``"bpda"`` — every quantizer is the identity on the backward pass;
* ``"attack"`` — the estimators of multi-bit quantizers, the identity through 1-bit sign activations.

An attack's ``gradients=`` choice is a different, user-facing name (:func:`attack_mode`): its ``"ste"`` runs
the quantizers in ``"attack"`` mode (with BPDA for samples left without any gradient), ``"bpda"`` in
``"bpda"``, ``"native"`` in ``"native"``; its ``"surrogate"`` is the float model, :func:`quantization_disabled`
making every quantizer of a model the identity.

>>> import torch
>>> from qrobust.quant.modes import gradient_mode, get_gradient_mode
>>> with gradient_mode("native"):
...     get_gradient_mode()
'native'
>>> get_gradient_mode()
'estimator'
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from qrobust.errors import ConfigError

GRADIENT_MODES = ("estimator", "native", "bpda", "attack")

_state = threading.local()


def get_gradient_mode() -> str:
    return getattr(_state, "mode", "estimator")


@contextmanager
def gradient_mode(mode: str) -> Iterator[None]:
    """Within the block, quantizers back-propagate as ``mode`` says.

    ``"estimator"``: the training estimators (identity through rounding, zero outside an activation's clip
    range);
    ``"native"``: literal autograd; ``"bpda"``: every quantizer is the identity on the backward pass, so a
    quantized activation back-propagates exactly like the float activation it replaced (see :func:`attack_mode`).
    """
    if mode not in GRADIENT_MODES:
        hint = " ('ste' is an attack's gradients= choice; attack_mode('ste') is 'attack')" if mode == "ste" else ""
        raise ConfigError(f"gradient mode must be one of {GRADIENT_MODES}, got {mode!r}{hint}")
    old = get_gradient_mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = old


#: the mode an attack's ``gradients="ste"`` falls back to for samples whose input gradient is all zero
STE_FALLBACK = "bpda"


def attack_mode(gradients: str) -> str:
    """The quantizer gradient mode an attack's ``gradients=`` choice means.

    * ``"ste"`` → ``"attack"``: the straight-through estimators of the multi-bit quantizers as trained
      (identity through rounding, the clip's own derivative at α — the gradient the model's autograd hands any
      other library, torchattacks or AutoAttack) and the identity through 1-bit sign activations (their
      hardtanh training estimator is zero wherever |x| > 1, and measured on binary digits models it left PGD
      far weaker than the identity). Where the gradient is all zero for a sample (every path saturated at α:
      16 % of digits samples at w4a4, 34 % at w2a2, measured), the attack takes that sample's gradient in
      :data:`STE_FALLBACK` instead, so saturation cannot mask it.
    * ``"bpda"`` → ``"bpda"`` (Athalye et al. 2018): every quantizer — rounding *and* its clipping — is the
      identity backward. Neither estimator is stronger everywhere (measured: the clipped estimator breaks
      more at w4a4, BPDA slightly more at w2a2), so the ``quantized`` suite runs both.
    * ``"native"`` → ``"native"``: literal autograd.
    """
    return {"ste": "attack", "bpda": "bpda", "native": "native"}.get(gradients, gradients)


def round_q(x: torch.Tensor) -> torch.Tensor:
    """``round`` whose backward follows the current gradient mode (identity unless "native")."""
    if get_gradient_mode() == "native":
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def sign_q(x: torch.Tensor) -> torch.Tensor:
    """``sign`` (with sign(0) = +1) whose backward follows the current gradient mode."""
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    if get_gradient_mode() == "native":
        return s.detach() + 0.0 * x  # keeps the graph connected, gradient exactly zero
    # (x - x.detach()) is exactly 0 with gradient 1, so the value is exactly ±1 even for |x| ≥ 2**24,
    # where x + (s - x) would lose s to rounding
    return (x - x.detach()) + s


class _FakeQuantSTE(torch.autograd.Function):
    """Fused ``round(clamp(x * inv_scale, qmin, qmax)) * scale``; hardtanh-shaped STE backward."""

    @staticmethod
    def forward(ctx, x, scale, inv_scale, qmin, qmax):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bounds = (qmin * scale, qmax * scale)
        out = torch.mul(x, inv_scale)
        return out.clamp_(qmin, qmax).round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        return torch.ops.aten.hardtanh_backward(grad, x, lo, hi), None, None, None, None


def fake_quant_q(x: torch.Tensor, scale: float, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor fake quantization ``round(clamp(x / scale, qmin, qmax)) * scale`` under the gradient mode.

    The value equals ``torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)`` bit for bit (it
    multiplies by the float32 reciprocal of ``scale`` and rounds half to even, as that op does). Backward:
    under "estimator" the gradient is 1 where ``qmin * scale < x < qmax * scale`` and 0 elsewhere (the gradient of
    ``hardtanh``, i.e. of ReLU6 when the range is [0, 6]); under "native" it is the literal zero of ``round``.
    It is ``clamp`` + :func:`round_q` fused into one autograd node (four in-place passes forward, one pass
    backward), so quantizing every activation of a ResNet-20 adds only a few percent to a training step.

    >>> fake_quant_q(torch.tensor([-1.0, 0.2, 0.3, 0.9, 5.0]), 0.5, 0, 2)
    tensor([0.0000, 0.0000, 0.5000, 1.0000, 1.0000])
    """
    scale32 = np.float32(scale)
    # float32 reciprocal, exactly as fake_quantize computes it
    inv = float(np.float32(1.0) / scale32) if scale32 != 0 else math.inf
    scale = float(scale32)
    if get_gradient_mode() == "native":
        return torch.round(torch.clamp(x * inv, qmin, qmax)) * scale
    if not (torch.is_grad_enabled() and x.requires_grad):  # no graph to record: the same ops, no Function node
        return torch.mul(x, inv).clamp_(qmin, qmax).round_().mul_(scale)
    return _FakeQuantSTE.apply(x, scale, inv, qmin, qmax)


def quant_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that quantizes something (it carries a ``quant_enabled`` flag)."""
    return [m for m in model.modules() if hasattr(m, "quant_enabled")]


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every quantizer of ``model`` is the identity: the float surrogate of a QAT model."""
    mods = quant_modules(model)
    old = [m.quant_enabled for m in mods]
    for m in mods:
        m.quant_enabled = False
    try:
        yield model
    finally:
        for m, o in zip(mods, old):
            m.quant_enabled = o
