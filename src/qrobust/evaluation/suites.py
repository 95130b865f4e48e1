"""Which attacks an evaluation runs: the named suites, custom lists, and building each attack for an ε.

A suite is a list of :class:`SuiteEntry` (an attack not yet built: a registry name, a factory or an
instance, with its settings); :func:`build_attacks` turns the entries into attacks at one ε. What an attack
*is* — black-box, the diagnostics' FGSM or PGD reference, whether its label names its steps — is read from
what its class declares (:class:`qrobust.attacks.Attack`'s class facts), never guessed from its name: a new
attack touches its own file and the registry, nothing here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qrobust.attacks import ATTACKS, PRESETS, Attack, External, available_attacks, is_foreign_attack, make_attack
from qrobust.errors import ConfigError

log = logging.getLogger(__name__)

SUITES = ("quick", "standard", "quantized")


@dataclass
class SuiteEntry:
    """One attack of a suite before it is built for an ε.

    ``attack`` is a registry name, a factory or an instance; ``kwargs`` its settings (strings such as
    ``"eps/4"`` are relative to ε); ``role`` marks the entries the diagnostics reuse (``"fgsm"``,
    ``"pgd"``); ``individual`` entries run on every clean-correct sample; ``black_box`` overrides what the
    attack's class declares (``None``: the class decides).
    """

    label: str
    attack: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    individual: bool = False
    role: str | None = None
    black_box: bool | None = None


# ------------------------------------------------------------------------------------------ entries
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
    entries = [_custom_entry(item) for item in suite]
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
    square = SuiteEntry("square", "square" if norm == "Linf" else "square-l2", {"n_queries": queries})
    if suite == "standard":
        return [*standard, square]
    entries = [dataclasses.replace(e, label=f"{e.label}[ste]", kwargs={**e.kwargs, "gradients": "ste"})
               for e in standard]
    # neither straight-through estimator is stronger everywhere: BPDA too (qrobust.quant.attack_mode)
    entries.append(dataclasses.replace(standard[0], label="apgd-ce[bpda]",
                                       kwargs={**standard[0].kwargs, "gradients": "bpda"}))
    entries += [dataclasses.replace(e, label=f"{e.label}[surrogate]",
                                    kwargs={**e.kwargs, "gradients": "surrogate"}) for e in standard]
    entries.append(square)
    if norm == "Linf":
        # 100 steps × 32 samples = 3,200 queries a point, below Square's 5,000 (SPSA's own default, 128
        # samples, is 12,800 and made this suite cost 393 s on 64 MNIST images); the expensive budget stays
        # one option away: attack_kwargs={"spsa": {"nb_samples": 128}} (CLI: --attack-options)
        entries.append(SuiteEntry("spsa", "spsa", {"steps": 100, "nb_samples": 32}))
    if parent is not None:
        source_attack = "pgd" if norm == "Linf" else "pgdl2"
        entries.append(SuiteEntry("transfer-pgd-20[parent]", "transfer",
                                  {"source": parent, "attack": source_attack, "steps": 20, "alpha": "eps/4"}))
    return entries


def _custom_entry(item: Any) -> SuiteEntry:
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
        f"a suite item must be an attack name, a (name, kwargs) pair, an Attack instance, a factory or another "
        f"library's attack (a torchattacks object, a callable (x, y) -> x_adv), got "
        f"{item!r}"
    )


def attack_class(attack: Any) -> type[Attack] | None:
    """The :class:`Attack` class an entry's ``attack`` builds (``None`` for an unknown name or a factory
    function, whose class is only known once built)."""
    if isinstance(attack, str):
        return ATTACKS.get(attack.lower())
    if isinstance(attack, Attack):
        return type(attack)
    if isinstance(attack, type) and issubclass(attack, Attack):
        return attack
    return None


def mark_roles(entries: list[SuiteEntry]) -> None:
    """Give the first attack of a custom suite whose class is the diagnostics' FGSM reference, and the first
    that is their PGD reference (:attr:`Attack.diagnostic_role`), those roles: they then run on every
    clean-correct sample and the diagnostics reuse their results. A suite that names roles keeps its own."""
    if any(e.role for e in entries):
        return
    for role in ("fgsm", "pgd"):
        for e in entries:
            cls = attack_class(e.attack)
            if cls is not None and cls.diagnostic_role == role:
                e.role, e.individual = role, True
                break


def _resolve(name: str) -> tuple[type[Attack], Callable[..., Attack], dict[str, Any]]:
    """A registry name → (its class, a factory ``f(model, **kw)``, the settings the name implies)."""
    key = name.lower()
    if key not in ATTACKS:
        raise ConfigError(f"attack {name!r} is not available in qrobust.attacks; available: "
                          f"{', '.join(available_attacks())}")

    def factory(model: nn.Module, **kw: Any) -> Attack:
        return make_attack(key, model, **kw)

    return ATTACKS[key], factory, dict(PRESETS.get(key, {}))


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


# ------------------------------------------------------------------------------------------ building
@dataclass(frozen=True)
class BuildSettings:
    """What every attack of a suite is built with: the model and the evaluation's threat model, default
    gradient mode, seed and surrogate."""

    model: nn.Module
    norm: str
    gradients: str
    seed: int | None
    surrogate: nn.Module | None


@dataclass
class BuiltAttack:
    """A suite entry built for one ε: the attack, its (de-duplicated) label and what the run records."""

    entry: SuiteEntry
    attack: Attack
    label: str
    black_box: bool
    gradients: str | None
    individual: bool
    kwargs: dict[str, Any]  # the kwargs used (for rebuilding with more steps), {} for instances

    @property
    def role(self) -> str | None:
        return self.entry.role

    def rebuilt(self, model: nn.Module, **changes: Any) -> Attack | None:
        """The same attack built again with ``changes`` (same seed, gradients and surrogate), or ``None``
        when the entry was not a registry name (an instance or a factory cannot be rebuilt)."""
        if not isinstance(self.entry.attack, str):
            return None
        _, fn, _ = _resolve(self.entry.attack)
        kw = {**self.kwargs, **changes}
        if getattr(self.attack, "surrogate", None) is not None:
            kw["surrogate"] = self.attack.surrogate
        return fn(model, **kw)

    def settings(self) -> dict[str, Any]:
        """The attack's settings as JSON data (a model given as a setting appears by its name)."""
        cfg = self.attack.config()
        for k, v in self.entry.kwargs.items():
            if isinstance(v, nn.Module):
                arch = getattr(v, "qrobust_arch", None)
                cfg[k] = (arch.get("name") if isinstance(arch, Mapping) else None) or type(v).__name__
        return json.loads(json.dumps(cfg, default=str))


