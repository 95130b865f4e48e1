"""CW-L∞: PGD on the Carlini–Wagner margin instead of cross-entropy (Madry et al.'s "CW loss" PGD).

The margin ``max_{j≠y} z_j − z_y`` does not saturate the way softmax cross-entropy does, so it still
pulls when CE's gradient has vanished (a classic symptom of gradient masking by large logits).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qrobust.attacks.pgd import PGD


class CWLinf(PGD):
    """PGD-L∞ ascending ``min(margin, kappa)``; ``kappa=0`` (default) stops pulling once misclassified."""

    name = "cwlinf"
    black_box = False
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = False

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        kappa: float = 0.0,
        random_start: bool = True,
        restarts: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         restarts=restarts, loss="cw", kappa=kappa, **kwargs)
