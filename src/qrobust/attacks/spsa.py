"""SPSA (Uesato et al. 2018): a gradient-free L∞ attack from finite differences along random directions.

Each step estimates the gradient of the margin loss at ``x_adv`` from ``nb_samples`` evaluations at
``x_adv ± delta·v`` (``nb_samples/2`` antithetic pairs of Rademacher directions ``v``):
``ĝ = mean_v [(L(x + δv) − L(x − δv)) / (2δ) · v]``, then ascends with Adam (``update="adam"``, learning
rate ``lr``) or a signed step (``update="sign"``) and projects onto the ε-ball and [0, 1]. The loss is the
CW margin, positive once the sample is adversarial; the model is only queried for logits, so gradient
masking (quantizers, non-differentiable layers) does not hide anything from it.

Per-sample early stopping (default) checks the new point after every step and drops fooled samples.
Queries per sample (the ``nb_samples + 1`` of every step it took part in, plus the check of its start)
are left in ``last_queries``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import Attack
from qrobust.attacks.losses import margin_loss
from qrobust.errors import ConfigError
from qrobust.validation import check_choice, check_int, check_positive


class SPSA(Attack):
    """SPSA with Adam or sign updates (``eps``, ``steps``, ``nb_samples``, ``delta``, ``lr``, ``update``)."""

    name = "spsa"
    black_box = True
    randomized = True
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = False

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        steps: int = 100,
        nb_samples: int = 128,
        delta: float = 0.01,
        lr: float = 0.01,
        update: str = "adam",
        random_start: bool = True,
        max_batch: int = 8192,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, norm="Linf", **kwargs)
        self.steps = check_int("steps", steps)
        self.nb_samples = check_int("nb_samples", nb_samples, minimum=2)
        if self.nb_samples % 2:
            raise ConfigError(f"nb_samples must be even (antithetic pairs ±v), got {nb_samples}")
        self.delta = check_positive("delta", delta)
        self.lr = check_positive("lr", lr)
        self.update = check_choice("update", update, ("adam", "sign"))
        if not isinstance(random_start, bool):
            raise ConfigError(f"random_start must be True or False, got {random_start!r}")
        self.random_start = random_start
        self.max_batch = check_int("max_batch", max_batch)
        #: model evaluations per sample in the last call
        self.last_queries: torch.Tensor | None = None

    def _losses(self, pts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Margin loss at ``pts`` (``(n, m, …)``) for labels ``y`` (``(n,)``) → ``(n, m)``, in chunks."""
        n, m = pts.shape[:2]
        flat = pts.reshape(n * m, *pts.shape[2:])
        labels = y.repeat_interleave(m)
        out = []
        for i in range(0, n * m, self.max_batch):
            logits = self.logits(flat[i : i + self.max_batch])
            out.append(margin_loss(logits, labels[i : i + self.max_batch], targeted=self.is_targeted))
        return torch.cat(out).reshape(n, m)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert self.eps is not None
        n = x.shape[0]
        start = self.uniform(x.shape, -self.eps, self.eps) if self.random_start else torch.zeros_like(x)
        idx = self.todo.nonzero().squeeze(1)
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        x_out = x.clone()
        xs, ys = x[idx], y[idx]
        x_adv = self.project(xs + start[idx], xs)
        m1, m2 = torch.zeros_like(xs), torch.zeros_like(xs)
        b1, b2 = 0.9, 0.999
        active = torch.arange(idx.numel(), device=x.device)
        if self.early_stop:
            hit = self.is_success(self.logits(x_adv), ys)
            queries[idx] += 1
            active = active[~hit]
        pairs = self.nb_samples // 2
        for t in range(1, self.steps + 1):
            if active.numel() == 0:
                break
            xa = x_adv[active]
            v = self.rademacher((active.numel(), pairs, *xs.shape[1:]))
            pts = torch.cat([xa[:, None] + self.delta * v, xa[:, None] - self.delta * v], dim=1)
            losses = self._losses(pts, ys[active])
            diff = (losses[:, :pairs] - losses[:, pairs:]) / (2 * self.delta)
            g = (diff.reshape(*diff.shape, *([1] * (xs.dim() - 1))) * v).mean(dim=1)
            queries[idx[active]] += self.nb_samples
            if self.update == "adam":
                m1[active] = b1 * m1[active] + (1 - b1) * g
                m2[active] = b2 * m2[active] + (1 - b2) * g * g
                step = (m1[active] / (1 - b1**t)) / ((m2[active] / (1 - b2**t)).sqrt() + 1e-8)
            else:
                step = g.sign()
            x_adv[active] = self.project(xa + self.lr * step, xs[active])
            if self.early_stop:
                hit = self.is_success(self.logits(x_adv[active]), ys[active])
                queries[idx[active]] += 1
                active = active[~hit]
        x_out[idx] = x_adv
        self.last_queries = queries.cpu()
        return x_out
