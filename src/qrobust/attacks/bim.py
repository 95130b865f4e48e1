"""BIM / I-FGSM (Kurakin et al. 2017): PGD without a random start — iterated FGSM steps of size α."""

from __future__ import annotations

from typing import Any

from torch import nn

from qrobust.attacks.pgd import PGD


class BIM(PGD):
    """Basic iterative method in L∞: from ``x``, ``steps`` signed steps of ``alpha``, projected each time.

    Deterministic (no random start): identical calls give identical results whatever the seed.
    """

    name = "bim"
    black_box = False
    randomized = False
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = True

    def __init__(
        self, model: nn.Module, *, eps: float = 8 / 255, alpha: float | None = None, steps: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=False, restarts=1, **kwargs)
