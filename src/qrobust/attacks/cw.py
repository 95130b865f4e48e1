"""CW-L2 (Carlini & Wagner 2017): minimal-L2 adversarials by Adam in tanh space, binary search over ``c``.

For each sample it minimises ``‖x' − x‖₂² + c·f(x')`` over ``x' = (tanh(w) + 1)/2`` (always in [0, 1]),
with ``f = max(z_y − max_{j≠y} z_j, −κ)`` (targeted: ``max(max_{j≠t} z_j − z_t, −κ)``), for ``steps`` Adam
steps of rate ``lr`` (stopping early when the objective stalls), keeping the smallest adversarial found.
After each of the ``binary_search_steps`` the constant is bisected per sample: lowered (towards the
largest ``c`` that failed) if an adversarial was found, raised — ×10 until one is — otherwise.

**The threat model.** CW-L2 is unbounded by design: with ``eps=None`` it returns its minimal adversarial
for every sample it fooled (and ``x`` for the others). Given ``eps``, only adversarials with
``‖x' − x‖₂ ≤ eps`` are returned — the others fall back to ``x`` — so robust accuracy at ε means what it
means for every other attack; under early stopping a sample leaves the binary search once it has one.
The smallest norm found per sample (``inf`` where none) is in ``last_norms`` either way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import Attack, lp_norm
from qrobust.attacks.losses import margin_loss
from qrobust.errors import ConfigError
from qrobust.validation import check_int, check_positive


class CW(Attack):
    """Carlini–Wagner L2 (``c``, ``kappa``, ``steps``, ``lr``, ``binary_search_steps``, optional ``eps``)."""

    name = "cw"
    black_box = False
    randomized = False
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = False

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = None,
        c: float = 1.0,
        kappa: float = 0.0,
        steps: int = 100,
        lr: float = 0.01,
        binary_search_steps: int = 5,
        abort_early: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, norm="L2", allow_unbounded=True, **kwargs)
        self.c = check_positive("c", c)
        self.kappa = check_positive("kappa", kappa, allow_zero=True)
        self.steps = check_int("steps", steps)
        self.lr = check_positive("lr", lr)
        self.binary_search_steps = check_int("binary_search_steps", binary_search_steps)
        if not isinstance(abort_early, bool):
            raise ConfigError(f"abort_early must be True or False, got {abort_early!r}")
        self.abort_early = abort_early
        #: per sample, the smallest L2 norm of an adversarial found in the last call (inf: none)
        self.last_norms: torch.Tensor | None = None

    def _f(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (-margin_loss(logits, y, targeted=self.is_targeted)).clamp_min(-self.kappa)

    def _search(
        self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One Adam run at constants ``c``: (found, best norm, best point) per sample."""
        n = x.shape[0]
        w = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        m1, m2 = torch.zeros_like(w), torch.zeros_like(w)
        b1, b2 = 0.9, 0.999
        best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        best_x = x.clone()
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        check_every = max(self.steps // 10, 1)
        prev = math.inf
        for t in range(1, self.steps + 1):
            tw = torch.tanh(w)
            xa = (tw + 1) / 2
            fl, g, logits = self.loss_and_grad(xa, y, lambda lg, yy: c * self._f(lg, yy))
            d = xa - x
            norm = lp_norm(d, "L2")
            confident = margin_loss(logits, y, targeted=self.is_targeted) >= self.kappa
            ok = self.is_success(logits, y) & confident
            better = ok & (norm < best_norm)
            best_norm[better], best_x[better] = norm[better], xa[better]
            found |= ok
            grad_w = (g + 2 * d) * (1 - tw * tw) / 2
            m1 = b1 * m1 + (1 - b1) * grad_w
            m2 = b2 * m2 + (1 - b2) * grad_w * grad_w
            w = w - self.lr * (m1 / (1 - b1**t)) / ((m2 / (1 - b2**t)).sqrt() + 1e-8)
            if self.abort_early and t % check_every == 0:
                total = float((norm * norm + fl).sum())
                if total > prev * 0.9999:
                    break
                prev = total
        return found, best_norm, best_x

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        best_x = x.clone()
        c = torch.full((n,), self.c, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(c)
        upper = torch.full_like(c, 1e10)
        run = self.todo
        for _ in range(self.binary_search_steps):
            idx = run.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            found, norm, xb = self._search(x[idx], y[idx], c[idx])
            better = norm < best_norm[idx]
            best_norm[idx[better]], best_x[idx[better]] = norm[better], xb[better]
            ci = c[idx]
            upper[idx] = torch.where(found, torch.minimum(upper[idx], ci), upper[idx])
            lower[idx] = torch.where(found, lower[idx], torch.maximum(lower[idx], ci))
            c[idx] = torch.where(upper[idx] < 1e9, (lower[idx] + upper[idx]) / 2, ci * 10)
            if self.early_stop and self.eps is not None:
                run[idx[best_norm[idx] <= self.eps]] = False
        self.last_norms = best_norm.cpu()
        ok = best_norm <= self.eps if self.eps is not None else torch.isfinite(best_norm)
        return torch.where(ok.reshape(-1, *([1] * (x.dim() - 1))), best_x, x)
