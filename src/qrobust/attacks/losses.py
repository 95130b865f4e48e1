"""Per-sample losses the attacks climb: cross-entropy, the CW margin and AutoAttack's DLR.

Every function maps ``(logits (N, K), labels (N,))`` to a per-sample tensor ``(N,)`` that is *larger* when
the attack is doing better, so an attack always ascends. ``targeted=True`` means ``labels`` are the
targets and the loss grows as the target class wins.

>>> import torch
>>> logits = torch.tensor([[2.0, 0.5, -1.0]])
>>> margin_loss(logits, torch.tensor([0])).item()  # best other (0.5) minus the true logit (2.0)
-1.5
>>> margin_loss(logits, torch.tensor([1]), targeted=True).item()  # target logit minus the best other
-1.5
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False) -> torch.Tensor:
    """Cross-entropy of the true class (untargeted) or minus that of the target class (targeted)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return -ce if targeted else ce


def _label_and_best_other(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z_label = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return z_label, others.amax(dim=1)


def margin_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False, kappa: float = float("inf")
) -> torch.Tensor:
    """Carlini–Wagner margin: ``max_{j≠y} z_j − z_y`` (untargeted) or ``z_t − max_{j≠t} z_j`` (targeted).

    Positive exactly when the attack has succeeded. ``kappa`` caps it (CW's confidence): once the margin
    reaches ``kappa`` the loss stops growing.
    """
    z_label, z_other = _label_and_best_other(logits, labels)
    m = (z_label - z_other) if targeted else (z_other - z_label)
    return m.clamp(max=kappa) if kappa != float("inf") else m


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020), untargeted; needs at least 3 classes.

    ``−(z_y − max_{j≠y} z_j) / (z_π1 − z_π3)`` with ``π`` the classes sorted by decreasing logit: the CW
    margin made invariant to shifting and rescaling the logits.
    """
    srt = logits.sort(dim=1, descending=True).values
    z_label, z_other = _label_and_best_other(logits, labels)
    return -(z_label - z_other) / (srt[:, 0] - srt[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2)``; needs at least 4 classes."""
    srt = logits.sort(dim=1, descending=True).values
    z_label = logits.gather(1, labels[:, None]).squeeze(1)
    z_target = logits.gather(1, targets[:, None]).squeeze(1)
    return -(z_label - z_target) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)
