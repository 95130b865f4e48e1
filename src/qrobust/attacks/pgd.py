"""PGD (Madry et al. 2018), L∞: random start in the ε-ball, then signed gradient steps with projection.

Semantics match torchattacks' ``PGD`` step for step: a uniform start in ``[−ε, ε]`` (clamped to [0, 1]),
then ``x ← Π(x + α·sign(∇ CE))`` where ``Π`` projects onto the ε-ball and then onto [0, 1]. With
``early_stop=False`` the last iterate is returned, as there. On top:

* ``restarts`` — further random starts; under early stopping only for samples not yet fooled, otherwise
  every sample keeps the restart that fooled it first, or else its highest-loss final iterate;
* ``loss="cw"`` — the Carlini–Wagner margin instead of cross-entropy (see :class:`~qrobust.attacks.CWLinf`);
* per-sample early stopping (the default): a sample is frozen at its first misclassified iterate and the
  remaining steps run only on the samples still classified correctly.

The iteration itself (:meth:`PGD._single_run`) is shared by BIM, MI-FGSM, PGD-L2 and CW-L∞, which change
only the start (:meth:`PGD._start`) or the step (:meth:`PGD._step`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from qrobust.attacks.base import Attack
from qrobust.attacks.losses import ce_loss, margin_loss
from qrobust.errors import ConfigError
from qrobust.validation import check_choice, check_int, check_positive

LOSSES = ("ce", "cw")


class PGD(Attack):
    """Projected gradient descent in L∞ (hyperparameters as torchattacks, plus ``restarts``; ``alpha=None``
    is ε/4)."""

    name = "pgd"
    black_box = False
    single_step = False
    supports_targeted = True
    diagnostic_role = "pgd"
    steps_in_label = True
    _NORM: ClassVar[str] = "Linf"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        kappa: float = math.inf,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, norm=self._NORM, **kwargs)
        # default step: ε/4 — torchattacks' 2/255 at ε = 8/255, and a step that still reaches the ε-ball in
        # a few iterations at MNIST's ε = 0.3 (a fixed 2/255 would need 39 steps to get there)
        self.alpha = check_positive("alpha", self._default_alpha() if alpha is None else alpha)
        self.steps = check_int("steps", steps)
        if not isinstance(random_start, bool):
            raise ConfigError(f"random_start must be True or False, got {random_start!r}")
        self.random_start = random_start
        self.restarts = check_int("restarts", restarts)
        self.loss = check_choice("loss", loss, LOSSES)
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or math.isnan(kappa):
            raise ConfigError(f"kappa must be a number ≥ 0 (or math.inf), got {kappa!r}")
        self.kappa = check_positive("kappa", kappa, allow_zero=True) if math.isfinite(kappa) else math.inf

    def _default_alpha(self) -> float:
        assert self.eps is not None
        return self.eps / 4

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        """A random start draws random numbers; without one the trajectory is deterministic."""
        return self.random_start

    # --------------------------------------------------------------------------------- the pieces
    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss == "cw":
            return margin_loss(logits, y, targeted=self.is_targeted, kappa=self.kappa)
        return ce_loss(logits, y, targeted=self.is_targeted)

    def _start(self, x: torch.Tensor) -> torch.Tensor | None:
        """A random offset for the whole batch (drawn even for samples skipped, so a sample's start does
        not depend on which others are attacked), or ``None`` for no random start."""
        if not self.random_start:
            return None
        return self.uniform(x.shape, -self.eps, self.eps)

    def _init_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample optimizer state (e.g. momentum), indexed like ``x`` of one run."""
        return {}

    def _step(
        self, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
        state: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """One update of the samples ``idx`` of the run (``x_adv``, ``grad``, ``x`` already restricted)."""
        return self.project(x_adv + self.alpha * grad.sign(), x)

    # -------------------------------------------------------------------------------- the iteration
    def _single_run(
        self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor | None, *, need_final: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run ``steps`` iterations from ``x + start``. Returns ``(x_adv, success, loss)``.

        Under early stopping a sample stops at its first successful iterate; ``success`` is then exact and
        ``loss`` is ``None``. Otherwise every sample runs all steps and ``success``/``loss`` describe the
        final iterate (computed only when ``need_final``; else ``success`` is all False).
        """
        n = x.shape[0]
        x_adv = self.project(x + start, x) if start is not None else x.clone()
        state = self._init_state(x)
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        active = torch.arange(n, device=x.device)
        for _ in range(self.steps):
            _, grad, logits = self.loss_and_grad(x_adv[active], y[active], self._loss)
            if self.early_stop:
                hit = self.is_success(logits, y[active])
                if bool(hit.any()):
                    success[active[hit]] = True
                    active, grad = active[~hit], grad[~hit]
                    if active.numel() == 0:
                        break
            x_adv[active] = self._step(x_adv[active], grad, x[active], active, state)
        if self.early_stop:
            if active.numel():
                success[active] = self.is_success(self.logits(x_adv[active]), y[active])
            return x_adv, success, None
        if not need_final:
            return x_adv, success, None
        logits = self.logits(x_adv)
        return x_adv, self.is_success(logits, y), self._loss(logits, y)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run_restarts(
            x, y, self.restarts,
            lambda xs, ys, start, need_final: self._single_run(xs, ys, start, need_final=need_final),
            draw=self._start,
        )
