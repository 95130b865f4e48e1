"""Another library's attack run under qrobust's bookkeeping: a torchattacks attack object, an AutoAttack
``run_standard_evaluation``-style callable, or any function ``(x, y) -> x_adv``.

:class:`External` is what :func:`qrobust.evaluate` wraps such an item in, so it joins a suite like one of
ours: it runs only on the points still robust, its output is projected onto the evaluation's ε-ball and
[0, 1] (an output that had left the ball is reported with a warning: the foreign attack broke the threat
model it was given), the model is in eval mode with frozen weights while it runs, and any gradient it takes
through a quantizer follows ``gradients=`` (straight-through by default) — so a torchattacks PGD attacks a
quantized qrobust model with straight-through gradients instead of meeting rounding's zeros::

    import torchattacks
    report = qrobust.evaluate(model, data, eps=8/255,
                              suite=["apgd-ce", torchattacks.FAB(model, eps=8/255), my_attack_fn])

A foreign attack with an ``eps`` attribute (torchattacks) must agree with the evaluation's ε; one with a
``model`` attribute must attack the same model object. qrobust cannot know whether a foreign attack uses
gradients: it counts as white-box unless built with ``black_box=True`` (or given as
``SuiteEntry(..., black_box=True)``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import Attack, lp_norm
from qrobust.errors import ConfigError

log = logging.getLogger(__name__)


def is_foreign_attack(obj: Any) -> bool:
    """Whether ``obj`` is an attack of another library to call as ``obj(x, y) -> x_adv``: a callable object
    that is not a qrobust :class:`Attack` (a torchattacks attack), a bound method (AutoAttack's
    ``run_standard_evaluation``), or a plain function of ``(x, y)``. A class, and a function whose first
    parameter is ``model`` or that takes ``**kwargs``, is a *factory* ``f(model, **settings) -> Attack``."""
    if isinstance(obj, (Attack, type)) or not callable(obj):
        return False
    if inspect.isfunction(obj):
        try:
            params = list(inspect.signature(obj).parameters.values())
        except (TypeError, ValueError):
            return False
        factory = (params and params[0].name == "model") or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        return not factory
    return True


class External(Attack):
    """``fn(x, y) -> x_adv`` run as a qrobust attack on ``model`` at ``eps`` in ``norm``."""

    supports_targeted = False

    def __init__(
        self,
        model: nn.Module,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        eps: float | None = None,
        norm: str = "Linf",
        name: str | None = None,
        black_box: bool = False,
        **kwargs: Any,
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"External needs a callable (x, y) -> x_adv, got {type(fn).__name__}")
        own_eps = getattr(fn, "eps", None)
        if isinstance(own_eps, (int, float)) and not isinstance(own_eps, bool):
            if eps is None:
                eps = float(own_eps)
            elif abs(float(own_eps) - eps) > 1e-9 * max(1.0, eps):
                raise ConfigError(f"{type(fn).__name__} was built with eps={own_eps:g} but is evaluated at "
                                  f"eps={eps:g}; build it with the evaluation's ε")
        if eps is None:
            raise ConfigError(f"{type(fn).__name__} has no eps attribute: give External(..., eps=...)")
        own_model = getattr(fn, "model", None)
        if isinstance(own_model, nn.Module) and own_model is not model:
            raise ConfigError(f"{type(fn).__name__} was built on another model object than the one evaluated; "
                              f"build it on the evaluated model")
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self.fn = fn
        self._name = name or _fn_name(fn).lower()
        self._black_box = bool(black_box)

    @property
    def name(self) -> str:  # type: ignore[override]
        """The foreign attack's class (or function) name, lower-cased, unless one was given."""
        return self._name

    @property
    def black_box(self) -> bool:  # type: ignore[override]
        """What the caller declared (qrobust cannot see inside a foreign attack)."""
        return self._black_box

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["fn"] = _fn_name(self.fn)
        for k in ("steps", "alpha", "n_queries", "n_restarts", "loss"):
            v = getattr(self.fn, k, None)
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                cfg[k] = v
        return cfg

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        todo = self.todo
        idx = todo.nonzero().squeeze(1)
        out = x.clone()
        with torch.enable_grad():
            got = self.fn(x[idx], y[idx])
        if not isinstance(got, torch.Tensor) or got.shape != x[idx].shape:
            raise ConfigError(f"{self.name} returned {getattr(got, 'shape', type(got).__name__)}, expected a "
                              f"tensor of shape {tuple(x[idx].shape)}")
        got = got.detach().to(device=x.device, dtype=x.dtype)
        assert self.eps is not None
        over = lp_norm(got - x[idx], self.norm) > self.eps * (1 + 1e-5) + 1e-7
        over |= ((got < 0) | (got > 1)).reshape(got.shape[0], -1).any(dim=1)
        if bool(over.any()):
            log.warning("%s returned %d of %d points outside the %s ball of ε=%g or outside [0, 1]; they were "
                        "projected back", self.name, int(over.sum()), idx.numel(), self.norm, self.eps)
        out[idx] = got
        return out


def _fn_name(fn: Any) -> str:
    """A function's own name, else its class's (a torchattacks ``PGD`` object → ``"PGD"``)."""
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return fn.__name__
    return type(fn).__name__