def build_attacks(
    entries: Sequence[SuiteEntry],
    *,
    eps: float,
    settings: BuildSettings,
    overrides: Mapping[str, Mapping[str, Any]],
    check_overrides: bool,
) -> list[BuiltAttack]:
    """Every entry built at ``eps`` with its ``overrides`` (by label), labels made unique (``pgd#2``);
    ``check_overrides`` refuses override labels that name no attack of the suite."""
    built = [build_entry(en, eps=eps, settings=settings, overrides=overrides.get(en.label, {}))
             for en in entries]
    _dedupe_labels(built)
    if check_overrides:
        unknown = sorted(set(overrides) - {b.label for b in built})
        if unknown:
            have = [b.label for b in built]
            raise ConfigError(f"attack_kwargs names {unknown}, not in the suite: {have}")
    return built


def build_entry(
    entry: SuiteEntry, *, eps: float, settings: BuildSettings, overrides: Mapping[str, Any]
) -> BuiltAttack:
    """One entry built at ``eps``: ε, the seed and — for an attack that is not black-box — the gradient
    mode are handed to it when it takes them, then the entry's settings and the overrides."""
    model, norm = settings.model, settings.norm
    a = entry.attack
    used: dict[str, Any] = {}
    if is_foreign_attack(a):
        black = bool(entry.black_box)
        extra: dict[str, Any] = {} if black else {"gradients": settings.gradients}
        atk = External(model, a, eps=eps, norm=norm, black_box=black, seed=settings.seed, **extra)
    elif isinstance(a, Attack):
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
        known = attack_class(a)
        black_box = entry.black_box if entry.black_box is not None else bool(known and known.black_box)
        if settings.seed is not None and _accepts(cls, "seed"):
            kw["seed"] = settings.seed
        if not black_box and _accepts(cls, "gradients"):
            kw["gradients"] = settings.gradients
        if _accepts_explicitly(cls, "norm") and "norm" not in preset:
            kw["norm"] = norm
        kw.update({k: _eps_expr(v, eps) for k, v in entry.kwargs.items()})
        kw.update({k: _eps_expr(v, eps) for k, v in overrides.items()})
        if kw.get("gradients") == "surrogate" and settings.surrogate is not None:
            kw.setdefault("surrogate", settings.surrogate)
        used = {k: v for k, v in kw.items() if not isinstance(v, nn.Module)}
        try:
            atk = fn(model, **kw)
        except TypeError as e:
            raise ConfigError(f"cannot build attack {entry.label or a!r} with {sorted(kw)}: {e}") from e
        if not isinstance(atk, Attack):
            raise ConfigError(f"{entry.label or a!r} did not produce a qrobust Attack (got "
                              f"{type(atk).__name__})")
    a_eps, a_norm = atk.eps, atk.norm
    if a_norm != norm:
        raise ConfigError(f"attack {atk!r} works in {a_norm} but the evaluation's threat model is {norm}; "
                          f"pick an attack for {norm} or set norm={a_norm!r}")
    if a_eps is None or abs(a_eps - eps) > 1e-9 * max(1.0, eps):
        raise ConfigError(f"attack {atk!r} has ε={a_eps} but is evaluated at ε={eps}; attack instances keep "
                          f"their own ε — pass a name, (name, kwargs) or a factory for ε sweeps")
    black_box = entry.black_box if entry.black_box is not None else atk.black_box
    grads = None if black_box else atk.gradients
    label = entry.label or _default_label(atk, settings.gradients)
    return BuiltAttack(entry, atk, label, black_box, grads, entry.individual, used)


def _default_label(atk: Attack, gradients: str) -> str:
    """``pgd-20``, ``apgd-ce[native]`` …: the attack's name, its steps where its class says so, and its
    gradient mode where it differs from the evaluation's."""
    label = atk.name.lower()
    steps = getattr(atk, "steps", None)
    if isinstance(steps, int) and atk.steps_in_label:
        label = f"{label}-{steps}"
    if atk.gradients != gradients and not atk.black_box:
        label += f"[{atk.gradients}]"
    return label


def _dedupe_labels(built: list[BuiltAttack]) -> None:
    seen: dict[str, int] = {}
    for b in built:
        if b.label in seen:
            seen[b.label] += 1
            b.label = f"{b.label}#{seen[b.label]}"
        else:
            seen[b.label] = 1
