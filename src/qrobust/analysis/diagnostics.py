"""Gradient-masking diagnostics: the checks that catch a robustness number the attacks did not earn.

A quantized network is the textbook case of gradient masking: the literal gradient of ``round`` is zero
almost everywhere, so a gradient attack that trusts autograd stalls and the model *looks* robust. These
checks follow the spirit of AutoAttack's automatic flags and of ART's security curve; each returns a
:class:`Diagnostic` — a named flag with its evidence in words and the numbers behind it — and
:func:`qrobust.evaluation.evaluate` runs all of them with every report (what it measures for them:
:mod:`qrobust.analysis.diagnose`):

=============================== ==============================================================================
``zero_gradients``              the input gradient of the loss is all-zero or non-finite for many samples in
                                the gradient mode the white-box attacks use (the ``native`` fraction is
                                reported next to it for comparison)
``single_step_beats_iterative`` FGSM leaves a lower robust accuracy than PGD at the same ε
``black_box_beats_white_box``   a black-box / gradient-free / transfer attack breaks samples the white-box
                                attacks could not
``not_zero_at_large_eps``       PGD at a very large ε (default 0.5 in L∞: every pixel may reach mid-gray)
                                still leaves more than 10 % accuracy
``not_converged``               PGD with twice the steps lowers the robust accuracy further
=============================== ==============================================================================

Accuracies are fractions in [0, 1]; the tolerance ``tol`` (default 0.01, one percentage point) is the margin
by which one number must beat another before a check flags.

>>> d = check_single_step(fgsm_accuracy=0.30, pgd_accuracy=0.42, eps=0.1)
>>> d.flagged, d.name
(True, 'single_step_beats_iterative')
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.base import GRADIENTS
from qrobust.errors import ConfigError, InputError
from qrobust.quant.modes import STE_FALLBACK, attack_mode, gradient_mode, quant_modules, quantization_disabled
from qrobust.utils import eval_mode
from qrobust.validation import check_choice

#: the checks, in the order reports list them, with a one-line title each
CHECKS: dict[str, str] = {
    "zero_gradients": "Zero or non-finite input gradients",
    "single_step_beats_iterative": "Single-step attack beats iterative attack",
    "black_box_beats_white_box": "Black-box attack beats white-box attacks",
    "not_zero_at_large_eps": "Accuracy not near zero at a large ε",
    "not_converged": "More attack steps still lower accuracy",
}

#: what a raised flag means for the robust accuracy reported beside it (for reports that summarise flags)
MEANING: dict[str, str] = {
    "zero_gradients": "gradient attacks could not move some samples, so their robust accuracy is no evidence "
                      "of robustness",
    "single_step_beats_iterative": "the iterative attack is misled by the loss surface; its numbers overstate "
                                   "robustness",
    "black_box_beats_white_box": "a black-box attack found adversarials the gradient attacks missed: the "
                                 "white-box numbers alone would overstate robustness (the worst case includes it)",
    "not_zero_at_large_eps": "the attacks fail even at a huge ε, a classic sign of gradient masking",
    "not_converged": "more attack steps still lowered accuracy: the numbers are upper bounds (use more steps)",
}

DEFAULT_TOL = 0.01
NO_BLACK_BOX = "the suite has no black-box attack (add Square, e.g. the 'standard' suite)"
DEFAULT_LARGE_EPS_MAX_ACC = 0.10


@dataclass
class Diagnostic:
    """One check's outcome: ``flagged`` says whether it raises a warning, ``evidence`` says why in words.

    ``checked=False`` means the check could not run (e.g. no black-box attack in the suite); it is then never
    flagged. ``eps`` is the ε the check looked at (``None`` for checks independent of the evaluation's ε).
    """

    name: str
    flagged: bool
    evidence: str
    numbers: dict[str, Any] = field(default_factory=dict)
    eps: float | None = None
    checked: bool = True

    @property
    def title(self) -> str:
        return CHECKS.get(self.name, self.name)

    @property
    def status(self) -> str:
        """``"FLAGGED"``, ``"ok"`` or ``"not checked"``."""
        return "FLAGGED" if self.flagged else ("ok" if self.checked else "not checked")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Diagnostic:
        return cls(
            name=str(d["name"]),
            flagged=bool(d["flagged"]),
            evidence=str(d.get("evidence", "")),
            numbers=dict(d.get("numbers", {})),
            eps=None if d.get("eps") is None else float(d["eps"]),
            checked=bool(d.get("checked", True)),
        )


def _pct(v: float) -> str:
    return f"{100.0 * v:.1f}%"


def _check_fraction(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
        raise ConfigError(f"{name} must be a fraction in [0, 1], got {v!r}")
    return float(v)


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0.0 <= float(tol) < 1.0):
        raise ConfigError(f"tol must be a fraction in [0, 1) (0.01 = one percentage point), got {tol!r}")
    return float(tol)


def not_checked(name: str, reason: str, *, eps: float | None = None) -> Diagnostic:
    """A check that could not run, with the reason (never flagged)."""
    if name not in CHECKS:
        raise ConfigError(f"unknown check {name!r}; the checks are {list(CHECKS)}")
    return Diagnostic(name, False, f"not checked: {reason}", {}, eps=eps, checked=False)


# ------------------------------------------------------------------------------------ input gradients
@dataclass
class GradientHealth:
    """How many samples of a batch get a usable input gradient in one gradient mode."""

    gradients: str
    n: int
    zero: int
    nonfinite: int

    @property
    def masked(self) -> int:
        """Samples whose gradient is all-zero or contains NaN/inf."""
        return self.zero + self.nonfinite

    @property
    def masked_fraction(self) -> float:
        return self.masked / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"gradients": self.gradients, "n": self.n, "zero": self.zero, "nonfinite": self.nonfinite,
                "masked_fraction": self.masked_fraction}


def input_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gradients: str = "ste",
    surrogate: nn.Module | None = None,
) -> torch.Tensor:
    """∇ₓ of the summed cross-entropy of ``model`` at ``(x, y)`` (eval mode) in a gradient mode.

    ``gradients``: as an attack takes them (:func:`qrobust.quant.attack_mode`): ``"ste"`` (the trained
    straight-through estimators, and BPDA for a sample they leave all zero — what the attacks use),
    ``"bpda"``, ``"native"`` (literal autograd) or ``"surrogate"`` (``surrogate`` if given, else ``model``
    with its quantizers disabled). Returns a
    tensor like ``x`` (on ``x``'s device); zeros when the output does not depend on ``x`` differentiably
    (e.g. a model that detaches its input). Non-finite entries are kept, so they can be counted.
    """
    check_choice("gradients", gradients, GRADIENTS)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise InputError(f"x must be a float batch N×…, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise InputError(f"y must be a label tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', y)}")
    net = surrogate if (gradients == "surrogate" and surrogate is not None) else model
    device = next((t.device for t in list(net.parameters()) + list(net.buffers())), x.device)
    xg = x.detach().to(device).clone().requires_grad_(True)
    yd = y.to(device)
    if gradients == "surrogate":
        ctx: Any = gradient_mode("estimator")
        disabled: Any = quantization_disabled(model) if surrogate is None else _null()
    else:
        ctx, disabled = gradient_mode(attack_mode(gradients)), _null()
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(net), ctx, disabled:
        logits = net(xg)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            got = getattr(logits, "shape", type(logits).__name__)
            raise InputError(f"the model must return logits of shape (N, classes), got {got}")
        loss = F.cross_entropy(logits.float(), yd, reduction="sum")
        if not loss.requires_grad:
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    if g is None:
        return torch.zeros_like(x)
    g = g.detach()
    zero = g.reshape(g.shape[0], -1).abs().amax(dim=1) == 0
    if gradients == "ste" and bool(zero.any()) and quant_modules(model):  # the attacks' fallback, the same rule
        g[zero] = input_gradients(model, x[zero.to(x.device)], y[zero.to(y.device)], gradients=STE_FALLBACK
                                  ).to(g.device)
    return g.to(x.device)


@contextmanager
def _null() -> Iterator[None]:
    yield


def gradient_health(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gradients: str = "ste",
    surrogate: nn.Module | None = None,
) -> GradientHealth:
    """Count the samples of ``(x, y)`` whose input gradient (see :func:`input_gradients`) is all-zero or
    non-finite in the mode ``gradients``.

    >>> import torch
    >>> from torch import nn
    >>> class Detached(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return self.fc(x.detach())
    >>> h = gradient_health(Detached(), torch.rand(5, 4), torch.zeros(5, dtype=torch.long))
    >>> h.zero, h.masked_fraction
    (5, 1.0)
    """
    g = input_gradients(model, x, y, gradients=gradients, surrogate=surrogate).reshape(x.shape[0], -1)
    nonfinite = ~torch.isfinite(g).all(dim=1)
    zero = (g == 0).all(dim=1) & ~nonfinite
    return GradientHealth(gradients, int(x.shape[0]), int(zero.sum()), int(nonfinite.sum()))


# --------------------------------------------------------------------------------------------- checks
def check_zero_gradients(
    health: Mapping[str, GradientHealth],
    attack_modes: list[str] | tuple[str, ...],
    *,
    tol: float = DEFAULT_TOL,
) -> Diagnostic:
    """Flag when, in a gradient mode the white-box attacks use, more than ``tol`` of the samples get an
    all-zero or non-finite input gradient. ``health`` maps modes to :func:`gradient_health` results; the
    ``native`` entry, if present and not used by the attacks, is evidence only (quantized models have zero
    native gradients by construction — that is why attacks on them use ``ste``)."""
    tol = _check_tol(tol)
    if not attack_modes:
        return not_checked("zero_gradients", "the suite has no white-box (gradient) attack")
    missing = [m for m in attack_modes if m not in health]
    if missing:
        raise ConfigError(f"no gradient measurement for mode(s) {missing}; measure them with gradient_health")
    numbers = {f"masked_fraction_{m}": h.masked_fraction for m, h in health.items()}
    numbers.update({f"zero_{m}": h.zero for m, h in health.items()})
    numbers.update({f"nonfinite_{m}": h.nonfinite for m, h in health.items()})
    numbers["n"] = max(h.n for h in health.values())
    bad = [m for m in attack_modes if health[m].masked_fraction > tol]
    parts = []
    for m, h in health.items():
        used = " (used by the attacks)" if m in attack_modes else ""
        detail = f"{h.zero} zero, {h.nonfinite} non-finite" if h.nonfinite else f"{h.zero} zero"
        parts.append(f"{m}{used}: {_pct(h.masked_fraction)} of {h.n} samples ({detail})")
    evidence = "; ".join(parts)
    if bad:
        advice = ("Use gradients='ste' (straight-through, BPDA)" if "native" in bad else
                  "Try gradients='surrogate' (the float model's gradients)")
        evidence = (f"input gradients are all-zero or non-finite in mode {', '.join(bad)}, which the attacks "
                    f"use: gradient attacks cannot move these samples, so their robust accuracy is no "
                    f"evidence of robustness. {evidence}. {advice} and add black-box attacks "
                    f"(suite 'quantized')")
    elif "native" in health and "native" not in attack_modes and health["native"].masked_fraction > tol:
        evidence = (f"gradients usable in the attacks' mode; native autograd gradients are masked (expected "
                    f"for a quantized model: the attacks avoid them). {evidence}")
    return Diagnostic("zero_gradients", bool(bad), evidence, numbers)


def check_single_step(
    *, fgsm_accuracy: float, pgd_accuracy: float, eps: float, tol: float = DEFAULT_TOL,
    fgsm_label: str = "FGSM", pgd_label: str = "PGD",
) -> Diagnostic:
    """Flag when FGSM's robust accuracy is more than ``tol`` below PGD's at the same ε: an iterative attack
    that does worse than one step of its own direction is being misled by the loss surface."""
    fa = _check_fraction("fgsm_accuracy", fgsm_accuracy)
    pa = _check_fraction("pgd_accuracy", pgd_accuracy)
    tol = _check_tol(tol)
    flagged = fa < pa - tol
    evidence = f"{fgsm_label} (single step) leaves {_pct(fa)}, {pgd_label} (iterative) {_pct(pa)}"
    if flagged:
        evidence += (f": the single step wins by {100 * (pa - fa):.1f} points (> {100 * tol:.1f}), so the "
                     f"iterative attack is failing")
    elif fa < pa:
        evidence += (f": the single step is ahead by {100 * (pa - fa):.1f} points, within the {100 * tol:.1f}-point "
                     f"tolerance (sampling noise), so the iterative attack is not failing")
    else:
        evidence += ": the iterative attack is at least as strong, as it should be"
    return Diagnostic("single_step_beats_iterative", flagged, evidence,
                      {"fgsm_accuracy": fa, "pgd_accuracy": pa, "tol": tol}, eps=eps)


def check_black_box(
    *,
    white_box: Mapping[str, float],
    black_box: Mapping[str, float],
    black_box_extra: Mapping[str, float] | None = None,
    eps: float,
    tol: float = DEFAULT_TOL,
) -> Diagnostic:
    """Flag when a black-box attack does better than the white-box ones.

    ``white_box`` / ``black_box`` map attack labels to their *own* robust accuracy (each attack run on every
    sample). ``black_box_extra`` maps black-box labels run *after* every white-box attack, on the samples
    they all failed on, to the fraction of all samples they still broke (AutoAttack's criterion). The check
    flags when a black-box accuracy is more than ``tol`` below the best white-box one, or a black-box attack
    broke more than ``tol`` of the samples that survived every white-box attack.
    """
    tol = _check_tol(tol)
    extra = dict(black_box_extra or {})
    if not black_box and not extra:
        return not_checked("black_box_beats_white_box", NO_BLACK_BOX, eps=eps)
    wb = {k: _check_fraction(f"white_box[{k!r}]", v) for k, v in white_box.items()}
    bb = {k: _check_fraction(f"black_box[{k!r}]", v) for k, v in black_box.items()}
    extra = {k: _check_fraction(f"black_box_extra[{k!r}]", v) for k, v in extra.items()}
    if not wb and not extra:
        return not_checked("black_box_beats_white_box",
                           "no white-box attack was run on every sample to compare with", eps=eps)
    parts: list[str] = []
    beat: list[str] = []
    best: float | None = None
    if wb:
        best_label = min(wb, key=wb.__getitem__)
        best = wb[best_label]
        beat = [k for k, v in bb.items() if v < best - tol]
        parts.append(f"best white-box {best_label} {_pct(best)}")
        parts += [f"{k} {_pct(v)}" for k, v in bb.items()]
    found = [k for k, v in extra.items() if v > tol]
    parts += [f"{k} broke {_pct(v)} of all samples after every white-box attack had failed on them"
              for k, v in extra.items()]
    flagged = bool(beat or found)
    evidence = "; ".join(parts)
    if flagged:
        who = ", ".join(dict.fromkeys(beat + found))
        evidence = (f"{who} beat the white-box attacks (by > {100 * tol:.1f} points): the gradients mislead "
                    f"the white-box attacks. {evidence}")
    numbers: dict[str, Any] = {"white_box": wb, "black_box": bb, "black_box_extra": extra,
                               "best_white_box": best, "tol": tol}
    return Diagnostic("black_box_beats_white_box", flagged, evidence, numbers, eps=eps)


def check_large_eps(
    *, accuracy: float, large_eps: float, max_accuracy: float = DEFAULT_LARGE_EPS_MAX_ACC,
    attack_label: str = "PGD",
) -> Diagnostic:
    """Flag when the accuracy under an attack at a very large ε stays above ``max_accuracy``: with that much
    room any input can be pushed across a decision boundary, so a high number means the attack is blind."""
    acc = _check_fraction("accuracy", accuracy)
    limit = _check_fraction("max_accuracy", max_accuracy)
    flagged = acc > limit
    evidence = (f"{attack_label} at ε={large_eps:g} leaves {_pct(acc)} accuracy "
                f"({'above' if flagged else 'within'} the {_pct(limit)} a working attack reaches)")
    if flagged:
        evidence += ": the security curve does not fall to zero, a classic sign of gradient masking"
    return Diagnostic("not_zero_at_large_eps", flagged, evidence,
                      {"accuracy": acc, "large_eps": float(large_eps), "max_accuracy": limit})


def check_convergence(
    *, accuracy: float, accuracy_more_steps: float, steps: int, eps: float, tol: float = DEFAULT_TOL,
    label: str = "PGD",
) -> Diagnostic:
    """Flag when PGD with ``2·steps`` lowers the robust accuracy of PGD with ``steps`` by more than ``tol``:
    the attack has not converged, so the reported number is an overestimate."""
    a, b, tol = _check_fraction("accuracy", accuracy), _check_fraction("accuracy_more_steps",
                                                                        accuracy_more_steps), _check_tol(tol)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    flagged = b < a - tol
    evidence = f"{label}: {_pct(a)} with {steps} steps, {_pct(b)} with {2 * steps}"
    if flagged:
        evidence += (f" — doubling the steps lowered the accuracy by {100 * (a - b):.1f} points: not "
                     f"converged; use more steps or restarts")
    return Diagnostic("not_converged", flagged, evidence,
                      {"accuracy": a, "accuracy_more_steps": b, "steps": steps, "more_steps": 2 * steps,
                       "tol": tol}, eps=eps)


def any_flagged(diagnostics: list[Diagnostic]) -> bool:
    return any(d.flagged for d in diagnostics)
