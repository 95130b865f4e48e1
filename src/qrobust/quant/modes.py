"""How gradients flow through quantizers, switchable at run time.

Training always uses straight-through estimators. Attacks choose:

* ``"ste"`` — straight-through (BPDA) through every rounding/sign: the honest default for attacking a
  quantized model;
* ``"native"`` — the literal autograd of the fake-quantized graph (``round``/``sign`` have zero gradient
  almost everywhere), which is what a naive attacker gets and what masks gradients;
* a float *surrogate* — :func:`quantization_disabled` makes every quantizer of a model the identity.

>>> import torch
>>> from qrobust.quant.modes import gradient_mode, get_gradient_mode
>>> with gradient_mode("native"):
...     get_gradient_mode()
'native'
>>> get_gradient_mode()
'ste'
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qrobust.errors import ConfigError

GRADIENT_MODES = ("ste", "native")

_state = threading.local()


def get_gradient_mode() -> str:
    return getattr(_state, "mode", "ste")


@contextmanager
def gradient_mode(mode: str) -> Iterator[None]:
    """Within the block, quantizers back-propagate as ``mode`` says (``"ste"`` or ``"native"``)."""
    if mode not in GRADIENT_MODES:
        raise ConfigError(f"gradient mode must be one of {GRADIENT_MODES}, got {mode!r}")
    old = get_gradient_mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = old


def round_q(x: torch.Tensor) -> torch.Tensor:
    """``round`` whose backward follows the current gradient mode (identity under "ste")."""
    if get_gradient_mode() == "native":
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def sign_q(x: torch.Tensor) -> torch.Tensor:
    """``sign`` (with sign(0) = +1) whose backward follows the current gradient mode."""
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    if get_gradient_mode() == "native":
        return s.detach() + 0.0 * x  # keeps the graph connected, gradient exactly zero
    return x + (s - x).detach()


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
