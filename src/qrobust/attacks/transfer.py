"""Transfer attack: craft adversarials with a white-box attack on a *source* model, apply them to the target.

The target model is never differentiated — only its clean predictions are used (to skip samples it
already gets wrong, under early stopping). A transfer attack beating the white-box ones on the target is
a classic sign of gradient masking (AutoAttack's and ART's checks), which is why it belongs in every
evaluation of a quantized model: the float parent model is the natural source.

Two ways to build one::

    Transfer(q_model, source=float_model, attack="pgd", eps=8/255, steps=20)
    Transfer(q_model, source_attack=PGD(float_model, eps=8/255, steps=20))

Built from a name, the source attack runs with ``early_stop=False`` by default: stopping at the first
point that fools the *source* makes weak transfers. The threat model (``eps``, ``norm``) is the source
attack's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import Attack
from qrobust.errors import ConfigError


class Transfer(Attack):
    """Adversarials from ``source_attack`` (or ``attack`` built on ``source``), judged on ``model``."""

    name = "transfer"
    black_box = True
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = False

    def __init__(
        self,
        model: nn.Module,
        *,
        source: nn.Module | None = None,
        attack: str | type[Attack] | Attack = "pgd",
        source_attack: Attack | None = None,
        early_stop: bool = True,
        targeted: bool | str = False,
        **attack_kwargs: Any,
    ) -> None:
        if source_attack is None and isinstance(attack, Attack):
            source_attack = attack
        if source_attack is not None:
            if source is not None or attack_kwargs:
                raise ConfigError("give either source_attack=<an Attack> or source=<model> with attack= and "
                                  "its settings, not both")
            if not isinstance(source_attack, Attack):
                raise ConfigError(f"source_attack must be an Attack, got {type(source_attack).__name__}")
        else:
            if not isinstance(source, nn.Module):
                raise ConfigError("Transfer needs source=<the model to craft on> (or source_attack=...)")
            attack_kwargs.setdefault("early_stop", False)
            if isinstance(attack, str):
                from qrobust.attacks import make_attack  # deferred: the attacks package imports this module

                source_attack = make_attack(attack, source, **attack_kwargs)
            elif isinstance(attack, type) and issubclass(attack, Attack):
                source_attack = attack(source, **attack_kwargs)
            else:
                raise ConfigError(f"attack must be a name, an Attack class or instance, got {attack!r}")
        if isinstance(source_attack, Transfer):
            raise ConfigError("a Transfer attack cannot be the source of another")
        self.source_attack = source_attack
        super().__init__(model, eps=source_attack.eps, norm=source_attack.norm, early_stop=early_stop,
                         targeted=targeted, seed=source_attack.seed, allow_unbounded=True)
        self.attack = source_attack.name

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        """The source attack decides: a transfer draws random numbers only through it."""
        return self.source_attack.randomized

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        idx = self.todo.nonzero().squeeze(1)
        src = self.source_attack
        x_out = x.clone()
        if self.is_targeted:
            if not src.supports_targeted:
                raise ConfigError(f"the source attack {src.name} takes no targets")
            x_out[idx] = src(x[idx], self.labels[idx], target=y[idx]).to(x.dtype)
        else:
            x_out[idx] = src(x[idx], y[idx]).to(x.dtype)
        return x_out
