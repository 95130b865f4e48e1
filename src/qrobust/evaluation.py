"""Robustness evaluation: run an attack suite, keep the per-sample worst case, diagnose gradient masking.

>>> report = evaluate(model, test_set, suite="quick", eps=8/255, n=1000)       # doctest: +SKIP
>>> report.clean_accuracy, report.robust_accuracy                               # doctest: +SKIP
>>> report.save("runs/eval")          # report.json, report.md, accuracy_vs_eps.png   # doctest: +SKIP

**How the attacks are run.** Like AutoAttack's standard evaluation, the attacks of a suite run in order and
each attacks only the samples no earlier attack has broken, so the worst case over many attacks costs
little more than the first one. The headline ``robust_accuracy`` is the per-sample worst case: a sample
counts as robust only if the model classifies it correctly clean and after *every* attack. An attack run
on every clean-correct sample (``individual=True``, or an entry that the diagnostics need) also yields its
own robust accuracy; one run on the survivors only reports how many more samples it broke and the worst
case after it (``robust_accuracy_after``).

**ε sweeps.** ``eps`` may be a list; it is evaluated from the smallest ε up, and a sample broken at a
smaller ε counts as broken at every larger one (its adversarial example lies in the larger ball too) and is
not attacked again, so the headline accuracy never increases with ε.

**Suites** (``suite=``):

* ``"quick"`` — FGSM and PGD-20 (α = ε/4, random start); in L2 a one-step L2 gradient attack and PGD-L2-20.
  Both run on every sample (the diagnostics compare them), i.e. PGD also attacks the samples FGSM broke.
* ``"standard"`` — AutoAttack's standard recipe without FAB: APGD-CE (100 iterations), APGD-T (targeted
  DLR, 9 target classes, 100 iterations), Square (5,000 queries; ``n_queries=`` lowers it for CPU budgets).
* ``"quantized"`` — the standard white-box attacks with straight-through (``ste``) *and* float-surrogate
  gradients, then Square, SPSA (L∞ only; its own default budget) and — when ``parent=`` (the float model
  the quantized one was fine-tuned from) is given — a transfer attack (:class:`~qrobust.attacks.Transfer`):
  PGD-20 without early stopping on the parent, scored on the model.
* a custom list whose items are a registry name (``"pgd"``), a ``(name, kwargs)`` pair (``kwargs`` may
  carry ``"label"``, ``"individual"``, ``"black_box"``), an :class:`~qrobust.attacks.Attack` instance (used
  as built; its ε must match), or a factory such as an attack class or
  ``lambda model, **kw: PGD(model, steps=5, **kw)`` — called with ``eps=`` and, when it accepts them,
  ``seed=`` and ``gradients=``. The first FGSM and the first PGD of a custom list run on every sample
  (the diagnostics compare them), the rest on the survivors.

``attack_kwargs={"label": {...}}`` overrides the settings of a suite entry by its label (e.g.
``{"apgd-ce": {"n_iter": 20}}``).

**Diagnostics** (see :mod:`qrobust.analysis.diagnostics`) run with every report unless ``diagnostics=False``;
they cost, on the first ``diagnostic_n`` samples (default 256): one input-gradient batch per gradient mode;
FGSM and PGD-k at each ε unless the suite already ran them on every sample; PGD-2k at each ε; and one PGD-k
at ``large_eps`` (L∞, default 0.5, whatever the threat model). k = 20 (``diagnostic_steps``) unless the
suite's own PGD entry says otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import inspect
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from qrobust.errors import ConfigError, InputError
from qrobust.utils import progress

log = logging.getLogger(__name__)

FORMAT = "qrobust-report/1"
SUITES = ("quick", "standard", "quantized")
THREAT_MODELS = ("Linf", "L2")
#: attack names (``Attack.name`` up to the first "-") treated as black-box / gradient-free
BLACK_BOX_NAMES = frozenset({"square", "spsa", "transfer", "nes", "boundary", "hsja", "simba"})


# ================================================================================================ results
def _mask_str(mask: torch.Tensor) -> str:
    return "".join("1" if b else "0" for b in mask.tolist())


def _str_mask(s: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in s], dtype=torch.bool)


@dataclass
class AttackResult:
    """One attack at one ε.

    ``robust_accuracy`` — the attack's own robust accuracy over all ``n`` samples (``None`` when it ran only
    on the samples earlier attacks had not broken); ``robust_accuracy_after`` — the worst case over it and
    every attack before it; ``n_broken`` — samples it broke that were robust until then.
    ``robust`` — its own per-sample robust mask as a string of ``0``/``1`` (own runs only).
    """

    label: str
    attack: str
    settings: dict[str, Any]
    black_box: bool
    gradients: str | None
    individual: bool
    n_attacked: int
    n_broken: int
    robust_accuracy: float | None
    robust_accuracy_after: float
    time_s: float
    stats: dict[str, int] = field(default_factory=dict)
    robust: str | None = None

    @property
    def robust_mask(self) -> torch.Tensor | None:
        return None if self.robust is None else _str_mask(self.robust)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttackResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class EpsResult:
    """Everything measured at one ε: the headline worst case and each attack's result."""

    eps: float
    robust_accuracy: float
    attacks: list[AttackResult]
    robust: str  # per-sample worst case, "0"/"1"
    n_inherited: int = 0  # samples counted as broken because they were broken at a smaller ε
    time_s: float = 0.0

    @property
    def robust_mask(self) -> torch.Tensor:
        return _str_mask(self.robust)

    def attack(self, label: str) -> AttackResult:
        for a in self.attacks:
            if a.label == label:
                return a
        raise KeyError(f"no attack {label!r} at ε={self.eps:g}; have {[a.label for a in self.attacks]}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attacks"] = [a.to_dict() for a in self.attacks]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpsResult:
        return cls(
            eps=float(d["eps"]),
            robust_accuracy=float(d["robust_accuracy"]),
            attacks=[AttackResult.from_dict(a) for a in d["attacks"]],
            robust=str(d["robust"]),
            n_inherited=int(d.get("n_inherited", 0)),
            time_s=float(d.get("time_s", 0.0)),
        )


