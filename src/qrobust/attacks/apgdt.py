"""APGD-T (Croce & Hein 2020): APGD on the *targeted* DLR loss, tried against each of the top-k classes.

For every sample the candidate targets are the classes the clean model ranks 2nd, 3rd, … (up to
``n_target_classes``, default 9); one APGD run (``restarts`` of them) is made per target, each only on the
samples not yet misclassified (under early stopping). Success is plain misclassification, so APGD-T is an
untargeted attack that uses targets internally and refuses a ``target=`` of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qrobust.attacks.apgd import APGD, LossFn
from qrobust.attacks.losses import ce_loss, dlr_targeted_loss
from qrobust.errors import ConfigError
from qrobust.validation import check_int


class APGDT(APGD):
    """Targeted-DLR APGD over the top ``n_target_classes`` classes (``loss="ce"``: targeted CE instead)."""

    black_box = False
    randomized = True
    single_step = False
    supports_targeted = False
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
        n_target_classes: int = 9,
        restarts: int = 1,
        loss: str = "dlr",
        rho: float = 0.75,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, n_iter=n_iter, restarts=restarts, loss=loss, rho=rho,
                         **kwargs)
        self.n_target_classes = check_int("n_target_classes", n_target_classes)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``apgd-t`` (targeted DLR, the registry name) or ``apgd-t-ce``."""
        return "apgd-t" if self.loss == "dlr" else "apgd-t-ce"

    def _loss_fn(self, num_classes: int) -> LossFn:
        if self.loss == "dlr":
            if num_classes < 4:
                raise ConfigError(f"the targeted DLR loss needs at least 4 classes, the model has "
                                  f"{num_classes}; use loss='ce'")
            return lambda logits, yt: dlr_targeted_loss(logits, yt[:, 0], yt[:, 1])
        return lambda logits, yt: ce_loss(logits, yt[:, 1], targeted=True)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        clean = self.state.clean_logits
        loss_fn = self._loss_fn(clean.shape[1])
        n_targets = min(self.n_target_classes, clean.shape[1] - 1)
        ranked = clean.argsort(dim=1, descending=True)  # ranked[:, 0] is the clean prediction
        rounds = iter(range(n_targets * self.restarts))

        def draw(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            r = next(rounds)
            return self._draw(xx), ranked[:, 1 + r // self.restarts]

        def single(
            xs: torch.Tensor, ys: torch.Tensor, mat: Any, need_final: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            start, targets = mat
            return self._single_run(xs, ys, torch.stack([ys, targets], dim=1), start, loss_fn)

        return self.run_restarts(x, y, n_targets * self.restarts, single, draw=draw)
