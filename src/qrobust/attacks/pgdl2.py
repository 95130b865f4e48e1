"""PGD in L2 (as torchattacks' ``PGDL2``): a random start in the L2 ball, normalized gradient steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import lp_norm, unit_l2
from qrobust.attacks.pgd import PGD


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class PGDL2(PGD):
    """``x ← Π₂(x + α·∇/‖∇‖₂)`` from a start ``x + r·ε·u`` (``u`` a random unit direction, ``r ~ U(0, 1)``).

    ``eps`` is an L2 radius on the [0, 1] pixel scale (e.g. 0.5 on CIFAR-10); it may exceed 1.
    """

    name = "pgdl2"
    black_box = False
    single_step = False
    supports_targeted = True
    diagnostic_role = "pgd"
    steps_in_label = True
    _NORM = "L2"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 0.5,
        alpha: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         restarts=restarts, **kwargs)

    def _default_alpha(self) -> float:
        assert self.eps is not None
        return self.eps / 5  # torchattacks' 0.1 at ε = 0.5

    def _start(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.random_start:
            return None
        d = self.randn(x.shape)
        d = d / _per_sample(lp_norm(d, "L2").clamp_min(1e-12), x)
        r = self.uniform((x.shape[0],))
        return d * _per_sample(r * self.eps, x)

    def _step(
        self, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
        state: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        return self.project(x_adv + self.alpha * unit_l2(grad), x)