@dataclass
class RobustnessReport:
    """The result of :func:`evaluate`: plain data, written as JSON and rendered to Markdown and plots.

    ``results`` holds one :class:`EpsResult` per ε (ascending); ``diagnostics`` the masking checks (per-ε
    checks carry their ε). ``examples`` (not saved) holds the worst-case adversarial examples when
    :func:`evaluate` ran with ``return_examples=True``.
    """

    model: str
    dataset: str
    threat_model: str
    suite: str
    n: int
    clean_accuracy: float
    results: list[EpsResult]
    diagnostics: list[Diagnostic]
    bits: dict[str, Any] | None = None
    gradients: str = "ste"
    seed: int | None = 0
    batch_size: int = 256
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0
    created: str = ""
    arch: dict[str, Any] | None = None
    parent: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    clean: str = ""  # per-sample clean correctness, "0"/"1"
    examples: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    # ----------------------------------------------------------------------------------- accessors
    @property
    def eps(self) -> list[float]:
        return [r.eps for r in self.results]

    @property
    def robust_accuracies(self) -> list[float]:
        """The headline (per-sample worst case) robust accuracy at each ε, in the order of :attr:`eps`."""
        return [r.robust_accuracy for r in self.results]

    @property
    def robust_accuracy(self) -> float:
        """The headline robust accuracy; for an ε sweep use :attr:`robust_accuracies` or :meth:`result`."""
        if len(self.results) != 1:
            raise ConfigError(
                f"this report sweeps ε over {self.eps}: use report.robust_accuracies or "
                f"report.result(eps).robust_accuracy"
            )
        return self.results[0].robust_accuracy

    def result(self, eps: float | None = None) -> EpsResult:
        """The :class:`EpsResult` at ``eps`` (the only one when ``None`` and there is one ε)."""
        if eps is None:
            if len(self.results) != 1:
                raise ConfigError(f"this report has several ε {self.eps}; pass one of them")
            return self.results[0]
        for r in self.results:
            if abs(r.eps - eps) <= 1e-9 * max(1.0, abs(eps)):
                return r
        raise ConfigError(f"ε={eps} was not evaluated; the report has {self.eps}")

    @property
    def bits_str(self) -> str:
        if not self.bits:
            return "float"
        try:
            from qrobust.quant import QuantSpec

            return str(QuantSpec.from_dict(self.bits))
        except Exception:  # a spec from another version: still show something
            return f"w{self.bits.get('weight_bits', '?')}a{self.bits.get('act_bits', '?')}"

    @property
    def flagged(self) -> list[Diagnostic]:
        """The diagnostics that raised a flag."""
        return [d for d in self.diagnostics if d.flagged]

    def adversarial_examples(self, eps: float | None = None) -> tuple[torch.Tensor, ...]:
        """``(x, x_adv, y, pred_clean, pred_adv)`` at ``eps`` — the arguments of
        :func:`qrobust.report.save_adversarial_examples`; needs ``evaluate(..., return_examples=True)``."""
        if not self.examples:
            raise ConfigError("this report kept no adversarial examples: run evaluate(..., "
                              "return_examples=True)")
        r = self.result(eps)
        ex = self.examples
        key = repr(r.eps)
        return ex["x"], ex["x_adv"][key], ex["y"], ex["pred_clean"], ex["pred_adv"][key]

    # ------------------------------------------------------------------------------------ as data
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: RobustBench-like summary fields first, then qrobust's details."""
        single = len(self.results) == 1
        return {
            "format": FORMAT,
            "model": self.model,
            "dataset": self.dataset,
            "threat_model": self.threat_model,
            "eps": self.eps[0] if single else self.eps,
            "clean_acc": self.clean_accuracy,
            "robust_acc": self.robust_accuracies[0] if single else self.robust_accuracies,
            "n_examples": self.n,
            "suite": self.suite,
            "bits": self.bits,
            "bits_str": self.bits_str,
            "gradients": self.gradients,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "flags": [d.name for d in self.flagged],
            "diagnostics": [d.to_dict() for d in self.diagnostics],
            "results": [r.to_dict() for r in self.results],
            "versions": dict(self.versions),
            "wall_time_s": self.wall_time_s,
            "created": self.created,
            "arch": self.arch,
            "parent": self.parent,
            "settings": self.settings,
            "clean": self.clean,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RobustnessReport:
        if d.get("format") != FORMAT:
            raise InputError(f"not a qrobust robustness report (format {d.get('format')!r}, expected "
                             f"{FORMAT!r})")
        return cls(
            model=d["model"],
            dataset=d["dataset"],
            threat_model=d["threat_model"],
            suite=d["suite"],
            n=int(d["n_examples"]),
            clean_accuracy=float(d["clean_acc"]),
            results=[EpsResult.from_dict(r) for r in d["results"]],
            diagnostics=[Diagnostic.from_dict(x) for x in d["diagnostics"]],
            bits=d.get("bits"),
            gradients=d.get("gradients", "ste"),
            seed=d.get("seed"),
            batch_size=int(d.get("batch_size", 256)),
            versions=dict(d.get("versions", {})),
            wall_time_s=float(d.get("wall_time_s", 0.0)),
            created=d.get("created", ""),
            arch=d.get("arch"),
            parent=d.get("parent"),
            settings=dict(d.get("settings", {})),
            clean=d.get("clean", ""),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> RobustnessReport:
        """Read a ``report.json`` (or the folder holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise InputError(f"no report at {p}; run `qrobust eval` (or evaluate(...).save(dir)) "
                             f"first") from e
        except json.JSONDecodeError as e:
            raise InputError(f"{p} is not valid JSON ({e}); the file is truncated or not a report") from e
        return cls.from_dict(d)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and the plot into ``out_dir``; returns their paths by kind."""
        from qrobust.report import save_report

        return save_report(self.to_dict(), out_dir)

    def markdown(self) -> str:
        from qrobust.report import render_markdown

        return render_markdown(self.to_dict())

    def summary(self) -> str:
        """A few lines for a terminal: headline per ε and the flags raised."""
        lines = [f"{self.model} ({self.bits_str}) on {self.dataset}, {self.threat_model}, n={self.n}, "
                 f"suite={self.suite}: clean {100 * self.clean_accuracy:.2f}%"]
        for r in self.results:
            per_attack = ", ".join(_attack_text(a) for a in r.attacks)
            lines.append(f"  ε={_eps_text(r.eps, self.threat_model)}: robust {100 * r.robust_accuracy:.2f}%  "
                         f"({per_attack})")
        flags = self.flagged
        if flags:
            lines.append("  FLAGS: " + "; ".join(
                f"{d.name}{'' if d.eps is None else f' @ε={d.eps:g}'}" for d in flags))
        else:
            lines.append("  diagnostics: no gradient-masking flag raised")
        return "\n".join(lines)


def _eps_text(eps: float, norm: str) -> str:
    if norm == "Linf":
        k = eps * 255
        if abs(k - round(k)) < 1e-6 and k >= 1:
            return f"{eps:.4g} ({int(round(k))}/255)"
    return f"{eps:.4g}"


def _attack_text(a: AttackResult) -> str:
    own = f"{100 * a.robust_accuracy:.1f}%" if a.robust_accuracy is not None else f"-{a.n_broken}"
    return f"{a.label} {own}"


# ================================================================================================ suites
@dataclass
class SuiteEntry:
    """One attack of a suite before it is built for an ε.

    ``attack`` is a registry name, a factory or an instance; ``kwargs`` its settings (strings such as
    ``"eps/4"`` are relative to ε); ``role`` marks the entries the diagnostics reuse (``"fgsm"``,
    ``"pgd"``); ``individual`` entries run on every clean-correct sample.
    """

    label: str
    attack: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    individual: bool = False
    role: str | None = None
    black_box: bool | None = None


def suite_entries(
    suite: str | Sequence[Any],
    *,
    norm: str = "Linf",
    n_queries: int | None = None,
    parent: nn.Module | None = None,
) -> list[SuiteEntry]:
    """The entries of a named suite (or of a custom list, normalised). A named suite whose attacks are not
    all registered in :mod:`qrobust.attacks` raises :class:`ConfigError`."""
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ConfigError(f"unknown suite {suite!r}; choose one of {SUITES} or pass a list of attacks")
        entries = _named_suite(suite, norm=norm, n_queries=n_queries, parent=parent)
        for e in entries:
            if isinstance(e.attack, str):
                _resolve(e.attack)  # raises with the list of what exists
        return entries
    if isinstance(suite, (nn.Module, bytes)) or not isinstance(suite, Iterable):
        raise ConfigError(f"suite must be one of {SUITES} or a list of attacks, got {type(suite).__name__}")
    entries = []
    for item in suite:
        entries.append(_custom_entry(item))
    if not entries:
        raise ConfigError("the suite is empty: give at least one attack")
    return entries


def _named_suite(
    suite: str, *, norm: str, n_queries: int | None, parent: nn.Module | None
) -> list[SuiteEntry]:
    if n_queries is not None and (isinstance(n_queries, bool) or not isinstance(n_queries, int)
                                  or n_queries < 1):
        raise ConfigError(f"n_queries must be a positive integer, got {n_queries!r}")
    queries = 5000 if n_queries is None else n_queries
    if suite == "quick":
        if norm == "Linf":
            return [
                SuiteEntry("fgsm", "fgsm", {}, individual=True, role="fgsm"),
                SuiteEntry("pgd-20", "pgd", {"steps": 20, "alpha": "eps/4"}, individual=True, role="pgd"),
            ]
        return [
            SuiteEntry("fgm-l2", "pgdl2", {"steps": 1, "alpha": "eps", "random_start": False},
                       individual=True, role="fgsm"),
            SuiteEntry("pgd-l2-20", "pgdl2", {"steps": 20, "alpha": "eps/4"}, individual=True, role="pgd"),
        ]
    standard = [
        SuiteEntry("apgd-ce", "apgd-ce", {"n_iter": 100}),
        SuiteEntry("apgd-t", "apgd-t", {"n_iter": 100}),
    ]
    square = SuiteEntry("square", "square" if norm == "Linf" else "square-l2", {"n_queries": queries},
                        black_box=True)
    if suite == "standard":
        return [*standard, square]
    entries = [dataclasses.replace(e, label=f"{e.label}[ste]", kwargs={**e.kwargs, "gradients": "ste"})
               for e in standard]
    entries += [dataclasses.replace(e, label=f"{e.label}[surrogate]",
                                    kwargs={**e.kwargs, "gradients": "surrogate"}) for e in standard]
    entries.append(square)
    if norm == "Linf":
        entries.append(SuiteEntry("spsa", "spsa", {}, black_box=True))
    if parent is not None:
        source_attack = "pgd" if norm == "Linf" else "pgdl2"
        entries.append(SuiteEntry("transfer-pgd-20[parent]", "transfer",
                                  {"source": parent, "attack": source_attack, "steps": 20, "alpha": "eps/4"},
                                  black_box=True))
    return entries


def _custom_entry(item: Any) -> SuiteEntry:
    from qrobust.attacks import Attack

    if isinstance(item, SuiteEntry):
        return dataclasses.replace(item, kwargs=dict(item.kwargs))
    if isinstance(item, str):
        return SuiteEntry("", item, {})
    if isinstance(item, Attack):
        return SuiteEntry("", item, {})
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) \
            and isinstance(item[1], Mapping):
        kw = dict(item[1])
        label = kw.pop("label", "")
        individual = bool(kw.pop("individual", False))
        black_box = kw.pop("black_box", None)
        return SuiteEntry(str(label), item[0], kw, individual=individual, black_box=black_box)
    if callable(item):
        return SuiteEntry("", item, {})
    raise ConfigError(
        f"a suite item must be an attack name, a (name, kwargs) pair, an Attack instance or a factory, got "
        f"{item!r}"
    )


def _resolve(name: str) -> tuple[Any, Callable[..., Any], dict[str, Any]]:
    """A registry name → (its class, a factory ``f(model, **kw)``, the settings the name implies)."""
    import qrobust.attacks as A

    key = name.lower()
    if key not in A.ATTACKS:
        raise ConfigError(f"attack {name!r} is not available in qrobust.attacks; available: "
                          f"{', '.join(A.available_attacks())}")

    def factory(model: nn.Module, **kw: Any) -> Any:
        return A.make_attack(key, model, **kw)

    return A.ATTACKS[key], factory, dict(A.PRESETS.get(key, {}))


def _accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes keyword ``name``, explicitly or through ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _accepts_explicitly(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _eps_expr(v: Any, eps: float) -> Any:
    """Suite kwargs may say ``"eps"``, ``"eps/4"``, ``"2*eps"`` … for values relative to ε."""
    if isinstance(v, str) and "eps" in v:
        s = v.replace(" ", "")
        if s == "eps":
            return eps
        if s.startswith("eps/"):
            return eps / float(s[4:])
        if s.endswith("*eps"):
            return float(s[:-4]) * eps
        raise ConfigError(f"cannot read {v!r}; write 'eps', 'eps/K' or 'K*eps'")
    return v


@dataclass
class _Built:
    entry: SuiteEntry
    attack: Any  # an Attack
    label: str
    black_box: bool
    gradients: str | None
    individual: bool
    kwargs: dict[str, Any]  # the kwargs used (for rebuilding with more steps), {} for instances


def _is_black_box(atk: Any) -> bool:
    flag = getattr(atk, "black_box", None)
    if isinstance(flag, bool):
        return flag
    name = str(getattr(atk, "name", type(atk).__name__)).lower()
    return name.split("-")[0].split("[")[0] in BLACK_BOX_NAMES


def _build_entry(
    entry: SuiteEntry,
    *,
    model: nn.Module,
    eps: float,
    norm: str,
    gradients: str,
    seed: int | None,
    surrogate: nn.Module | None,
    overrides: Mapping[str, Any],
) -> _Built:
    from qrobust.attacks import Attack

    a = entry.attack
    used: dict[str, Any] = {}
    if isinstance(a, Attack):
        if a.model is not model:
            log.warning("attack %s was built for another model object; it attacks that one", a)
        atk = a
    else:
        if isinstance(a, str):
            cls, fn, preset = _resolve(a)
        elif callable(a):
            cls, fn, preset = a, a, {}
        else:
            raise ConfigError(f"cannot build an attack from {a!r}")
        kw: dict[str, Any] = {"eps": eps}
        bb_guess = entry.black_box if entry.black_box is not None else (
            isinstance(a, str) and a.lower().split("-")[0] in BLACK_BOX_NAMES)
        if seed is not None and _accepts(cls, "seed"):
            kw["seed"] = seed
        if not bb_guess and _accepts(cls, "gradients"):
            kw["gradients"] = gradients
        if _accepts_explicitly(cls, "norm") and "norm" not in preset:
            kw["norm"] = norm
        kw.update({k: _eps_expr(v, eps) for k, v in entry.kwargs.items()})
        kw.update({k: _eps_expr(v, eps) for k, v in overrides.items()})
        if kw.get("gradients") == "surrogate" and surrogate is not None:
            kw.setdefault("surrogate", surrogate)
        used = {k: v for k, v in kw.items() if not isinstance(v, nn.Module)}
        try:
            atk = fn(model, **kw)
        except TypeError as e:
            raise ConfigError(f"cannot build attack {entry.label or a!r} with {sorted(kw)}: {e}") from e
        if not isinstance(atk, Attack):
            raise ConfigError(f"{entry.label or a!r} did not produce a qrobust Attack (got "
                              f"{type(atk).__name__})")
    a_eps, a_norm = getattr(atk, "eps", None), getattr(atk, "norm", None)
    if a_norm != norm:
        raise ConfigError(f"attack {atk!r} works in {a_norm} but the evaluation's threat model is {norm}; "
                          f"pick an attack for {norm} or set norm={a_norm!r}")
    if a_eps is None or abs(a_eps - eps) > 1e-9 * max(1.0, eps):
        raise ConfigError(f"attack {atk!r} has ε={a_eps} but is evaluated at ε={eps}; attack instances keep "
                          f"their own ε — pass a name, (name, kwargs) or a factory for ε sweeps")
    black_box = entry.black_box if entry.black_box is not None else _is_black_box(atk)
    grads = None if black_box else getattr(atk, "gradients", None)
    label = entry.label or _default_label(atk, gradients)
    return _Built(entry, atk, label, black_box, grads, entry.individual, used)


def _default_label(atk: Any, gradients: str) -> str:
    label = str(getattr(atk, "name", type(atk).__name__)).lower()
    steps = getattr(atk, "steps", None)
    if isinstance(steps, int) and label in ("pgd", "pgdl2", "bim", "mifgsm"):
        label = f"{label}-{steps}"
    g = getattr(atk, "gradients", None)
    if g is not None and g != gradients and not _is_black_box(atk):
        label += f"[{g}]"
    return label


# ================================================================================================== data
def _materialize(data: Any, n: int | None) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """``data`` → (x float32 in [0, 1] on the CPU, y int64, dataset name if known)."""
    from qrobust.data import ArrayDataset

    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be a positive integer (number of test samples), got {n!r}")
    name = None
    if isinstance(data, ArrayDataset):
        x, y = data.tensors(n)
        name = data.info.name
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise InputError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
        if n is not None:
            x, y = x[:n], y[:n]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        xs, ys, count = [], [], 0
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise InputError(f"a data loader must yield (x, y) batches, got {type(batch).__name__}")
            bx, by = batch[0], batch[1]
            xs.append(bx.detach().cpu())
            ys.append(torch.as_tensor(by).detach().cpu())
            count += bx.shape[0]
            if n is not None and count >= n:
                break
        if not xs:
            raise InputError("the data loader yielded no batches")
        x, y = torch.cat(xs), torch.cat(ys)
        if n is not None:
            x, y = x[:n], y[:n]
        ds = getattr(data, "dataset", None) or getattr(data, "ds", None)
        info = getattr(ds, "info", None)
        name = getattr(info, "name", None)
    else:
        raise ConfigError(f"cannot evaluate on a {type(data).__name__}: give an ArrayDataset, a DataLoader "
                          f"or an (x, y) pair of tensors")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise InputError(f"x must be a float tensor N×… with pixels in [0, 1], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if y.dtype == torch.bool or y.is_floating_point() or y.dim() != 1:
        raise InputError(f"y must be int64 labels of shape (N,), got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise InputError("no samples to evaluate on")
    x = x.detach().cpu().float()
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise InputError("x must be finite pixels in [0, 1]; normalization belongs inside the model")
    return x.contiguous(), y.detach().cpu().long(), name


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    dev = _device_of(model)
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(model(x[i:i + batch_size].to(dev)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _run_attack(
    atk: Any,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    *,
    batch_size: int,
    desc: str,
    keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, int]]:
    """Attack the samples ``idx`` in batches; score on ``model``. Returns (still-correct (len(idx),) bool,
    prediction after the attack, x_adv of those samples if ``keep``, summed attack counters)."""
    from qrobust.attacks import lp_norm

    ok = torch.zeros(idx.numel(), dtype=torch.bool)
    pred = torch.zeros(idx.numel(), dtype=torch.long)
    advs: list[torch.Tensor] = []
    stats: dict[str, int] = {}
    dev = _device_of(model)
    starts = range(0, idx.numel(), batch_size)
    for s in progress(starts, desc=desc, total=len(starts)):
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
        pred[s:s + b.numel()] = p
        ok[s:s + b.numel()] = p == yb
        if keep:
            advs.append(x_adv.detach().cpu())
        for k, v in getattr(atk, "last_stats", {}).items():
            if isinstance(v, int):
                stats[k] = stats.get(k, 0) + v
    kept = torch.cat(advs) if keep and advs else (x[idx].clone() if keep else None)
    return ok, pred, kept, stats


# ============================================================================================== evaluate
def evaluate(
    model: nn.Module,
    data: Any,
    *,
    suite: str | Sequence[Any] = "quick",
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
) -> RobustnessReport:
    """Evaluate ``model`` on ``data`` under ``suite`` at ``eps`` (one value or a list) → a report.

    ``data`` — an ArrayDataset (first ``n`` samples), a DataLoader/BatchLoader (batches until ``n``) or an
    ``(x, y)`` pair. ``norm`` — ``"Linf"`` or ``"L2"``. ``gradients`` — how the white-box attacks
    differentiate through quantizers unless a suite entry says otherwise (``"ste"``, ``"native"``,
    ``"surrogate"``; ``surrogate=`` a float model for the latter). ``individual=True`` runs every attack on
    every clean-correct sample (own robust accuracy for each, at up to the cost of running them all in
    full). ``seed`` seeds every attack (``None``: fresh randomness). See the module docstring for the
    suites, the sweep semantics and the cost of the diagnostics.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if norm not in THREAT_MODELS:
        raise ConfigError(f"norm must be one of {THREAT_MODELS}, got {norm!r}")
    if gradients not in ("ste", "native", "surrogate"):
        raise ConfigError(f"gradients must be 'ste', 'native' or 'surrogate', got {gradients!r}")
    for name, v in (("batch_size", batch_size), ("diagnostic_n", diagnostic_n),
                    ("diagnostic_steps", diagnostic_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if parent is not None and not isinstance(parent, nn.Module):
        raise ConfigError(f"parent must be a torch.nn.Module (the float model), got {type(parent).__name__}")
    from qrobust.validation import check_eps

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
    _mark_roles(entries, norm)

    x, y, ds_name = _materialize(data, n)
    n_total = x.shape[0]
    modes = [(m, m.training) for m in model.modules()] + (
        [(m, m.training) for m in parent.modules()] if parent is not None else [])
    model.eval()
    if parent is not None:
        parent.eval()
    try:
        pred_clean = _predict(model, x, batch_size)
        clean_correct = pred_clean == y
        clean_acc = float(clean_correct.float().mean())
        log.info("clean accuracy %.2f%% on %d samples", 100 * clean_acc, n_total)

        results: list[EpsResult] = []
        diags: list[Diagnostic] = []
        examples: dict[str, Any] | None = None
        if return_examples:
            examples = {"x": x, "y": y, "pred_clean": pred_clean, "x_adv": {}, "pred_adv": {}}
        prev_robust = clean_correct.clone()
        prev_adv = x.clone() if return_examples else None
        prev_pred = pred_clean.clone() if return_examples else None
        built_per_eps: list[list[_Built]] = []
        for e in eps_values:
            t_eps = time.perf_counter()
            built = [_build_entry(en, model=model, eps=e, norm=norm, gradients=gradients,
                                  seed=seed, surrogate=surrogate, overrides=overrides.get(en.label, {}))
                     for en in entries]
            _dedupe_labels(built)
            if not isinstance(suite, str):
                unknown = sorted(set(overrides) - {b.label for b in built})
                if unknown:
                    have = [b.label for b in built]
                    raise ConfigError(f"attack_kwargs names {unknown}, not in the suite: {have}")
            built_per_eps.append(built)
            robust = prev_robust.clone()
            n_inherited = int((clean_correct & ~prev_robust).sum())
            best_adv = prev_adv.clone() if prev_adv is not None else None
            best_pred = prev_pred.clone() if prev_pred is not None else None
            attack_results = []
            for b in built:
                # run on every clean-correct sample when asked — or for free when nothing is broken yet
                own_run = b.individual or individual or torch.equal(robust, clean_correct)
                targets = clean_correct if own_run else robust
                idx = targets.nonzero().squeeze(1)
                t0 = time.perf_counter()
                ok, pred, adv, stats = _run_attack(
                    b.attack, model, x, y, idx, batch_size=batch_size,
                    desc=f"{b.label} ε={e:.4g}", keep=return_examples)
                dt = time.perf_counter() - t0
                before = robust.clone()
                broken_idx = idx[~ok]
                robust[broken_idx] = False
                newly = before & ~robust
                if best_adv is not None and adv is not None and best_pred is not None:
                    sel = newly[idx]
                    best_adv[idx[sel]] = adv[sel]
                    best_pred[idx[sel]] = pred[sel]
                own_mask = None
                own_acc = None
                if own_run:
                    own_mask = torch.zeros(n_total, dtype=torch.bool)
                    own_mask[idx] = ok
                    own_acc = float(own_mask.float().mean())
                res = AttackResult(
                    label=b.label,
                    attack=str(getattr(b.attack, "name", type(b.attack).__name__)),
                    settings=_settings(b),
                    black_box=b.black_box,
                    gradients=b.gradients,
                    individual=own_run,
                    n_attacked=int(idx.numel()),
                    n_broken=int(newly.sum()),
                    robust_accuracy=own_acc,
                    robust_accuracy_after=float(robust.float().mean()),
                    time_s=dt,
                    stats=stats,
                    robust=None if own_mask is None else _mask_str(own_mask),
                )
                attack_results.append(res)
                log.info("ε=%.4g %s: %s after %.2f%% (broke %d) in %.1fs", e, b.label,
                         "own %.2f%%," % (100 * own_acc) if own_acc is not None else "", 100 *
                         res.robust_accuracy_after, res.n_broken, dt)
            results.append(EpsResult(eps=e, robust_accuracy=float(robust.float().mean()),
                                     attacks=attack_results, robust=_mask_str(robust),
                                     n_inherited=n_inherited, time_s=time.perf_counter() - t_eps))
            if examples is not None and best_adv is not None:
                examples["x_adv"][repr(e)] = best_adv
                examples["pred_adv"][repr(e)] = best_pred
            prev_robust, prev_adv, prev_pred = robust, best_adv, best_pred

        diag_settings: dict[str, Any] = {}
        if diagnostics:
            diags, diag_settings = _run_diagnostics(
                model, x, y, clean_correct, results, built_per_eps, norm=norm, gradients=gradients, seed=seed,
                surrogate=surrogate, batch_size=batch_size, diagnostic_n=diagnostic_n,
                diagnostic_steps=diagnostic_steps, large_eps=large_eps,
                large_eps_max_accuracy=large_eps_max_accuracy, tol=tol)
    finally:
        for m, t in modes:
            m.training = t

    import numpy as np

    import qrobust

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
        "device": str(_device_of(model)),
        **diag_settings,
    }
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
        results=results,
        diagnostics=diags,
        bits=copy.deepcopy(getattr(model, "qrobust_spec", None)),
        gradients=gradients,
        seed=seed,
        batch_size=batch_size,
        versions={"qrobust": qrobust.__version__, "torch": torch.__version__,
                  "python": platform.python_version(), "numpy": np.__version__},
        wall_time_s=time.perf_counter() - t_start,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        arch=copy.deepcopy(arch) if isinstance(arch, Mapping) else None,
        parent=None if parent is None else (
            (getattr(parent, "qrobust_arch", None) or {}).get("name") or type(parent).__name__),
        settings=json.loads(json.dumps(settings, default=str)),
        clean=_mask_str(clean_correct),
        examples=examples,
    )
    for d in report.flagged:
        where = "" if d.eps is None else f" (ε={d.eps:g})"
        log.warning("diagnostic flag %s%s: %s", d.name, where, d.evidence)
    return report


def _settings(b: _Built) -> dict[str, Any]:
    cfg = b.attack.config() if hasattr(b.attack, "config") else {"attack": type(b.attack).__name__}
    for k, v in b.entry.kwargs.items():
        if isinstance(v, nn.Module):
            arch = getattr(v, "qrobust_arch", None)
            cfg[k] = (arch.get("name") if isinstance(arch, Mapping) else None) or type(v).__name__
    return json.loads(json.dumps(cfg, default=str))


def _dedupe_labels(built: list[_Built]) -> None:
    seen: dict[str, int] = {}
    for b in built:
        if b.label in seen:
            seen[b.label] += 1
            b.label = f"{b.label}#{seen[b.label]}"
        else:
            seen[b.label] = 1


def _mark_roles(entries: list[SuiteEntry], norm: str) -> None:
    """Give the first FGSM and the first plain PGD of a custom suite the roles the diagnostics reuse (they
    then run on every clean-correct sample)."""
    if any(e.role for e in entries):
        return
    fgsm_names = ("fgsm",) if norm == "Linf" else ()
    pgd_names = ("pgd",) if norm == "Linf" else ("pgdl2", "pgd-l2")
    for role, names in (("fgsm", fgsm_names), ("pgd", pgd_names)):
        for e in entries:
            a = e.attack
            name = a.lower() if isinstance(a, str) else str(getattr(a, "name", "")).lower()
            if name in names:
                e.role, e.individual = role, True
                break


# =========================================================================================== diagnostics
def _own_accuracy(atk: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor,
                  batch_size: int, desc: str) -> float:
    idx = correct.nonzero().squeeze(1)
    ok, _, _, _ = _run_attack(atk, model, x, y, idx, batch_size=batch_size, desc=desc, keep=False)
    return float(ok.sum()) / x.shape[0]


def _run_diagnostics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    results: list[EpsResult],
    built_per_eps: list[list[_Built]],
    *,
    norm: str,
    gradients: str,
    seed: int | None,
    surrogate: nn.Module | None,
    batch_size: int,
    diagnostic_n: int,
    diagnostic_steps: int,
    large_eps: float,
    large_eps_max_accuracy: float,
    tol: float,
) -> tuple[list[Diagnostic], dict[str, Any]]:
    from qrobust.attacks import FGSM, PGD

    t0 = time.perf_counter()
    nd = min(diagnostic_n, x.shape[0])
    xd, yd, cd = x[:nd], y[:nd], clean_correct[:nd]
    out: list[Diagnostic] = []

    # (1) input gradients in every mode the white-box attacks use, and native for comparison
    wb = [b for b in built_per_eps[0] if not b.black_box and b.gradients is not None]
    attack_modes: list[str] = []
    surrogates: dict[str, nn.Module | None] = {}
    for b in wb:
        if b.gradients not in attack_modes:
            attack_modes.append(b.gradients)
            surrogates[b.gradients] = getattr(b.attack, "surrogate", None)
    gb = min(nd, batch_size)
    health = {}
    for m in dict.fromkeys([*attack_modes, "native"]):
        sur = surrogates.get(m, surrogate) if m == "surrogate" else None
        health[m] = gradient_health(model, xd[:gb], yd[:gb], gradients=m, surrogate=sur)
    out.append(check_zero_gradients(health, attack_modes, tol=tol))

    probe_grad = gradients
    steps_used = diagnostic_steps
    # (4) security curve end point: PGD at a large ε (L∞), in the primary gradient mode
    pgd_large = PGD(model, eps=large_eps, alpha=large_eps / 4, steps=diagnostic_steps, gradients=probe_grad,
                    seed=seed, surrogate=surrogate if probe_grad == "surrogate" else None)
    acc_large = _own_accuracy(pgd_large, model, xd, yd, cd, batch_size, f"diag pgd ε={large_eps:g}")
    out.append(check_large_eps(accuracy=acc_large, large_eps=large_eps, max_accuracy=large_eps_max_accuracy,
                               attack_label=f"PGD-{diagnostic_steps} (L∞)"))

    for res, built in zip(results, built_per_eps):
        e = res.eps
        by_role = {b.entry.role: b for b in built if b.entry.role}
        own = {a.label: a for a in res.attacks}

        def own_on_subset(b: _Built | None, own: dict[str, AttackResult] = own) -> float | None:
            """The suite's own robust accuracy of ``b`` on the diagnostic subset (if run on every sample)."""
            mask = None if b is None else own[b.label].robust
            return None if mask is None else float(_str_mask(mask)[:nd].float().mean())

        # FGSM and PGD-k at this ε: reused from the suite when it ran them on every sample
        fgsm_b = by_role.get("fgsm")
        fgsm_acc = own_on_subset(fgsm_b)
        fgsm_label = fgsm_b.label if fgsm_acc is not None and fgsm_b is not None else (
            "FGSM" if norm == "Linf" else "FGM-L2")
        if fgsm_acc is None:
            if norm == "Linf":
                probe = FGSM(model, eps=e, gradients=probe_grad, seed=seed,
                             surrogate=surrogate if probe_grad == "surrogate" else None)
            else:
                probe = _pgd_probe(model, e, norm, steps=1, alpha=e, random_start=False, gradients=probe_grad,
                                   seed=seed, surrogate=surrogate)
            fgsm_acc = _own_accuracy(probe, model, xd, yd, cd, batch_size, f"diag {fgsm_label} ε={e:.4g}")
        pgd_b = by_role.get("pgd")
        pgd_acc = own_on_subset(pgd_b)
        k = getattr(pgd_b.attack, "steps", None) if pgd_b is not None else None
        if pgd_acc is not None and pgd_b is not None and isinstance(pgd_b.entry.attack, str) \
                and isinstance(k, int):
            # the suite's own PGD, rebuilt with twice the steps (same step size, seed and gradients)
            pgd_label = pgd_b.label
            _, fn, _ = _resolve(pgd_b.entry.attack)
            kw2 = {**pgd_b.kwargs, "steps": 2 * k}
            if getattr(pgd_b.attack, "surrogate", None) is not None:
                kw2["surrogate"] = pgd_b.attack.surrogate
            probe2 = fn(model, **kw2)
        else:
            k = diagnostic_steps
            pgd_label = f"PGD-{k}"
            probe = _pgd_probe(model, e, norm, steps=k, alpha=e / 4, random_start=True, gradients=probe_grad,
                               seed=seed, surrogate=surrogate)
            pgd_acc = _own_accuracy(probe, model, xd, yd, cd, batch_size, f"diag {pgd_label} ε={e:.4g}")
            probe2 = _pgd_probe(model, e, norm, steps=2 * k, alpha=e / 4, random_start=True,
                                gradients=probe_grad, seed=seed, surrogate=surrogate)
        steps_used = k
        acc2 = _own_accuracy(probe2, model, xd, yd, cd, batch_size, f"diag pgd-{2 * k} ε={e:.4g}")
        out.append(check_single_step(fgsm_accuracy=fgsm_acc, pgd_accuracy=pgd_acc, eps=e, tol=tol,
                                     fgsm_label=fgsm_label, pgd_label=pgd_label))
        out.append(check_convergence(accuracy=pgd_acc, accuracy_more_steps=acc2, steps=k, eps=e, tol=tol,
                                     label=pgd_label))

        # (3) black-box vs white-box, from the suite's own results
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
        out.append(check_black_box(white_box=wb_own, black_box=bb_own, black_box_extra=extra, eps=e, tol=tol)
                   if (bb_own or extra) and (wb_own or extra) else not_checked(
            "black_box_beats_white_box",
            "the suite has no black-box attack (add Square, e.g. the 'standard' suite)"
            if not any(a.black_box for a in res.attacks) else "the suite has no white-box attack", eps=e))

    order = list(CHECKS)
    out.sort(key=lambda d: (order.index(d.name), -1.0 if d.eps is None else d.eps))
    return out, {"diagnostic_steps_used": steps_used, "diagnostics_time_s": time.perf_counter() - t0}


def _pgd_probe(model: nn.Module, eps: float, norm: str, *, steps: int, alpha: float, random_start: bool,
               gradients: str, seed: int | None, surrogate: nn.Module | None) -> Any:
    from qrobust.attacks import PGD

    cls: Any = PGD
    if norm == "L2":
        cls, _, _ = _resolve("pgdl2")
    return cls(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, gradients=gradients,
               seed=seed, surrogate=surrogate if gradients == "surrogate" else None)
