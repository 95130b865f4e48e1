"""The evaluation run: :func:`evaluate` — clean predictions, the attack loop over ε and suite, the per-sample
worst case, then the diagnostics (:mod:`qrobust.analysis.diagnose`) and the report."""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qrobust._version import __version__
from qrobust.analysis.diagnose import DiagnosticSettings, diagnose
from qrobust.analysis.diagnostics import DEFAULT_LARGE_EPS_MAX_ACC, DEFAULT_TOL, Diagnostic
from qrobust.attacks import Attack, lp_norm
from qrobust.attacks.base import GRADIENTS
from qrobust.data.inputs import as_tensors, check_label_range
from qrobust.errors import ConfigError, InputError
from qrobust.evaluation.results import AttackResult, EpsResult, RobustnessReport, mask_str
from qrobust.evaluation.shard import ALONE, Shard, current_shard
from qrobust.evaluation.state import EvalState, fingerprint
from qrobust.evaluation.suites import BuildSettings, BuiltAttack, SuiteEntry, build_attacks, mark_roles, suite_entries
from qrobust.training import process_group
from qrobust.utils import eval_mode, model_device, progress
from qrobust.validation import check_choice, check_eps

log = logging.getLogger(__name__)

THREAT_MODELS = ("Linf", "L2")


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    suite: str | Sequence[Any] = "standard",
    eps: float | Sequence[float] = 8 / 255,
    norm: str = "Linf",
    gradients: str = "ste",
    n: int | None = None,
    batch_size: int = 256,
    seed: int | None = 0,
    parent: nn.Module | None = None,
    surrogate: nn.Module | None = None,
    individual: bool = False,
    n_queries: int | None = None,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    diagnostics: bool = True,
    diagnostic_n: int = 256,
    diagnostic_steps: int = 20,
    large_eps: float = 0.5,
    large_eps_max_accuracy: float = DEFAULT_LARGE_EPS_MAX_ACC,
    tol: float = DEFAULT_TOL,
    return_examples: bool = False,
    model_name: str | None = None,
    dataset: str | None = None,
    state_path: str | os.PathLike | None = None,
    repeats: int = 1,
    distributed: bool = True,
) -> RobustnessReport:
    """Evaluate ``model`` on ``data`` under ``suite`` at ``eps`` (one value or a list) → a report.

    ``suite`` — ``"standard"`` by default (APGD-CE, APGD-T and Square: the evaluation a robustness claim needs,
    the same default as ``qrobust eval``), ``"quick"`` (FGSM + PGD-20: a smoke test, not a claim),
    ``"quantized"`` or a list of attacks.
    ``data`` — an ArrayDataset (first ``n`` samples), a DataLoader/BatchLoader (batches until ``n``) or an
    ``(x, y)`` pair. ``norm`` — ``"Linf"`` or ``"L2"``. ``gradients`` — how the white-box attacks
    differentiate through quantizers unless a suite entry says otherwise (``"ste"``, ``"native"``,
    ``"surrogate"``; ``surrogate=`` a float model for the latter). ``individual=True`` runs every attack on
    every clean-correct sample (own robust accuracy for each, at up to the cost of running them all in
    full). ``seed`` seeds every attack (``None``: fresh randomness). ``state_path`` — a file that records
    progress after every batch, so that the same call run again continues where an interrupted one stopped
    (:mod:`qrobust.evaluation.state`). ``repeats`` — for a randomized model (random precision, random
    transforms), predict every clean and adversarial point that many times and count it correct only if every
    prediction is (a single run of a randomized model is itself random; the worst case over repeats is what
    survives). See :mod:`qrobust.evaluation` for the suites, the sweep semantics and the cost of the
    diagnostics.

    Under ``torchrun --nproc_per_node=N`` the batches of every pass are shared out among the ranks and their
    per-sample results merged (:mod:`qrobust.evaluation.shard`): every rank returns the report one process
    would (same masks, same accuracies); write it from rank 0. Every rank must then call ``evaluate`` (the
    ranks meet after every pass); ``distributed=False`` evaluates everything in this process, for a call made
    on one rank only (e.g. in a ``fit`` callback, which runs on rank 0).
    """
    with process_group() if distributed else nullcontext((0, 1)) as (rank, world):
        return _evaluate(model, data, shard=current_shard(rank, world), suite=suite, eps=eps, norm=norm,
                         gradients=gradients, n=n, batch_size=batch_size, seed=seed, parent=parent,
                         surrogate=surrogate, individual=individual, n_queries=n_queries,
                         attack_kwargs=attack_kwargs, diagnostics=diagnostics, diagnostic_n=diagnostic_n,
                         diagnostic_steps=diagnostic_steps, large_eps=large_eps,
                         large_eps_max_accuracy=large_eps_max_accuracy, tol=tol,
                         return_examples=return_examples, model_name=model_name, dataset=dataset,
                         state_path=state_path, repeats=repeats)


