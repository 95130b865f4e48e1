"""The model zoo: robust (quantized) checkpoints, each with a card — its numbers as data — beside it.

A zoo is a folder of pairs ``NAME.safetensors`` (a qrobust checkpoint) and ``NAME.json`` (its card,
RobustBench-like). The repository's own zoo is ``zoo/`` at its root; ``QROBUST_ZOO`` (or ``zoo_dir=``)
points at another. ``qrobust.load("zoo:NAME")``, and every CLI command that takes a checkpoint, resolves a
``zoo:NAME`` through :func:`resolve`.

A card (:data:`CARD_FORMAT`) holds at least the fields of :data:`CARD_FIELDS`; :func:`check_card` refuses a
card with a missing or ill-typed field in one line naming it. Accuracies are in %; ``robust_accuracy`` is the
per-sample worst case over every attack of ``attacks`` (each with its settings and the worst case after it,
the attacks running in order on the samples the earlier ones left robust — AutoAttack's order). Cards are
written by :func:`card_from_report` from an evaluation's report (``qrobust zoo card``) and rendered to the
README table by :func:`markdown_table` (``qrobust zoo table``).

>>> card = {"name": "m", "dataset": "digits"}
>>> check_card(card)                            # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
CheckpointError: zoo card 'm': field 'architecture' is missing ...
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qrobust._version import __version__
from qrobust.errors import CheckpointError, ConfigError
from qrobust.quant import QuantSpec
from qrobust.utils import atomic_write_text

CARD_FORMAT = "qrobust-zoo-card/1"
PREFIX = "zoo:"
ENV = "QROBUST_ZOO"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
NORMS = ("Linf", "L2")

#: the card's required fields and what each holds
CARD_FIELDS: dict[str, str] = {
    "name": "the zoo name (the file stem; lower case, digits, '.', '_', '-')",
    "dataset": "the dataset it was trained and evaluated on (a qrobust dataset name)",
    "architecture": "the architecture's registry name (resnet20, small_cnn, …)",
    "spec": "the quantization, e.g. 'w4a4' ('float' for none)",
    "recipe": "the training objective (pgd-at, fgsm-rs, odgq, dq, …)",
    "command": "the `qrobust train …` command that trained it",
    "train_time_s": "training wall time in seconds",
    "clean_accuracy": "clean accuracy on the n_eval test images, %",
    "robust_accuracy": "per-sample worst case over every attack, %",
    "attacks": "each attack: label, attack, settings, robust_accuracy (worst case after it, %)",
    "norm": "threat model: Linf or L2",
    "eps": "ε as a fraction of the pixel range",
    "n_eval": "number of test images evaluated (the first n_eval of the test split)",
    "checkpoint": "the checkpoint's file name, NAME.safetensors",
    "qrobust_version": "the qrobust version that evaluated it",
}


# ------------------------------------------------------------------------------------------- folders
def repo_zoo() -> Path | None:
    """The ``zoo/`` folder of the repository this package runs from (``src/qrobust`` → ``zoo/``), if any."""
    pkg = Path(__file__).resolve().parent
    if pkg.parent.name == "src" and (pkg.parent.parent / "zoo").is_dir():
        return pkg.parent.parent / "zoo"
    return None


def zoo_dir(path: str | os.PathLike | None = None) -> Path:
    """The zoo folder: ``path`` if given, else ``$QROBUST_ZOO``, else the repository's ``zoo/``."""
    if path is not None:
        where, how = Path(path), "zoo_dir"
    elif os.environ.get(ENV):
        where, how = Path(os.environ[ENV]), f"${ENV}"
    else:
        found = repo_zoo()
        if found is None:
            pkg = Path(__file__).resolve().parent
            raise CheckpointError(
                f"no zoo folder: qrobust runs from {pkg}, not from a checkout's src/qrobust with a zoo/ beside "
                f"src/ (looked for {pkg.parent.parent / 'zoo'}); set {ENV}=/path/to/qrobust/zoo (a checkout's "
                f"zoo/ folder), pass zoo_dir=, or give the checkpoint's path")
        return found
    if not where.is_dir():
        raise CheckpointError(f"the zoo folder {where} (from {how}) does not exist; point {how} at a folder of "
                              f"NAME.safetensors + NAME.json pairs")
    return where


def available(path: str | os.PathLike | None = None) -> list[str]:
    """The names in the zoo (those with a card)."""
    return sorted(p.stem for p in zoo_dir(path).glob("*.json"))


def is_zoo_name(text: Any) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def resolve(name: str, path: str | os.PathLike | None = None) -> Path:
    """``"zoo:NAME"`` (or ``"NAME"``) → the checkpoint file of that zoo entry, its card checked."""
    bare = name[len(PREFIX):] if is_zoo_name(name) else name
    folder = zoo_dir(path)
    card_path = folder / f"{bare}.json"
    if not card_path.is_file():
        names = available(folder)
        raise CheckpointError(f"no zoo entry {bare!r} in {folder}; available: "
                              f"{', '.join(names) if names else '(none)'}")
    card = read_card(card_path)
    ckpt = folder / card["checkpoint"]
    if not ckpt.is_file():
        raise CheckpointError(f"zoo card {card_path} names the checkpoint {card['checkpoint']}, which is not in "
                              f"{folder} (a Git LFS pointer not fetched, or a partial copy?)")
    return ckpt


