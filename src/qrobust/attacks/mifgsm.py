"""MI-FGSM (Dong et al. 2018): iterated FGSM with a momentum of L1-normalized gradients, L∞."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qrobust.attacks.pgd import PGD
from qrobust.validation import check_positive


class MIFGSM(PGD):
    """``g ← decay·g + ∇/‖∇‖₁``, ``x ← Π(x + α·sign(g))``; no random start (deterministic)."""

    name = "mifgsm"
    black_box = False
    randomized = False
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = True

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        decay: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=False, restarts=1, **kwargs)
        self.decay = check_positive("decay", decay, allow_zero=True)

    def _init_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum": torch.zeros_like(x)}

    def _step(
        self, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
        state: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        l1 = grad.abs().reshape(grad.shape[0], -1).mean(dim=1).clamp_min(1e-12)
        g = self.decay * state["momentum"][idx] + grad / l1.reshape(-1, *([1] * (grad.dim() - 1)))
        state["momentum"][idx] = g
        return self.project(x_adv + self.alpha * g.sign(), x)
