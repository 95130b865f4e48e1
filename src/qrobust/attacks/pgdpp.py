"""PGD++ (Gupta & Ajanthan, AAAI 2022): PGD on temperature-scaled logits for binary and low-bit networks.

A binarized or low-bit network often produces logits so large that its softmax is saturated: the
cross-entropy's gradient ``(softmax(z) − onehot(y))ᵀ J`` is then zero in floating point (or points along a
single, uninformative class), and PGD stalls — not because the network is robust, but because the loss
surface it climbs is flat. PGD++ climbs ``CE(β·z, y)`` instead, with a temperature ``β`` that brings the
logits back to the range where the softmax has a gradient; the adversarial examples are judged on the real
network as always.

``beta=None`` picks β by *network Jacobian scaling* (the paper's NJS principle): ``β = rho / mean_i ‖J_i‖_F``,
with ``J_i = ∂z/∂x`` at each clean input of the call (straight-through through quantizers, like the attack's
own gradients; one backward pass per class), so the scaled logits move by about ``rho`` per unit of input
change. A float ``beta`` fixes it. The step rule, random start, restarts and early stopping are PGD's.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
>>> atk = PGDpp(net, eps=0.1, steps=3, seed=0)
>>> x = torch.rand(2, 1, 2, 2)
>>> float((atk(x, net(x).argmax(1)) - x).abs().max()) <= 0.1
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qrobust.attacks.losses import ce_loss, margin_loss
from qrobust.attacks.pgd import PGD
from qrobust.validation import check_positive


class PGDpp(PGD):
    """PGD in L∞ on ``CE(β·logits)``; ``beta=None`` estimates β from the network's Jacobian (module docstring)."""

    name = "pgd++"
    black_box = False
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = True

    def __init__(self, model: nn.Module, *, beta: float | None = None, rho: float = 1.0, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.beta = None if beta is None else check_positive("beta", beta)
        self.rho = check_positive("rho", rho)
        #: the β used in the last call (the NJS estimate when ``beta=None``)
        self.last_beta: float | None = None
        self._beta_now = 1.0

    def _jacobian_beta(self, x: torch.Tensor) -> float:
        k = self.state.clean_logits.shape[1]
        sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for c in range(k):
            _, g, _ = self.loss_and_grad(x, self.labels, lambda z, _y, c=c: z[:, c])
            sq += g.reshape(x.shape[0], -1).double().pow(2).sum(1)
        norm = float(sq.sqrt().mean())
        return self.rho / norm if norm > 0 else 1.0

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = logits * self._beta_now
        if self.loss == "cw":
            return margin_loss(z, y, targeted=self.is_targeted, kappa=self.kappa)
        return ce_loss(z, y, targeted=self.is_targeted)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._beta_now = self.beta if self.beta is not None else self._jacobian_beta(x)
        self.last_beta = self._beta_now
        return super().perturb(x, y)
