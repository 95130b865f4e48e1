"""Training objectives: the protocol :func:`qrobust.fit` relies on, the registry of names, and composition.

An objective is an :class:`Objective`: called as ``objective(model, x, y)`` it returns the loss, or
``(loss, logits)`` so the loop can report training accuracy without a second forward pass. Its optional
hooks have no-op defaults, and :func:`qrobust.fit` calls them directly:

* ``on_epoch_start(epoch)`` — before each epoch;
* ``set_batch_view(view)`` — before each step, with the loader's :class:`~qrobust.data.BatchView` (dataset
  indices and augmentation) or None;
* ``state_dict()`` / ``load_state_dict(state)`` — state saved with every epoch checkpoint and restored on
  resume (``None``: stateless);
* ``callback(record, model)`` — after each epoch on rank 0; may add keys to ``record`` or return ``"stop"``;
* ``recommended_fit`` — :class:`~qrobust.training.FitConfig` settings the recipe is usually trained with.

A plain callable ``(model, x, y) -> loss`` is wrapped (:func:`as_objective`). Objectives compose by addition
(:class:`Sum`), which is how a regulariser such as the Defensive-Quantization penalty joins any loss.
Every built-in registers its name with :func:`register_objective`; ``qrobust.defenses`` imports them all,
so :func:`make_objective` finds each by name whichever module the caller imported.

>>> import torch
>>> from torch import nn
>>> obj = make_objective("ce")
>>> model = nn.Linear(4, 3)
>>> loss, logits = obj(model, torch.zeros(2, 4), torch.tensor([0, 1]))
>>> round(loss.item(), 4) == round(float(torch.log(torch.tensor(3.0))), 4) or loss.item() > 0
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError


class Objective:
    """Base of every training objective: ``__call__`` is the loss, the loop's hooks default to no-ops."""

    #: the optional hooks :func:`qrobust.fit` calls (and :class:`Sum` forwards to its main objective)
    HOOKS: ClassVar[tuple[str, ...]] = (
        "on_epoch_start",
        "set_batch_view",
        "state_dict",
        "load_state_dict",
        "callback",
        "recommended_fit",
    )
    #: FitConfig settings the recipe is usually trained with (the CLI applies them unless told otherwise)
    recommended_fit: ClassVar[dict[str, Any]] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(model, x, y) -> loss")

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    def set_batch_view(self, view: Any) -> None:
        """Called before each step with where the batch came from (a ``BatchView``) or None."""

    def state_dict(self) -> dict[str, Any] | None:
        """State to save with each epoch checkpoint; None when the objective has none."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""

    def callback(self, record: dict[str, Any], model: nn.Module) -> Any:
        """Called after each epoch on rank 0; may add keys to ``record`` or return ``"stop"``."""
        return None

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description (recorded in the run's ``config.json``)."""
        return {"name": getattr(self, "name", type(self).__name__)}


class FunctionObjective(Objective):
    """A plain callable ``fn(model, x, y) -> loss`` as an :class:`Objective`.

    Hooks that ``fn`` itself has (an objective written before the protocol was declared) are kept.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name = getattr(fn, "name", type(fn).__name__)
        for hook in self.HOOKS:
            if hasattr(fn, hook):
                setattr(self, hook, getattr(fn, hook))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self.fn(model, x, y)

    def config(self) -> dict[str, Any]:
        return self.fn.config() if hasattr(self.fn, "config") else {"name": self.name}


def as_objective(obj: Any) -> Objective:
    """``obj`` if it is an :class:`Objective`, a plain callable wrapped as one, else ConfigError."""
    if isinstance(obj, Objective):
        return obj
    if callable(obj):
        return FunctionObjective(obj)
    raise ConfigError(
        f"an objective must be a registered name ({', '.join(sorted(OBJECTIVES))}) or a callable "
        f"(model, x, y) -> loss, got {type(obj).__name__}"
    )


_Factory = TypeVar("_Factory", bound=Callable[..., Any])

# name -> factory(**options) returning an Objective; filled by @register_objective
OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str) -> Callable[[_Factory], _Factory]:
    """Class or function decorator: ``make_objective(name, **options)`` builds an objective with it."""

    def decorate(factory: _Factory) -> _Factory:
        OBJECTIVES[name] = factory
        return factory

    return decorate


def split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, logits or None)`` from whatever an objective returned."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


@register_objective("ce")
class CrossEntropy(Objective):
    """Natural training: cross-entropy on clean inputs (optionally label-smoothed)."""

    name = "ce"

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "label_smoothing": self.label_smoothing}


class Sum(Objective):
    """``main(model, x, y) + Σ regularizer(model)``: a loss plus model-only penalties.

    The loop's hooks (:attr:`Objective.HOOKS`: per-epoch, per-batch, state, metrics, recommended settings)
    are the main objective's own.
    """

    def __init__(self, main: Any, *regularizers: Callable[[nn.Module], torch.Tensor]) -> None:
        self.name = "+".join([getattr(main, "name", "objective")] + [getattr(r, "name", "reg") for r in regularizers])
        self.main = as_objective(main)
        self.regularizers = regularizers
        for hook in self.HOOKS:
            setattr(self, hook, getattr(self.main, hook))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        loss, logits = split_output(self.main(model, x, y))
        for reg in self.regularizers:
            loss = loss + reg(model)
        return loss, logits

    def config(self) -> dict[str, Any]:
        def cfg(o: Any) -> Any:
            return o.config() if hasattr(o, "config") else {"name": getattr(o, "name", type(o).__name__)}

        return {"name": self.name, "main": cfg(self.main), "regularizers": [cfg(r) for r in self.regularizers]}


def make_objective(spec: Any, **options: Any) -> Objective:
    """An objective from its registered name (``"ce"`` …) and options, or ``spec`` itself as an Objective."""
    if callable(spec):
        return as_objective(spec)
    if spec not in OBJECTIVES:
        raise ConfigError(f"unknown objective {spec!r}; choose one of {sorted(OBJECTIVES)}")
    try:
        return as_objective(OBJECTIVES[spec](**options))
    except TypeError as e:
        raise ConfigError(f"bad options for objective {spec!r}: {e}") from e
