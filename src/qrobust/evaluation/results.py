"""The evaluation's data model: what one evaluation measured, as plain data written as JSON.

A :class:`RobustnessReport` holds one :class:`EpsResult` per ε, each with one :class:`AttackResult` per
attack, and the diagnostics; ``to_dict``/``from_dict`` are the ``qrobust-report/1`` JSON format
(:data:`FORMAT`), from which :mod:`qrobust.report` renders Markdown and plots. Per-sample masks travel as
strings of ``0``/``1`` (one character per sample).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qrobust.analysis.diagnostics import Diagnostic
from qrobust.errors import ConfigError, InputError

FORMAT = "qrobust-report/1"


def mask_str(mask: torch.Tensor) -> str:
    """A boolean mask as a string of ``0``/``1``."""
    return "".join("1" if b else "0" for b in mask.tolist())


def str_mask(s: str) -> torch.Tensor:
    """A string of ``0``/``1`` as a boolean mask."""
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
        return None if self.robust is None else str_mask(self.robust)

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
        return str_mask(self.robust)

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
