"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness…"): step-size-free PGD.

One run, for each sample:

* start at ``x + ε·u`` (``u`` uniform in the L∞ unit ball scaled to touch its surface, or a Gaussian
  direction of unit L2 norm), step size ``η = 2ε``;
* each iteration takes a projected gradient step ``z = Π(x_k + η·dir(∇))`` (``dir`` = sign in L∞, the unit
  L2 direction in L2) and adds momentum: ``x_{k+1} = Π(x_k + a·(z − x_k) + (1 − a)·(x_k − x_{k−1}))``
  with ``a = 0.75`` (1 on the first step);
* at the checkpoints ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`` (as fractions
  of ``n_iter``) the step size of a sample is halved, and it restarts from its best point so far, when
  (1) the loss increased in at most a fraction ``rho`` (0.75) of the steps since the previous checkpoint,
  or (2) the step size was not reduced at the previous checkpoint and the best loss has not improved since;
* the result is the point with the highest loss, or an adversarial one as soon as one is found.

``loss`` is ``"ce"`` (cross-entropy) or ``"dlr"`` (Difference of Logits Ratio, scale invariant; ≥ 3
classes). The history-of-losses test compares each step with the one before it, the starting loss
included. Under early stopping (the default) a sample leaves the computation at its first adversarial
iterate and restarts run only on the samples not yet fooled, as in AutoAttack.

Against AutoAttack's and torchattacks' code the algorithm differs in four places: the first oscillation
window compares step 1 with the starting loss (theirs with an unfilled 0), a sample stops at its first
adversarial iterate (theirs run on and return the last), a quantized model's all-zero gradients fall back to
BPDA, and every iterate stays inside the ε-ball in float32 (their clamp to ``x ± ε`` can round up to ~3e-8
outside). Given the same images and seed both draw the same random start; with only the projection swapped,
ours fools exactly the images torchattacks' fools (tests/test_reference_attacks.py, float and w4a4 MNIST).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import Attack, default_eps, lp_norm, unit_l2
from qrobust.attacks.losses import ce_loss, dlr_loss, dlr_targeted_loss
from qrobust.errors import ConfigError
from qrobust.validation import check_choice, check_int, check_positive

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def apgd_checkpoints(n_iter: int) -> list[int]:
    """Iteration counts after which APGD reconsiders its step sizes: gaps of ``0.22·n_iter``, each next gap
    ``0.03·n_iter`` shorter, never below ``0.06·n_iter`` (≥ 1) — the paper's ``p_j`` times ``n_iter``.

    >>> apgd_checkpoints(100)
    [22, 41, 57, 70, 80, 87, 93, 99]
    """
    k = max(int(0.22 * n_iter), 1)
    k_min, k_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    out, t = [], 0
    while t + k <= n_iter:
        t += k
        out.append(t)
        k = max(k - k_decr, k_min)
    return out


