"""Running the gradient-masking diagnostics after an evaluation: the probes, then the checks.

:mod:`qrobust.analysis.diagnostics` holds the checks (pure functions of accuracies and gradients); this
module decides what to measure for them, given what the evaluation already ran. On the first
``settings.n`` samples it costs: one input-gradient batch per gradient mode the white-box attacks use
(and ``native``); FGSM and PGD-k at each ε unless the suite ran its FGSM / PGD reference
(:attr:`~qrobust.attacks.Attack.diagnostic_role`) on every sample; PGD-2k at each ε; one PGD-k at
``large_eps`` (L∞). The black-box check reads the suite's own results, split by what each attack's class
declares (:attr:`~qrobust.attacks.Attack.black_box`).

The evaluation hands in what it ran and a way to run an attack (``attack_ok``), so this room does not
depend on the evaluation's runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qrobust.analysis.diagnostics import (
    CHECKS,
    DEFAULT_LARGE_EPS_MAX_ACC,
    DEFAULT_TOL,
    Diagnostic,
    check_black_box,
    check_convergence,
    check_large_eps,
    check_single_step,
    check_zero_gradients,
    gradient_health,
    not_checked,
)
from qrobust.attacks import FGSM, PGD, PGDL2, Attack

if TYPE_CHECKING:  # the data the evaluation hands in (no import of the evaluation at run time)
    from qrobust.evaluation.results import AttackResult, EpsResult
    from qrobust.evaluation.suites import BuiltAttack

#: ``attack_ok(attack, x, y, idx, desc)`` → (len(idx),) bool: which of the samples ``idx`` of ``(x, y)``
#: the model still classifies correctly after ``attack``
AttackOk = Callable[[Attack, torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class DiagnosticSettings:
    """How the diagnostics probe: the evaluation's threat model, gradient mode, seed and surrogate; ``n``
    samples (the first ones), PGD with ``steps`` steps, the large-ε end point and the tolerance."""

    norm: str
    gradients: str
    seed: int | None
    surrogate: nn.Module | None
    batch_size: int
    n: int = 256
    steps: int = 20
    large_eps: float = 0.5
    large_eps_max_accuracy: float = DEFAULT_LARGE_EPS_MAX_ACC
    tol: float = DEFAULT_TOL


def diagnose(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    runs: Sequence[tuple[EpsResult, Sequence[BuiltAttack]]],
    *,
    settings: DiagnosticSettings,
    attack_ok: AttackOk,
) -> tuple[list[Diagnostic], dict[str, Any]]:
    """Every check of :data:`~qrobust.analysis.diagnostics.CHECKS` for an evaluation that ran ``runs``
    (per ε, ascending: its result and the attacks built for it) → (the diagnostics in report order, the
    settings they used: ``diagnostic_steps_used``, ``diagnostics_time_s``)."""
    s = settings
    t0 = time.perf_counter()
    nd = min(s.n, x.shape[0])
    xd, yd, cd = x[:nd], y[:nd], clean_correct[:nd]
    out: list[Diagnostic] = []

    def own_accuracy(atk: Attack, desc: str) -> float:
        ok = attack_ok(atk, xd, yd, cd.nonzero().squeeze(1), desc)
        return float(ok.sum()) / xd.shape[0]

    # (1) input gradients in every mode the white-box attacks use, and native for comparison
    out.append(_gradient_check(model, xd, yd, runs[0][1], s))

    probe_grad = s.gradients
    probe_surrogate = s.surrogate if probe_grad == "surrogate" else None
    steps_used = s.steps
    # (4) security curve end point: PGD at a large ε (L∞), in the primary gradient mode
    pgd_large = PGD(model, eps=s.large_eps, alpha=s.large_eps / 4, steps=s.steps, gradients=probe_grad,
                    seed=s.seed, surrogate=probe_surrogate)
    acc_large = own_accuracy(pgd_large, f"diag pgd ε={s.large_eps:g}")
    out.append(check_large_eps(accuracy=acc_large, large_eps=s.large_eps, max_accuracy=s.large_eps_max_accuracy,
                               attack_label=f"PGD-{s.steps} (L∞)"))

    for res, built in runs:
        e = res.eps
        by_role = {b.role: b for b in built if b.role}
        own = {a.label: a for a in res.attacks}

        def own_on_subset(b: BuiltAttack | None, own: dict[str, AttackResult] = own) -> float | None:
            """The suite's own robust accuracy of ``b`` on the diagnostic subset (if run on every sample)."""
            mask = None if b is None else own[b.label].robust_mask
            return None if mask is None else float(mask[:nd].float().mean())

        # (2) FGSM and PGD-k at this ε: reused from the suite when it ran them on every sample
        fgsm_b = by_role.get("fgsm")
        fgsm_acc = own_on_subset(fgsm_b)
        fgsm_label = fgsm_b.label if fgsm_acc is not None and fgsm_b is not None else (
            "FGSM" if s.norm == "Linf" else "FGM-L2")
        if fgsm_acc is None:
            if s.norm == "Linf":
                probe: Attack = FGSM(model, eps=e, gradients=probe_grad, seed=s.seed, surrogate=probe_surrogate)
            else:
                probe = _pgd_probe(model, e, s, steps=1, alpha=e, random_start=False)
            fgsm_acc = own_accuracy(probe, f"diag {fgsm_label} ε={e:.4g}")
        pgd_b = by_role.get("pgd")
        pgd_acc = own_on_subset(pgd_b)
        k = getattr(pgd_b.attack, "steps", None) if pgd_b is not None else None
        probe2 = None
        if pgd_acc is not None and pgd_b is not None and isinstance(k, int):
            # the suite's own PGD, rebuilt with twice the steps (same step size, seed and gradients)
            probe2 = pgd_b.rebuilt(model, steps=2 * k)
            pgd_label = pgd_b.label
        if probe2 is None:
            k = s.steps
            pgd_label = f"PGD-{k}"
            probe = _pgd_probe(model, e, s, steps=k, alpha=e / 4, random_start=True)
            pgd_acc = own_accuracy(probe, f"diag {pgd_label} ε={e:.4g}")
            probe2 = _pgd_probe(model, e, s, steps=2 * k, alpha=e / 4, random_start=True)
        assert isinstance(k, int) and pgd_acc is not None
        steps_used = k
        acc2 = own_accuracy(probe2, f"diag pgd-{2 * k} ε={e:.4g}")
        out.append(check_single_step(fgsm_accuracy=fgsm_acc, pgd_accuracy=pgd_acc, eps=e, tol=s.tol,
                                     fgsm_label=fgsm_label, pgd_label=pgd_label))
        out.append(check_convergence(accuracy=pgd_acc, accuracy_more_steps=acc2, steps=k, eps=e, tol=s.tol,
                                     label=pgd_label))

        # (3) black-box vs white-box, from the suite's own results
        out.append(_black_box_check(res, s.tol))

    order = list(CHECKS)
    out.sort(key=lambda d: (order.index(d.name), -1.0 if d.eps is None else d.eps))
    return out, {"diagnostic_steps_used": steps_used, "diagnostics_time_s": time.perf_counter() - t0}