def _evaluate(
    model: nn.Module,
    data: Any,
    *,
    shard: Shard,
    suite: str | Sequence[Any],
    eps: float | Sequence[float],
    norm: str,
    gradients: str,
    n: int | None,
    batch_size: int,
    seed: int | None,
    parent: nn.Module | None,
    surrogate: nn.Module | None,
    individual: bool,
    n_queries: int | None,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None,
    diagnostics: bool,
    diagnostic_n: int,
    diagnostic_steps: int,
    large_eps: float,
    large_eps_max_accuracy: float,
    tol: float,
    return_examples: bool,
    model_name: str | None,
    dataset: str | None,
    state_path: str | os.PathLike | None,
    repeats: int,
) -> RobustnessReport:
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if norm not in THREAT_MODELS:
        raise ConfigError(f"norm must be one of {THREAT_MODELS}, got {norm!r}")
    check_choice("gradients", gradients, GRADIENTS)
    for name, v in (("batch_size", batch_size), ("diagnostic_n", diagnostic_n),
                    ("diagnostic_steps", diagnostic_steps), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if parent is not None and not isinstance(parent, nn.Module):
        raise ConfigError(f"parent must be a torch.nn.Module (the float model), got {type(parent).__name__}")

    eps_list = [eps] if not isinstance(eps, (list, tuple)) else list(eps)
    if not eps_list:
        raise ConfigError("eps is an empty list; give at least one ε")
    eps_values = sorted({check_eps(e, norm) for e in eps_list})
    large_eps = float(check_eps(large_eps, "Linf"))
    entries = suite_entries(suite, norm=norm, n_queries=n_queries, parent=parent)
    overrides = {k: dict(v) for k, v in (attack_kwargs or {}).items()}
    labels_known = [e.label for e in entries if e.label]
    if isinstance(suite, str):
        unknown = sorted(set(overrides) - set(labels_known))
        if unknown:
            raise ConfigError(f"attack_kwargs names {unknown}, which are not in suite {suite!r}: "
                              f"{labels_known}")
    mark_roles(entries)
    if state_path is not None and return_examples:
        raise ConfigError("state_path does not store adversarial examples: use return_examples=True or a "
                          "state_path, not both")

    x, y, ds_name = as_tensors(data, n)
    n_total = x.shape[0]
    if shard.active:
        shard.check_same(fingerprint(model, x, y, {}), "model weights or data",
                         "give every rank the same checkpoint and data")
        n_batches = -(-n_total // batch_size)
        if n_batches < shard.world:
            log.warning("%d samples make %d batch(es) of %d for %d ranks: %d rank(s) stay idle; lower "
                        "batch_size to use them all", n_total, n_batches, batch_size, shard.world,
                        shard.world - n_batches)
    state = None
    if state_path is not None:
        state = EvalState(state_path, write=shard.rank == 0, fp=fingerprint(model, x, y, {
            "suite": [_entry_key(e) for e in entries], "eps": eps_values, "norm": norm, "gradients": gradients,
            "seed": seed, "batch_size": batch_size, "individual": individual, "n_queries": n_queries,
            "repeats": repeats,
            "attack_kwargs": overrides, "parent": None if parent is None else fingerprint(parent, x[:0], y[:0], {}),
            "surrogate": None if surrogate is None else fingerprint(surrogate, x[:0], y[:0], {})}))
        shard.check_same(state.data, f"evaluation states in {state_path}",
                         "put state_path on a file system every rank shares")
        if state.resumed:
            log.info("continuing the evaluation recorded in %s", state_path)
    sweep = _Sweep(entries=entries, eps_values=eps_values, overrides=overrides,
                   check_overrides=not isinstance(suite, str), batch_size=batch_size, individual=individual,
                   keep_examples=return_examples,
                   build=BuildSettings(model=model, norm=norm, gradients=gradients, seed=seed, surrogate=surrogate),
                   state=state, repeats=repeats, shard=shard)
    with ExitStack() as restore_modes:
        restore_modes.enter_context(eval_mode(model))
        if parent is not None:
            restore_modes.enter_context(eval_mode(parent))
        pred_clean, num_classes = _predict(model, x, batch_size, shard)
        check_label_range(y, num_classes)
        clean_correct = pred_clean == y
        for _ in range(repeats - 1):  # a randomized model: correct only if every prediction is
            clean_correct &= _predict(model, x, batch_size, shard)[0] == y
        clean_acc = float(clean_correct.float().mean())
        log.info("clean accuracy %.2f%% on %d samples", 100 * clean_acc, n_total)

        runs, examples = _run_sweep(model, x, y, pred_clean, clean_correct, sweep)

        diags: list[Diagnostic] = []
        diag_settings: dict[str, Any] = {}
        if diagnostics:
            def attack_ok(atk: Attack, xs: torch.Tensor, ys: torch.Tensor, idx: torch.Tensor,
                          desc: str) -> torch.Tensor:
                return _run_attack(atk, model, xs, ys, idx, batch_size=batch_size, desc=desc, keep=False,
                                   repeats=repeats, shard=shard)[0]

            diags, diag_settings = diagnose(
                model, x, y, clean_correct, runs, attack_ok=attack_ok,
                settings=DiagnosticSettings(norm=norm, gradients=gradients, seed=seed, surrogate=surrogate,
                                            batch_size=batch_size, n=diagnostic_n, steps=diagnostic_steps,
                                            large_eps=large_eps, large_eps_max_accuracy=large_eps_max_accuracy,
                                            tol=tol))

    settings = {
        "individual": individual,
        "n_queries": n_queries,
        "attack_kwargs": overrides,
        "diagnostics": diagnostics,
        "diagnostic_n": min(diagnostic_n, n_total),
        "diagnostic_steps": diagnostic_steps,
        "large_eps": large_eps,
        "large_eps_max_accuracy": large_eps_max_accuracy,
        "tol": tol,
        "repeats": repeats,
        "device": str(model_device(model)),
        **diag_settings,
    }
    if shard.active:
        settings["ranks"] = shard.world
    if suite == "quantized" and parent is None:
        settings["transfer"] = "skipped: no parent= float model given"
    arch = getattr(model, "qrobust_arch", None)
    report = RobustnessReport(
        model=model_name or (arch.get("name") if isinstance(arch, Mapping) else None) or type(model).__name__,
        dataset=dataset or ds_name or "unknown",
        threat_model=norm,
        suite=suite if isinstance(suite, str) else "custom",
        n=n_total,
        clean_accuracy=clean_acc,
        results=[res for res, _ in runs],
        diagnostics=diags,
        bits=copy.deepcopy(getattr(model, "qrobust_spec", None)),
        gradients=gradients,
        seed=seed,
        batch_size=batch_size,
        versions={"qrobust": __version__, "torch": torch.__version__,
                  "python": platform.python_version(), "numpy": np.__version__},
        # a continued evaluation counts the earlier runs too (up to their last recorded batch)
        wall_time_s=time.perf_counter() - t_start + (state.prior_s if state is not None else 0.0),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        arch=copy.deepcopy(arch) if isinstance(arch, Mapping) else None,
        parent=None if parent is None else (
            (getattr(parent, "qrobust_arch", None) or {}).get("name") or type(parent).__name__),
        settings=json.loads(json.dumps(settings, default=str)),
        clean=mask_str(clean_correct),
        examples=examples,
    )
    for d in report.flagged:
        where = "" if d.eps is None else f" (ε={d.eps:g})"
        log.warning("diagnostic flag %s%s: %s", d.name, where, d.evidence)
    return report


# ------------------------------------------------------------------------------------------ the sweep
@dataclass(frozen=True)
class _Sweep:
    """What the attack loop runs: the suite's entries at each ε (ascending) and how."""

    entries: list[SuiteEntry]
    eps_values: list[float]
    build: BuildSettings
    overrides: dict[str, dict[str, Any]]
    check_overrides: bool  # a custom suite: override labels are known only once built
    batch_size: int
    individual: bool
    keep_examples: bool
    state: EvalState | None = None
    repeats: int = 1
    shard: Shard = ALONE


def _entry_key(e: SuiteEntry) -> Any:
    """A suite entry as data that is the same in every process (for the state file's fingerprint)."""
    a = e.attack
    if isinstance(a, Attack):
        a = {"instance": type(a).__name__, **a.config()}
    elif not isinstance(a, str):
        a = getattr(a, "__qualname__", None) or type(a).__qualname__
    kw = {k: (type(v).__name__ if isinstance(v, nn.Module) else v) for k, v in e.kwargs.items()}
    return [e.label, a, kw, e.individual, e.black_box, e.role]


@dataclass
class _WorstCase:
    """The per-sample worst case so far: robust mask and, when kept, the adversarial example and prediction
    that broke each sample (the clean ones for samples not broken)."""

    robust: torch.Tensor
    adv: torch.Tensor | None
    pred: torch.Tensor | None

    def copy(self) -> _WorstCase:
        return _WorstCase(self.robust.clone(), None if self.adv is None else self.adv.clone(),
                          None if self.pred is None else self.pred.clone())


def _run_sweep(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, pred_clean: torch.Tensor, clean_correct: torch.Tensor,
    sweep: _Sweep,
) -> tuple[list[tuple[EpsResult, list[BuiltAttack]]], dict[str, Any] | None]:
    """Every ε from the smallest up, each attack on the samples still robust (or on every clean-correct one
    for its own robust accuracy) → per ε (its result, the attacks built for it), and the kept examples."""
    examples: dict[str, Any] | None = None
    if sweep.keep_examples:
        examples = {"x": x, "y": y, "pred_clean": pred_clean, "x_adv": {}, "pred_adv": {}}
    prev = _WorstCase(clean_correct.clone(), x.clone() if sweep.keep_examples else None,
                      pred_clean.clone() if sweep.keep_examples else None)
    runs: list[tuple[EpsResult, list[BuiltAttack]]] = []
    for e in sweep.eps_values:
        t_eps = time.perf_counter()
        built = build_attacks(sweep.entries, eps=e, settings=sweep.build, overrides=sweep.overrides,
                              check_overrides=sweep.check_overrides)
        worst = prev.copy()
        n_inherited = int((clean_correct & ~prev.robust).sum())
        attack_results = [_attack_one(b, model, x, y, clean_correct, worst, e, sweep) for b in built]
        res = EpsResult(eps=e, robust_accuracy=float(worst.robust.float().mean()), attacks=attack_results,
                        robust=mask_str(worst.robust), n_inherited=n_inherited, time_s=time.perf_counter() - t_eps)
        runs.append((res, built))
        if examples is not None and worst.adv is not None:
            examples["x_adv"][repr(e)] = worst.adv
            examples["pred_adv"][repr(e)] = worst.pred
        prev = worst
    return runs, examples


def _attack_one(b: BuiltAttack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean_correct: torch.Tensor,
                worst: _WorstCase, e: float, sweep: _Sweep) -> AttackResult:
    """Run one built attack at ε ``e``, update the worst case in place → its result."""
    # run on every clean-correct sample when asked — or for free when nothing is broken yet
    st = sweep.state
    if st is not None:
        stored = st.finished(e, b.label, b.settings())
        if stored is not None:
            worst.robust.copy_(stored[1])
            log.info("ε=%.4g %s: reused from %s", e, b.label, st.path)
            return stored[0]
    own_run = b.individual or sweep.individual or torch.equal(worst.robust, clean_correct)
    targets = clean_correct if own_run else worst.robust
    idx = targets.nonzero().squeeze(1)
    t0 = time.perf_counter()
    resume = None if st is None else st.partial(e, b.label, idx)
    on_batch = None if st is None else (
        lambda k, ok_, pred_, stats_, dt_: st.record_batch(e, b.label, idx, x.shape[0], k, ok_, pred_, stats_, dt_))
    ok, pred, adv, stats = _run_attack(b.attack, model, x, y, idx, batch_size=sweep.batch_size,
                                       desc=f"{b.label} ε={e:.4g}", keep=sweep.keep_examples,
                                       resume=resume, on_batch=on_batch, repeats=sweep.repeats,
                                       shard=sweep.shard)
    dt = sweep.shard.max(time.perf_counter() - t0) + (resume["time_s"] if resume else 0.0)
    before = worst.robust.clone()
    worst.robust[idx[~ok]] = False
    newly = before & ~worst.robust
    if worst.adv is not None and adv is not None and worst.pred is not None:
        sel = newly[idx]
        worst.adv[idx[sel]] = adv[sel]
        worst.pred[idx[sel]] = pred[sel]
    own_mask = None
    own_acc = None
    if own_run:
        own_mask = torch.zeros(x.shape[0], dtype=torch.bool)
        own_mask[idx] = ok
        own_acc = float(own_mask.float().mean())
    res = AttackResult(
        label=b.label,
        attack=str(b.attack.name),
        settings=b.settings(),
        black_box=b.black_box,
        gradients=b.gradients,
        individual=own_run,
        n_attacked=int(idx.numel()),
        n_broken=int(newly.sum()),
        robust_accuracy=own_acc,
        robust_accuracy_after=float(worst.robust.float().mean()),
        time_s=dt,
        stats=stats,
        robust=None if own_mask is None else mask_str(own_mask),
    )
    if st is not None:
        st.record_done(e, b.label, res, worst.robust)
    log.info("ε=%.4g %s: %s after %.2f%% (broke %d) in %.1fs", e, b.label,
             "own %.2f%%," % (100 * own_acc) if own_acc is not None else "", 100 *
             res.robust_accuracy_after, res.n_broken, dt)
    return res


# ------------------------------------------------------------------------------------- running attacks
@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, shard: Shard = ALONE
             ) -> tuple[torch.Tensor, int]:
    """Predicted classes of ``x`` and the model's number of outputs (sharded: each rank predicts its
    batches, then the predictions are merged)."""
    dev = model_device(model)
    pred = torch.zeros(x.shape[0], dtype=torch.long)
    mine = torch.zeros(x.shape[0], dtype=torch.bool)
    k = 0
    for j, i in enumerate(range(0, x.shape[0], batch_size)):
        if not shard.mine(j):
            continue
        try:
            logits = model(x[i:i + batch_size].to(dev))
        except RuntimeError as e:  # a shape mismatch deep inside torch: say it in the user's terms
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"the model cannot run on inputs of shape {tuple(x.shape[1:])} ({first}); "
                             f"evaluate it on the kind of data it was built for") from e
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise InputError(f"the model must return logits of shape (N, num_classes); for an input of shape "
                             f"{tuple(x[i:i + batch_size].shape)} it returned "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        k = logits.shape[1]
        pred[i:i + batch_size] = logits.argmax(dim=1).cpu()
        mine[i:i + batch_size] = True
    return shard.merge(pred, mine), int(shard.max(k))


def _run_attack(
    atk: Attack,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    *,
    batch_size: int,
    desc: str,
    keep: bool,
    resume: dict[str, Any] | None = None,
    on_batch: Callable[[int, torch.Tensor, torch.Tensor, dict[str, int], float], None] | None = None,
    repeats: int = 1,
    shard: Shard = ALONE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, int]]:
    """Attack the samples ``idx`` in batches; score on ``model``. Returns (still-correct (len(idx),) bool,
    prediction after the attack, x_adv of those samples if ``keep``, summed attack counters).
    ``shard`` — run only this rank's batches, then merge every rank's (the same on every rank).

    ``resume`` — the finished batches of an interrupted run (from the state file): they are not run again.
    ``on_batch(batches_done, ok, pred, stats, seconds)`` is called after every batch (to record progress)."""
    ok = torch.zeros(idx.numel(), dtype=torch.bool)
    pred = torch.zeros(idx.numel(), dtype=torch.long)
    kept = x[idx].clone() if keep else None
    resumed: dict[str, int] = {}
    stats: dict[str, int] = {}  # of the batches run in this call
    mine = torch.zeros(idx.numel(), dtype=torch.bool)
    dev = model_device(model)
    starts = range(0, idx.numel(), batch_size)
    first, t0, t_before = 0, time.perf_counter(), 0.0
    if resume is not None:
        first, t_before = int(resume["batches"]), float(resume["time_s"])
        ok, pred, resumed = resume["ok"].clone(), resume["pred"].clone(), dict(resume["stats"])
    # rounds of one batch per rank (rank r runs batch k0 + r); after each round the finished batches form a
    # prefix, which is what the state file records
    rounds = range(first, len(starts), shard.world)
    for k0 in progress(rounds, desc=desc, total=len(rounds)):
        k = k0 + shard.rank
        if k < len(starts):
            _attack_batch(atk, model, x, y, idx, starts[k], batch_size, dev, repeats, ok, pred, mine, kept, stats)
        if on_batch is not None:
            done, t = min(k0 + shard.world, len(starts)), t_before + time.perf_counter() - t0
            if shard.active:
                on_batch(done, shard.merge(ok, mine), shard.merge(pred, mine),
                         _add_counts(resumed, shard.sum_counts(stats)), t)
            else:
                on_batch(done, ok, pred, _add_counts(resumed, stats), t)
    if shard.active:
        ok, pred = shard.merge(ok, mine), shard.merge(pred, mine)
        kept = None if kept is None else shard.merge(kept, mine)
        stats = shard.sum_counts(stats)
    return ok, pred, kept, _add_counts(resumed, stats)


