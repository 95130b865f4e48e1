"""R+FGSM (Tramèr et al. 2018): a random signed step of size α, then an FGSM step of size ε − α."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import Attack
from qrobust.attacks.losses import ce_loss
from qrobust.errors import ConfigError
from qrobust.validation import check_positive


class RFGSM(Attack):
    """``x' = x + α·sign(N(0, I))``, ``x_adv = x' + (ε − α)·sign(∇ CE(x'))``: escapes the sharp curvature
    at the data point that single-step attacks get trapped by; needs ``0 < alpha < eps``.

    Under early stopping a sample already fooled by the random step keeps that point.
    """

    name = "rfgsm"
    black_box = False
    randomized = True
    single_step = True
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = False

    def __init__(
        self, model: nn.Module, *, eps: float = 8 / 255, alpha: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(model, eps=eps, norm="Linf", **kwargs)
        # default: ε/2 (torchattacks' 4/255 at ε = 8/255)
        self.alpha = check_positive("alpha", self.eps / 2 if alpha is None and self.eps is not None else alpha)
        if self.eps is not None and not self.alpha < self.eps:
            raise ConfigError(f"RFGSM needs alpha < eps (the FGSM step is eps − alpha), got alpha={alpha}, "
                              f"eps={eps}; the usual choice is alpha = eps/2")

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ce_loss(logits, y, targeted=self.is_targeted)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert self.eps is not None
        noise = self.randn(x.shape).sign()  # drawn for the whole batch: a sample's noise is its own
        idx = self.todo.nonzero().squeeze(1)
        x_adv = x.clone()
        xs = self.project(x[idx] + self.alpha * noise[idx], x[idx])
        _, grad, logits = self.loss_and_grad(xs, y[idx], self._loss)
        stepped = self.project(xs + (self.eps - self.alpha) * grad.sign(), x[idx])
        if self.early_stop:
            done = self.is_success(logits, y[idx])
            stepped[done] = xs[done]
        x_adv[idx] = stepped
        return x_adv