def _gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, built: Sequence[BuiltAttack],
                    s: DiagnosticSettings) -> Diagnostic:
    """Input-gradient health in each gradient mode the white-box attacks use (their surrogate for
    ``surrogate``), plus ``native`` for comparison."""
    attack_modes: list[str] = []
    surrogates: dict[str, nn.Module | None] = {}
    for b in built:
        if not b.black_box and b.gradients is not None and b.gradients not in attack_modes:
            attack_modes.append(b.gradients)
            surrogates[b.gradients] = getattr(b.attack, "surrogate", None)
    gb = min(x.shape[0], s.batch_size)
    health = {}
    for m in dict.fromkeys([*attack_modes, "native"]):
        sur = surrogates.get(m, s.surrogate) if m == "surrogate" else None
        health[m] = gradient_health(model, x[:gb], y[:gb], gradients=m, surrogate=sur)
    return check_zero_gradients(health, attack_modes, tol=s.tol)


def _black_box_check(res: EpsResult, tol: float) -> Diagnostic:
    """Black-box against white-box at one ε: own accuracies of attacks run on every sample, and what the
    black-box attacks run after every white-box one still broke."""
    wb_own = {a.label: a.robust_accuracy for a in res.attacks
              if not a.black_box and a.robust_accuracy is not None}
    bb_own = {a.label: a.robust_accuracy for a in res.attacks
              if a.black_box and a.robust_accuracy is not None}
    extra = {}
    last_wb = max((i for i, a in enumerate(res.attacks) if not a.black_box), default=-1)
    if last_wb >= 0:
        for i, a in enumerate(res.attacks):
            if a.black_box and i > last_wb:
                extra[a.label] = a.n_broken / len(res.robust)
    if (bb_own or extra) and (wb_own or extra):
        return check_black_box(white_box=wb_own, black_box=bb_own, black_box_extra=extra, eps=res.eps, tol=tol)
    reason = ("the suite has no black-box attack (add Square, e.g. the 'standard' suite)"
              if not any(a.black_box for a in res.attacks) else "the suite has no white-box attack")
    return not_checked("black_box_beats_white_box", reason, eps=res.eps)


def _pgd_probe(model: nn.Module, eps: float, s: DiagnosticSettings, *, steps: int, alpha: float,
               random_start: bool) -> Attack:
    """PGD (L∞) or PGD-L2 in the evaluation's threat model and primary gradient mode."""
    cls = PGD if s.norm == "Linf" else PGDL2
    return cls(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, gradients=s.gradients,
               seed=s.seed, surrogate=s.surrogate if s.gradients == "surrogate" else None)