def _attack_batch(atk: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, s: int,
                  batch_size: int, dev: torch.device, repeats: int, ok: torch.Tensor, pred: torch.Tensor,
                  mine: torch.Tensor, kept: torch.Tensor | None, stats: dict[str, int]) -> None:
    """Attack the batch of ``idx`` starting at ``s``; write its results into ``ok``/``pred``/``mine``/``kept``
    and add its attack counters to ``stats``."""
    b = idx[s:s + batch_size]
    xb, yb = x[b], y[b]
    x_adv = atk(xb, yb)
    dist = lp_norm(x_adv.float() - xb, atk.norm)
    outside = bool((dist > atk.eps * (1 + 1e-5) + 1e-6).any())
    if outside or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
        raise RuntimeError(f"{atk!r} returned examples outside the threat model (max distance "
                           f"{float(dist.max()):.6g} > ε={atk.eps}); this is a bug in the attack")
    with torch.no_grad():
        p = model(x_adv.to(dev)).argmax(dim=1).cpu()
        still = p == yb
        for _ in range(repeats - 1):  # a randomized model: broken if any prediction is wrong
            still &= model(x_adv.to(dev)).argmax(dim=1).cpu() == yb
    pred[s:s + b.numel()] = p
    ok[s:s + b.numel()] = still
    mine[s:s + b.numel()] = True
    if kept is not None:
        kept[s:s + b.numel()] = x_adv.detach().to(kept.device)
    for name, v in getattr(atk, "last_stats", {}).items():
        if isinstance(v, int):
            stats[name] = stats.get(name, 0) + v


def _add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out