class APGD(Attack):
    """Auto-PGD with CE or DLR loss in L∞ or L2 (``eps``, ``norm``, ``n_iter``, ``restarts``, ``rho``).

    ``eps=None`` means 8/255 in L∞ and 0.5 in L2.
    """

    black_box = False
    randomized = True
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = False
    aliases = {"steps": "n_iter", "n_restarts": "restarts"}

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = None,
        norm: str = "Linf",
        n_iter: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=default_eps(eps, norm), norm=norm, **kwargs)
        self.n_iter = check_int("n_iter", n_iter)
        self.restarts = check_int("restarts", restarts)
        self.loss = check_choice("loss", loss, self._losses())
        self.rho = check_positive("rho", rho, maximum=1.0)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``apgd-ce`` or ``apgd-dlr``: the registry name of this loss."""
        return f"apgd-{self.loss}"

    @staticmethod
    def _losses() -> tuple[str, ...]:
        return ("ce", "dlr")

    # ------------------------------------------------------------------------------------------ math
    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            t = self.uniform(x.shape, -1.0, 1.0)
            return t / _per_sample(lp_norm(t, "Linf").clamp_min(1e-12), t)
        t = self.randn(x.shape)
        return t / _per_sample(lp_norm(t, "L2").clamp_min(1e-12), t)

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            return grad.sign()
        return unit_l2(grad)

    def _loss_fn(self, num_classes: int) -> LossFn:
        if self.loss == "dlr":
            if num_classes < 3:
                raise ConfigError(f"the DLR loss needs at least 3 classes, the model has {num_classes}; use "
                                  f"loss='ce'")
            if self.is_targeted:
                return lambda logits, yy: dlr_targeted_loss(logits, yy[:, 0], yy[:, 1])
            return lambda logits, yy: dlr_loss(logits, yy[:, 0])
        targeted = self.is_targeted
        return lambda logits, yy: ce_loss(logits, yy[:, 1], targeted=targeted)

    def _single_run(
        self, x: torch.Tensor, y: torch.Tensor, y_loss: torch.Tensor, start: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run on ``x``; success is judged against ``y``, the loss sees ``y_loss``.

        Returns ``(x_adv, success, best_loss)``: ``x_adv`` is an adversarial iterate where one was found
        (the first under early stopping, the last otherwise, as AutoAttack), else the highest-loss one.
        """
        assert self.eps is not None
        n, n_iter = x.shape[0], self.n_iter
        checkpoints, last_check = set(apgd_checkpoints(n_iter)), 0

        x_adv = self.project(x + self.eps * start, x)
        loss, grad, logits = self.loss_and_grad(x_adv, y_loss, loss_fn)
        success = self.is_success(logits, y)
        x_found = x_adv.clone()
        x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
        step = torch.full((n,), 2.0 * self.eps, dtype=x.dtype, device=x.device)
        x_prev = x_adv.clone()
        history = torch.zeros(n_iter + 1, n, dtype=x.dtype, device=x.device)
        history[0] = loss
        best_at_check = loss_best.clone()
        reduced_at_check = torch.ones(n, dtype=torch.bool, device=x.device)
        everyone = torch.arange(n, device=x.device)
        active = everyone[~success] if self.early_stop else everyone

        for i in range(n_iter):
            if active.numel() == 0:
                break
            a = active
            xa, xo = x_adv[a], x_prev[a]
            x_prev[a] = xa
            z = self.project(xa + _per_sample(step[a], xa) * self._direction(grad[a]), x[a])
            mix = 0.75 if i > 0 else 1.0
            x_new = self.project(xa + mix * (z - xa) + (1.0 - mix) * (xa - xo), x[a])
            x_adv[a] = x_new
            loss, g, logits = self.loss_and_grad(x_new, y_loss[a], loss_fn)
            grad[a] = g
            hit = self.is_success(logits, y[a])
            record = hit & ~success[a] if self.early_stop else hit
            x_found[a[record]] = x_new[record]
            success[a[hit]] = True
            history[i + 1, a] = loss
            better = loss > loss_best[a]
            ab = a[better]
            x_best[ab], grad_best[ab], loss_best[ab] = x_new[better], g[better], loss[better]

            if i + 1 in checkpoints:
                k, last_check = i + 1 - last_check, i + 1
                h = history[i + 1 - k : i + 2][:, a]
                increases = (h[1:] > h[:-1]).sum(dim=0)
                cond1 = increases <= k * self.rho
                cond2 = ~reduced_at_check[a] & (best_at_check[a] >= loss_best[a])
                reduce = cond1 | cond2
                reduced_at_check[a] = reduce
                best_at_check[a] = loss_best[a]
                ar = a[reduce]
                step[ar] /= 2.0
                x_adv[ar] = x_best[ar]
                grad[ar] = grad_best[ar]
            if self.early_stop:
                active = active[~success[active]]

        out = torch.where(_per_sample(success, x), x_found, x_best)
        return out, success, loss_best

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss_fn = self._loss_fn(self.state.clean_logits.shape[1])
        y_loss = torch.stack([self.labels, y], dim=1)  # (true label, goal label) for the loss functions

        def single(
            xs: torch.Tensor, ys: torch.Tensor, mat: Any, need_final: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            start, idx = mat
            return self._single_run(xs, ys, y_loss[idx], start, loss_fn)

        n = x.shape[0]
        return self.run_restarts(x, y, self.restarts, single,
                                 draw=lambda xx: (self._draw(xx), torch.arange(n, device=xx.device)))