# --------------------------------------------------------------------------------------------- cards
def _bad(card: Mapping[str, Any], field: str, what: str) -> CheckpointError:
    name = card.get("name") if isinstance(card.get("name"), str) else "?"
    return CheckpointError(f"zoo card {name!r}: field {field!r} {what}")


def _number(card: Mapping[str, Any], field: str, value: Any, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        rng = f"in [{lo:g}, {hi:g}]" if hi < math.inf else f"≥ {lo:g}"
        raise _bad(card, field, f"must be a number {rng}, got {value!r}")
    return float(value)


def _text(card: Mapping[str, Any], field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(card, field, f"must be a non-empty string, got {value!r}")
    return value


def check_card(card: Any, *, stem: str | None = None) -> dict[str, Any]:
    """``card`` if it is a valid zoo card (``stem``: the file name it was read from), else CheckpointError
    naming the first missing or bad field."""
    if not isinstance(card, Mapping):
        raise CheckpointError(f"a zoo card is a JSON object, got {type(card).__name__}")
    for field, what in CARD_FIELDS.items():
        if field not in card:
            raise _bad(card, field, f"is missing ({what})")
    name = _text(card, "name", card["name"])
    if not NAME_RE.fullmatch(name):
        raise _bad(card, "name", f"must be lower case letters, digits, '.', '_' or '-', got {name!r}")
    if stem is not None and stem != name:
        raise _bad(card, "name", f"must match its file name {stem}.json, got {name!r}")
    if card.get("format", CARD_FORMAT) != CARD_FORMAT:
        raise _bad(card, "format", f"must be {CARD_FORMAT!r}, got {card.get('format')!r}")
    for field in ("dataset", "architecture", "recipe", "command", "qrobust_version"):
        _text(card, field, card[field])
    spec = _text(card, "spec", card["spec"])
    if spec != "float":
        try:
            QuantSpec.parse(spec)
        except (ConfigError, ValueError) as e:
            raise _bad(card, "spec", f"must be a quantization spec such as 'w4a4' or 'float', got {spec!r} ({e})"
                       ) from e
    if card["norm"] not in NORMS:
        raise _bad(card, "norm", f"must be one of {NORMS}, got {card['norm']!r}")
    if isinstance(card["eps"], bool) or not isinstance(card["eps"], (int, float)) or not card["eps"] > 0:
        raise _bad(card, "eps", f"must be a positive number (a fraction of the pixel range), got {card['eps']!r}")
    n_eval = card["n_eval"]
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 1:
        raise _bad(card, "n_eval", f"must be a positive integer, got {n_eval!r}")
    _number(card, "train_time_s", card["train_time_s"], 0)
    clean = _number(card, "clean_accuracy", card["clean_accuracy"], 0, 100)
    robust = _number(card, "robust_accuracy", card["robust_accuracy"], 0, clean)
    attacks = card["attacks"]
    if not isinstance(attacks, list) or not attacks:
        raise _bad(card, "attacks", f"must be a non-empty list of attacks, got {attacks!r}")
    for i, a in enumerate(attacks):
        where = f"attacks[{i}]"
        if not isinstance(a, Mapping):
            raise _bad(card, where, f"must be an object, got {a!r}")
        for k in ("label", "attack"):
            if k not in a:
                raise _bad(card, f"{where}.{k}", "is missing")
            _text(card, f"{where}.{k}", a[k])
        if not isinstance(a.get("settings"), Mapping):
            raise _bad(card, f"{where}.settings", f"must be an object of the attack's settings, got "
                       f"{a.get('settings')!r}")
        _number(card, f"{where}.robust_accuracy", a.get("robust_accuracy"), 0, clean)
    last = float(attacks[-1]["robust_accuracy"])
    if abs(last - robust) > 1e-6:
        raise _bad(card, "robust_accuracy", f"must equal the worst case after the last attack ({last:g}), got "
                   f"{robust:g}")
    if card["checkpoint"] != f"{name}.safetensors":
        raise _bad(card, "checkpoint", f"must be {name}.safetensors, got {card['checkpoint']!r}")
    return dict(card)


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the card at ``path``."""
    p = Path(path)
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"no zoo card at {p}") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"zoo card {p} is not readable JSON ({e}); regenerate it with `qrobust zoo card`"
                              ) from e
    try:
        return check_card(card, stem=p.stem)
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from e


def cards(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every card of the zoo, checked, by name."""
    folder = zoo_dir(path)
    return [read_card(folder / f"{n}.json") for n in available(folder)]


def card_from_report(report: Mapping[str, Any], checkpoint_meta: Mapping[str, Any], *, name: str, command: str,
                     train_time_s: float | None = None) -> dict[str, Any]:
    """The card of checkpoint ``name`` from its evaluation's report (``RobustnessReport.to_dict()``, one ε)
    and the checkpoint's metadata (:func:`qrobust.checkpoint.read_metadata`); ``train_time_s`` defaults to the
    sum of the epoch times the checkpoint's training history records."""
    if not NAME_RE.fullmatch(name or ""):
        raise ConfigError(f"zoo name {name!r}: use lower case letters, digits, '.', '_' or '-' (e.g. "
                          f"mnist-small_cnn-w4a4-pgd-at)")
    results = report["results"]
    if len(results) != 1:
        raise ConfigError(f"a zoo card holds one ε; this report sweeps {[r['eps'] for r in results]}")
    res = results[0]
    meta = checkpoint_meta.get("metadata") or {}
    if train_time_s is None:
        history = meta.get("history") or []
        if not history:
            raise ConfigError("the checkpoint records no training history (not a `qrobust train` final "
                              "checkpoint?): give the training time (--train-log RUN/metrics.jsonl)")
        train_time_s = train_time_from(history)
    arch = checkpoint_meta.get("arch") or {}
    spec = checkpoint_meta.get("spec")
    objective = meta.get("objective") or {}
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "name": name,
        "dataset": report["dataset"],
        "architecture": arch.get("name") or checkpoint_meta.get("class") or report.get("model"),
        "spec": str(QuantSpec.from_dict(spec)) if spec else "float",
        "recipe": objective.get("name") or "ce",
        "recipe_settings": {k: v for k, v in objective.items() if k != "name"},
        "command": command,
        "train_time_s": round(float(train_time_s), 1),
        "clean_accuracy": _pct(report["clean_acc"]),
        "robust_accuracy": _pct(res["robust_accuracy"]),
        "attacks": [{"label": a["label"], "attack": a["attack"], "settings": a["settings"],
                     "gradients": a.get("gradients"),
                     "robust_accuracy": _pct(a["robust_accuracy_after"]),
                     "own_robust_accuracy": None if a.get("robust_accuracy") is None else _pct(a["robust_accuracy"]),
                     "n_attacked": a["n_attacked"], "time_s": round(float(a["time_s"]), 1)}
                    for a in res["attacks"]],
        "norm": report["threat_model"],
        "eps": res["eps"],
        "n_eval": report["n_examples"],
        "suite": report["suite"],
        "seed": report.get("seed"),
        "gradients": report.get("gradients"),
        "batch_size": report.get("batch_size"),  # the attacks' random draws are per batch: it is part of the run
        "flags": list(report.get("flags", [])),
        "eval_time_s": round(float(report.get("wall_time_s", 0.0)), 1),
        "checkpoint": f"{name}.safetensors",
        "qrobust_version": __version__,
    }
    return check_card(card)


def train_time_from(history: Sequence[Mapping[str, Any]]) -> float:
    """Training wall time: the epoch times of a run's history (``metrics.jsonl`` records) added up."""
    times = [r.get("epoch_time_s") for r in history]
    if not times or any(not isinstance(t, (int, float)) for t in times):
        raise ConfigError("the training log does not record epoch_time_s for every epoch; give a "
                          "metrics.jsonl written by qrobust train")
    return float(sum(times))


def _pct(v: float) -> float:
    return round(100 * float(v), 2)


def write_card(card: Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """Write the checked ``card`` as ``folder/NAME.json``."""
    checked = check_card(card)
    return atomic_write_text(Path(folder) / f"{checked['name']}.json", json.dumps(checked, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- table
def _eps_text(eps: float, norm: str) -> str:
    k = eps * 255
    if norm == "Linf" and k >= 1 and abs(k - round(k)) < 1e-6 and round(k) not in (0, 255):
        return f"{int(round(k))}/255"
    return f"{eps:g}"


def markdown_table(entries: Sequence[Mapping[str, Any]]) -> str:
    """The README's zoo table: one row per card (sorted by dataset, then robust accuracy, best first)."""
    head = ("| name | dataset | architecture | spec | recipe | clean % | robust % (worst case) | attacks | "
            "threat | n_eval | train time | evaluation flags |")
    rule = "|" + "---|" * (head.count("|") - 1)
    rows = [head, rule]
    for c in sorted(entries, key=lambda c: (c["dataset"], -c["robust_accuracy"], c["name"])):
        attacks = ", ".join(a["label"] for a in c["attacks"])
        minutes = c["train_time_s"] / 60
        rows.append(f"| `zoo:{c['name']}` | {c['dataset']} | {c['architecture']} | {c['spec']} | {c['recipe']} | "
                    f"{c['clean_accuracy']:.2f} | {c['robust_accuracy']:.2f} | {attacks} | "
                    f"{c['norm']} ε = {_eps_text(c['eps'], c['norm'])} | {c['n_eval']} | {minutes:.1f} min | "
                    f"{', '.join(c.get('flags') or []) or 'none'} |")
    return "\n".join(rows) + "\n"
