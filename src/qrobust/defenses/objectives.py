"""Training objectives: ``objective(model, x, y) -> loss``.

The training loop knows nothing but this call. An objective may instead return ``(loss, logits)`` so the
loop can report training accuracy without a second forward pass. Objectives compose by addition
(:class:`Sum`), which is how a regulariser such as the Defensive-Quantization penalty joins any loss.

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
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError


class Objective(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any: ...


def split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, logits or None)`` from whatever an objective returned."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


class CrossEntropy:
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


_HOOKS = ("on_epoch_start", "set_batch_view", "state_dict", "load_state_dict", "callback", "recommended_fit")


class Sum:
    """``main(model, x, y) + Σ regularizer(model)``: a loss plus model-only penalties."""

    def __init__(self, main: Objective, *regularizers: Callable[[nn.Module], torch.Tensor]) -> None:
        self.main = main
        self.regularizers = regularizers
        self.name = "+".join([getattr(main, "name", "objective")] + [getattr(r, "name", "reg") for r in regularizers])

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        loss, logits = split_output(self.main(model, x, y))
        for reg in self.regularizers:
            loss = loss + reg(model)
        return loss, logits

    def __getattr__(self, name: str) -> Any:
        # the loop's optional hooks (per-epoch, per-batch, state, metrics) belong to the main objective
        if name in _HOOKS and "main" in self.__dict__:
            return getattr(self.__dict__["main"], name)
        raise AttributeError(name)

    def config(self) -> dict[str, Any]:
        def cfg(o: Any) -> Any:
            return o.config() if hasattr(o, "config") else {"name": getattr(o, "name", type(o).__name__)}

        return {"name": self.name, "main": cfg(self.main), "regularizers": [cfg(r) for r in self.regularizers]}


# name -> factory(**options) ; later recipes (dq, pgd-at, fgsm-rs, trades, odgq) register here
OBJECTIVES: dict[str, Callable[..., Objective]] = {"ce": CrossEntropy}


def register_objective(name: str, factory: Callable[..., Objective]) -> None:
    OBJECTIVES[name] = factory


def make_objective(spec: str | Objective, **options: Any) -> Objective:
    """An objective from its name (``"ce"`` …) and options, or ``spec`` itself if it is already callable."""
    if callable(spec):
        return spec
    if spec not in OBJECTIVES:
        raise ConfigError(f"unknown objective {spec!r}; choose one of {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[spec](**options)
    except TypeError as e:
        raise ConfigError(f"bad options for objective {spec!r}: {e}") from e
