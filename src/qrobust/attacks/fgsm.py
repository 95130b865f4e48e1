"""FGSM (Goodfellow et al. 2015): one step of size ε along the sign of the loss gradient, L∞."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import Attack
from qrobust.attacks.losses import ce_loss


class FGSM(Attack):
    """``x_adv = clip(x + ε·sign(∇ₓ CE(f(x), y)))``; targeted: descend the CE of the target instead.

    >>> import torch
    >>> from torch import nn
    >>> atk = FGSM(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), eps=0.1, early_stop=False)
    >>> x = torch.full((2, 4), 0.5)
    >>> bool(((atk(x, torch.tensor([0, 1])) - x).abs() <= 0.1 + 1e-7).all())
    True
    """

    name = "fgsm"
    black_box = False
    randomized = False
    single_step = True
    supports_targeted = True
    diagnostic_role = "fgsm"
    steps_in_label = False

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, **kwargs: Any) -> None:
        super().__init__(model, eps=eps, norm="Linf", **kwargs)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ce_loss(logits, y, targeted=self.is_targeted)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        idx = self.todo.nonzero().squeeze(1)
        x_adv = x.clone()
        _, grad, _ = self.loss_and_grad(x[idx], y[idx], self._loss)
        x_adv[idx] = self.project(x[idx] + self.eps * grad.sign(), x[idx])
        return x_adv
