"""Catastrophic-overfitting guard for single-step adversarial training (FGSM-RS, ODG-Q).

Single-step recipes can suddenly lose all robustness to multi-step attacks within an epoch while their
accuracy under FGSM stays high or even rises — *catastrophic overfitting* (Wong et al. 2020; Andriushchenko
& Flammarion 2020): the model learns to defeat the one-step linear approximation instead of the threat
model. :class:`OverfitGuard` is a :func:`qrobust.fit` callback that measures, after every epoch, FGSM and
PGD accuracy on a fixed held-out batch and flags the collapse::

    guard = OverfitGuard((x_val, y_val), eps=8/255, action="restore")
    fit(model, train, objective="fgsm-rs", callbacks=[guard], ...)

Every epoch's record (hence ``metrics.jsonl``) gets ``co_fgsm_acc``, ``co_pgd_acc``, ``co_best_pgd_acc`` and
``co_flag``; an epoch where the guard acted also gets ``co_action``. The decision (:func:`co_detected`):
PGD accuracy fell at least ``drop`` below the best PGD accuracy seen so far *and* FGSM accuracy exceeds
PGD accuracy by at least ``gap`` — a collapse under the iterative attack that the single-step one does
not see. (A drop of both together is ordinary instability, not this failure.) Actions:

``"warn"``     log a warning and keep training;
``"stop"``     end training after this epoch;
``"restore"``  put back the weights of the epoch with the best PGD accuracy, then stop (Wong et al.'s
               early stopping); the epoch checkpoint and final weights written after it are the restored ones.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from qrobust.attacks import FGSM, PGD
from qrobust.data import ArrayDataset
from qrobust.errors import ConfigError
from qrobust.utils import eval_mode, model_device
from qrobust.validation import check_eps, check_int, check_positive

log = logging.getLogger(__name__)

__all__ = ["ACTIONS", "OverfitGuard", "co_detected"]

ACTIONS = ("warn", "stop", "restore")


def co_detected(*, pgd_acc: float, fgsm_acc: float, best_pgd_acc: float, drop: float = 0.2,
                gap: float = 0.3) -> bool:
    """Whether accuracies on a held-out batch show catastrophic overfitting (see the module docstring).

    >>> co_detected(pgd_acc=0.02, fgsm_acc=0.85, best_pgd_acc=0.45)
    True
    >>> co_detected(pgd_acc=0.02, fgsm_acc=0.05, best_pgd_acc=0.45)   # everything fell: not this failure
    False
    """
    return (best_pgd_acc - pgd_acc >= drop) and (fgsm_acc - pgd_acc >= gap)


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be an accuracy difference in (0, 1], got {value!r}")
    return float(value)


class OverfitGuard:
    """A :func:`qrobust.fit` callback that detects catastrophic overfitting (module docstring).

    ``data`` — held-out ``(x, y)`` tensors or an ArrayDataset (the first ``n`` samples are used);
    ``eps`` — the training ε; ``steps``/``alpha`` — the PGD probe (default 10 steps of ε/4, random start);
    ``drop``/``gap`` — the thresholds of :func:`co_detected`; ``action`` — ``"warn"``, ``"stop"`` or
    ``"restore"``; ``seed`` — seeds the probe, so epochs are compared on identical random starts.
    """

    def __init__(
        self,
        data: Any,
        *,
        eps: float,
        n: int = 256,
        steps: int = 10,
        alpha: float | None = None,
        drop: float = 0.2,
        gap: float = 0.3,
        action: str = "warn",
        seed: int = 0,
        gradients: str = "ste",
    ) -> None:
        if isinstance(data, ArrayDataset):
            x, y = data.tensors(n)
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            x, y = data[0][:n], data[1][:n]
        else:
            raise ConfigError(f"data must be an ArrayDataset or an (x, y) pair of tensors, got {type(data).__name__}")
        if len(x) == 0 or len(x) != len(y):
            raise ConfigError(f"the guard needs a non-empty held-out batch with one label per image, got "
                              f"{len(x)} images and {len(y)} labels")
        self.x, self.y = x.detach(), y.detach()
        self.eps = check_eps(eps, "Linf", positive=True)
        self.steps = check_int("steps", steps)
        self.alpha = check_positive("alpha", alpha) if alpha is not None else self.eps / 4
        self.drop = _fraction("drop", drop)
        self.gap = _fraction("gap", gap)
        if action not in ACTIONS:
            raise ConfigError(f"action must be one of {ACTIONS}, got {action!r}")
        self.action = action
        self.seed = seed
        self.gradients = gradients
        self.best_pgd_acc = -1.0
        self.best_epoch: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        #: epochs at which catastrophic overfitting was flagged
        self.flagged: list[int] = []

    def measure(self, model: nn.Module) -> tuple[float, float]:
        """``(fgsm_acc, pgd_acc)`` of ``model`` on the held-out batch (its train/eval mode is restored)."""
        device = model_device(model)
        x, y = self.x.to(device), self.y.to(device)
        fgsm = FGSM(model, eps=self.eps, gradients=self.gradients)
        pgd = PGD(model, eps=self.eps, alpha=self.alpha, steps=self.steps, seed=self.seed,
                  gradients=self.gradients)
        out = []
        with eval_mode(model):
            for atk in (fgsm, pgd):
                x_adv = atk(x, y)
                with torch.no_grad():
                    out.append(float((model(x_adv).argmax(1) == y).float().mean()))
        return out[0], out[1]

    def __call__(self, record: dict[str, Any], model: nn.Module) -> str | None:
        fgsm_acc, pgd_acc = self.measure(model)
        epoch = int(record.get("epoch", len(self.flagged) + 1))
        flag = self.best_pgd_acc >= 0 and co_detected(
            pgd_acc=pgd_acc, fgsm_acc=fgsm_acc, best_pgd_acc=self.best_pgd_acc, drop=self.drop, gap=self.gap)
        record.update({"co_fgsm_acc": fgsm_acc, "co_pgd_acc": pgd_acc,
                       "co_best_pgd_acc": max(self.best_pgd_acc, pgd_acc), "co_flag": bool(flag)})
        if not flag:
            if pgd_acc > self.best_pgd_acc:
                self.best_pgd_acc, self.best_epoch = pgd_acc, epoch
                if self.action == "restore":
                    self._best_state = copy.deepcopy(model.state_dict())
            return None
        self.flagged.append(epoch)
        log.warning(
            "catastrophic overfitting at epoch %d: PGD-%d accuracy %.1f%% (best %.1f%% at epoch %s) while FGSM "
            "accuracy is %.1f%%", epoch, self.steps, 100 * pgd_acc, 100 * self.best_pgd_acc, self.best_epoch,
            100 * fgsm_acc)
        if self.action == "warn":
            return None
        if self.action == "restore" and self._best_state is not None:
            model.load_state_dict(self._best_state)
            record["co_action"] = f"restored epoch {self.best_epoch} and stopped"
        else:
            record["co_action"] = "stopped"
        return "stop"
