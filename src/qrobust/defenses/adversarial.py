"""Adversarial-training objectives: PGD-AT, FGSM-RS and TRADES, for float, quantized and binary models.

Each is an objective ``objective(model, x, y) -> (loss, logits)`` for :func:`qrobust.fit`, registered by
name (``make_objective("pgd-at", eps=8/255)``) and composable with quantization (train a model returned
by :func:`qrobust.quantize`: the perturbations are crafted through its quantizers with the
straight-through gradients QAT uses) and with regularisers (``Sum(PgdAT(...), dq_penalty)``).

=============  =====================================================================  ==================
name           loss on a batch                                                        extra cost / step
=============  =====================================================================  ==================
``pgd-at``     CE(f(x'), y), x' = PGD-k from a uniform random start (Madry et al.)    k crafting passes
``fgsm-rs``    CE(f(x'), y), x' = one step of α = 1.25ε from a uniform random start   1 crafting pass
               (Wong et al., "Fast is better than free"; train with ``schedule=
               "onecycle"``, the cyclic learning rate the recipe is known for)
``trades``     CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' = PGD-k on the KL from            k crafting passes,
               x + 0.001·N(0, 1) (Zhang et al.)                                       a clean forward and
                                                                                      a 2nd training pass
=============  =====================================================================  ==================

A crafting pass is one forward and one input-only backward (no weight gradients): 0.6–1 training step
(the upper end on small models, where fixed per-call costs dominate); the training loop's own
forward/backward comes on top. How the perturbations are crafted —
training mode with frozen BN statistics by default, ``craft_mode="eval"`` for eval mode — is documented in
:mod:`qrobust.defenses.perturb`. The logits returned for the training-accuracy column are those of the
inputs the loss is computed on (adversarial for PGD-AT/FGSM-RS, clean for TRADES).

Single-step recipes can suffer *catastrophic overfitting* (robustness to PGD collapses within an epoch
while FGSM accuracy stays high); watch for it with :class:`qrobust.defenses.guards.OverfitGuard`.

>>> import torch
>>> from torch import nn
>>> from qrobust.defenses import make_objective
>>> obj = make_objective("fgsm-rs", eps=0.1)
>>> loss, logits = obj(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.rand(2, 4), torch.tensor([0, 1]))
>>> loss.requires_grad, tuple(logits.shape)
(True, (2, 3))
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.defenses.objectives import Objective, register_objective
from qrobust.defenses.perturb import ce_per_sample, check_mode, crafting, linf_perturb
from qrobust.errors import ConfigError
from qrobust.validation import check_eps, check_int, check_positive

__all__ = ["AdversarialObjective", "FgsmRS", "PgdAT", "Trades"]


class AdversarialObjective(Objective):
    """Common settings (ε, craft mode) and the description every adversarial objective reports."""

    name: ClassVar[str] = "adversarial"

    def __init__(self, *, eps: float, craft_mode: str = "train") -> None:
        self.eps = check_eps(eps, "Linf", positive=True)
        self.craft_mode = check_mode(craft_mode)

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        out.update({k: v for k, v in vars(self).items() if not k.startswith("_")})
        return out

    def __repr__(self) -> str:
        cfg = self.config()
        cfg.pop("name")
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"


@register_objective("pgd-at")
class PgdAT(AdversarialObjective):
    """Madry et al.'s PGD adversarial training: CE on PGD-``steps`` examples (α defaults to ε/4)."""

    name = "pgd-at"

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        craft_mode: str = "train",
    ) -> None:
        super().__init__(eps=eps, craft_mode=craft_mode)
        self.alpha = check_positive("alpha", alpha) if alpha is not None else self.eps / 4
        self.steps = check_int("steps", steps)
        if not isinstance(random_start, bool):
            raise ConfigError(f"random_start must be True or False, got {random_start!r}")
        self.random_start = random_start

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = linf_perturb(
            model, x, ce_per_sample(y), eps=self.eps, alpha=self.alpha, steps=self.steps,
            start="uniform" if self.random_start else "none", mode=self.craft_mode,
        )
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits


@register_objective("fgsm-rs")
class FgsmRS(AdversarialObjective):
    """Wong et al.'s FGSM with random start: one step of α (default 1.25ε) from a uniform start in the
    ε-ball, projected back onto it. Train it with the cyclic (``onecycle``) schedule."""

    name = "fgsm-rs"
    recommended_fit: ClassVar[dict[str, Any]] = {"schedule": "onecycle"}

    def __init__(self, *, eps: float = 8 / 255, alpha: float | None = None, craft_mode: str = "train") -> None:
        super().__init__(eps=eps, craft_mode=craft_mode)
        self.alpha = check_positive("alpha", alpha) if alpha is not None else 1.25 * self.eps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = linf_perturb(
            model, x, ce_per_sample(y), eps=self.eps, alpha=self.alpha, steps=1, start="uniform",
            mode=self.craft_mode,
        )
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits


def kl_per_sample(p_clean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ softmax(logits)) per sample (p_clean fixed probabilities)."""
    logp = F.log_softmax(logits.float(), dim=1)
    return (p_clean * (torch.log(p_clean.clamp_min(1e-12)) - logp)).sum(dim=1)


@register_objective("trades")
class Trades(AdversarialObjective):
    """TRADES: ``CE(f(x), y) + β · KL(f(x) ‖ f(x'))`` with ``x'`` maximising the KL by PGD-``steps``."""

    name = "trades"

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        beta: float = 6.0,
        craft_mode: str = "train",
    ) -> None:
        super().__init__(eps=eps, craft_mode=craft_mode)
        self.alpha = check_positive("alpha", alpha) if alpha is not None else self.eps / 4
        self.steps = check_int("steps", steps)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ConfigError(f"beta must be a number ≥ 0 (TRADES uses 6), got {beta!r}")
        self.beta = float(beta)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with crafting(model, mode=self.craft_mode) as net, torch.no_grad():
            p_clean = F.softmax(net(x).float(), dim=1)
        x_adv = linf_perturb(
            model, x, lambda z: kl_per_sample(p_clean, z), eps=self.eps, alpha=self.alpha, steps=self.steps,
            start="normal", mode=self.craft_mode,
        )
        logits = model(x)
        logits_adv = model(x_adv)
        p_nat = F.softmax(logits.float(), dim=1)
        robust = (p_nat * (F.log_softmax(logits.float(), dim=1) - F.log_softmax(logits_adv.float(), dim=1)))
        loss = F.cross_entropy(logits, y) + self.beta * robust.sum(dim=1).mean()
        return loss, logits

