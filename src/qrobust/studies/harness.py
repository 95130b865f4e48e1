"""The study harness: what every study shares, so that a study file holds only its own science.

A study (``qrobust study NAME``) is the flow data → model → quantize → fit → evaluate run over a grid, its
claims judged from the numbers, and one report folder. The study declares its grid, its runs and its claims;
this module owns the rest:

* **the grid** — every combination of named axes (:func:`grid`);
* **settings** — per-dataset defaults (:func:`dataset_defaults`, :data:`DEFAULT_MODEL`), attack/timing
  budgets (:func:`resolve_budget`: the study's dataclass, its ``quick`` variant, user overrides checked by
  name before anything trains), torch threads (:func:`study_threads`);
* **resumption** — every training run of a study lives in ``out/runs/TAG`` and is resumed from there with
  ``resume=True`` (:meth:`StudyContext.fit`);
* **parents from checkpoints** — an expensive float parent trained once and shared by several studies:
  :meth:`StudyContext.parent` trains it, or loads the checkpoint given (:func:`load_parent`: float, same
  dataset, an architecture that fits it — else one line naming the problem) and records where it came from;
* **timing** — interleaved short runs of several recipes (:func:`interleaved_epoch_times`,
  :func:`timing_ratios`) and the median epoch of a training history (:func:`median_epoch_time`);
* **statistics and verdicts** — the exact McNemar test on paired per-sample robust masks
  (:func:`paired_test`, :func:`significant`) and the claim verdict over bit-widths (:func:`verdict`);
* **outputs** — ``results.json`` (atomically), the study's figures (matplotlib's object-oriented API via
  :func:`qrobust.report.new_figure` / :func:`~qrobust.report.save_figure`: no pyplot) and ``report.md``,
  re-renderable from the JSON alone (:func:`render_results`, ``qrobust study render DIR``);
* **the registry** — :func:`register_study`, :func:`get_study`, :func:`available_studies`; the CLI builds
  ``qrobust study NAME`` and its ``--help`` from each study's :attr:`Study.options`.

Declaring a study (one file: ``studies/transfer.py``, listed in :data:`BUILTIN_STUDIES`)::

    from qrobust.studies.harness import (TRAINING_OPTIONS, Option, Study, StudyContext, grid, new_figure,
                                         paired_test, paired_text, register_study, significant, verdict)

    @dataclasses.dataclass
    class Budget:                                         # attack/timing budgets, overridable by name
        pgd_steps: int = 20

    @register_study
    class Transfer(Study):
        name = "transfer"                                 # qrobust study transfer
        summary = "do adversarial examples transfer across bit-widths?"
        format = "qrobust-transfer-study/1"               # bump when the results layout changes
        budget, quick_budget = Budget(), Budget(pgd_steps=5)
        options = (*TRAINING_OPTIONS, Option("--bits", "int_list", "bit-widths, e.g. 2,4,8"))

        def run(self, ctx: StudyContext, *, dataset, data_dir=None, bits=(2, 4, 8), model=None, epochs=None,
                n_train=None, n_eval=None, bf16=False) -> dict:
            masks = {}
            for job in grid({"bits": bits, "source": bits}):      # the grid
                net = ctx.fit(f"w{job['bits']}", ..., objective="ce", config=cfg).model   # resumable runs
                masks[job["bits"], job["source"]] = ...           # per-sample robust mask (ctx.budget.pgd_steps)
            t = paired_test(masks[4, 2], masks[2, 2])             # {"only_a", "only_b", "z", "p"}
            points = [(t["only_a"] > t["only_b"], significant(t))]
            return {"format": self.format, "settings": {"dataset": dataset, "bits": list(bits)},
                    "claims": {"1": {"comparison": t, "verdict": verdict(points)}}}   # the claims

        def render(self, results) -> str:                 # report.md from the JSON alone
            c = results["claims"]["1"]
            return f"# Transfer study\n\n1. **{c['verdict']}** ({paired_text(c['comparison'])})\n"

        def figures(self, results) -> dict:               # optional: file name → Figure
            fig = new_figure((5, 4))
            ...
            return {"transfer.png": fig}

    results = run_study("transfer", dataset="digits", quick=True, out="runs/transfer")

The harness passes :meth:`Study.run` the study's own keywords plus ``dataset`` and ``data_dir``; the common
settings (``out``, ``quick``, ``budget``, ``resume``, ``seed``, ``threads``) reach it through the
:class:`StudyContext`. It adds ``wall_time_s`` to the returned dict and writes ``results.json``, the
figures and ``report.md`` into ``out``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from scipy.stats import binomtest
from torch import nn

from qrobust import checkpoint
from qrobust.errors import CheckpointError, ConfigError, InputError
from qrobust.quant import is_quantized
from qrobust.report import new_figure, save_figure
from qrobust.training import fit
from qrobust.utils import atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "ALPHA", "COMMON_OPTIONS", "DEFAULT_MODEL", "SMALL_IMAGE_DATASETS", "TRAINING_OPTIONS", "Option", "Study",
    "StudyContext", "available_studies", "dataset_defaults", "eps_key", "get_study", "grid",
    "interleaved_epoch_times", "load_parent", "load_results", "md_table", "median_epoch_time", "new_figure", "num",
    "override_budget", "paired_test", "paired_text", "pct", "register_study", "render_results", "resolve_budget",
    "run_study", "save_figure", "significant", "study_of", "study_threads", "timing_ratios", "verdict",
    "write_outputs",
]

T = TypeVar("T")

#: the architecture a dataset's runs use unless told otherwise (the CLI's ``--model`` default too)
DEFAULT_MODEL = {
    "digits": "digits_cnn",
    "mnist": "small_cnn",
    "fashion-mnist": "small_cnn",
    "cifar10": "resnet20",
    "svhn": "resnet20",
    "imagefolder": "resnet20",
}

#: datasets whose small images leave torch's intra-op parallelism little to split: studies on them run on one
#: thread ("auto"), which on a shared two-core machine was 3–6× faster than two
SMALL_IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist")

#: significance level of the paired comparisons
ALPHA = 0.05

#: the studies shipped with qrobust (imported on the first registry lookup; each registers itself)
BUILTIN_STUDIES = ("qrobust.studies.dq", "qrobust.studies.odgq", "qrobust.studies.threats",
                   "qrobust.studies.layerwise")

#: names the ``qrobust study`` command keeps for itself
RESERVED_NAMES = ("render",)


# ============================================================================================ settings
def dataset_defaults(table: Mapping[str, Mapping[str, Any]], dataset: str, fallback: Mapping[str, Any]
                     ) -> dict[str, Any]:
    """A study's defaults for ``dataset``: its row of ``table`` over ``fallback`` (for what the row leaves
    out, and for datasets without a row); ``model`` is the row's, else :data:`DEFAULT_MODEL`'s, else the
    fallback's (else ``resnet20``)."""
    own = table.get(dataset, {})
    row = {**fallback, **own}
    if "model" not in own and dataset in DEFAULT_MODEL:
        row["model"] = DEFAULT_MODEL[dataset]
    row.setdefault("model", "resnet20")
    return row


@contextmanager
def study_threads(threads: int | str | None, dataset: str) -> Iterator[int]:
    """Run a study with torch's intra-op threads set (restored afterwards); yields the count in force.

    ``"auto"`` means 1 thread on :data:`SMALL_IMAGE_DATASETS` and the current setting elsewhere; None keeps
    the current setting.
    """
    if threads == "auto":
        threads = 1 if dataset in SMALL_IMAGE_DATASETS else None
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, 'auto' or None, got {threads!r}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def override_budget(base: T, overrides: Mapping[str, Any] | None) -> T:
    """``base`` (a study's attack/timing budget dataclass) with the fields in ``overrides`` replaced.

    Unknown names and values of the wrong kind raise :class:`~qrobust.errors.ConfigError` naming them, so
    that ``--budget '{"square_querie": 300}'`` fails before hours of training rather than being ignored.
    """
    if not overrides:
        return base
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"budget must be a mapping of field names to values, got {type(overrides).__name__}")
    fields = {f.name: f for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown budget fields {unknown}; known: {sorted(fields)}")
    for k, v in overrides.items():
        current = getattr(base, k)
        if v is None and fields[k].default is None:  # a field whose default "None" means "no limit"
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"budget field {k} must be a positive integer, got {v!r} (default {current!r})")
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]


def resolve_budget(study: Study, *, quick: bool, overrides: Mapping[str, Any] | None) -> Any:
    """The study's budget (its ``quick_budget`` with ``quick``) with ``overrides`` applied and checked."""
    base = study.quick_budget if quick and study.quick_budget is not None else study.budget
    if base is None:
        if overrides:
            raise ConfigError(f"the {study.name} study has no budget to override; drop --budget")
        return None
    return override_budget(base, overrides)


def grid(axes: Mapping[str, Sequence[Any]], *, where: Callable[[dict[str, Any]], bool] | None = None
         ) -> list[dict[str, Any]]:
    """A study's grid: every combination of ``axes`` (name → values; the first axis varies slowest), as
    dicts, keeping those ``where`` accepts. ``grid({"bits": [4, 1], "recipe": ["ce", "odgq"]})`` →
    ``[{"bits": 4, "recipe": "ce"}, {"bits": 4, "recipe": "odgq"}, {"bits": 1, ...}, ...]``."""
    names = list(axes)
    jobs = [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]
    return [j for j in jobs if where is None or where(j)]


def eps_key(eps: float) -> str:
    """The key of an ε in a study's per-ε dicts (``repr`` of the float, as every study JSON has it)."""
    return repr(float(eps))


# ============================================================================================ statistics
def paired_test(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Exact McNemar test of "a is robust more often than b" on paired boolean masks (same samples).

    Returns ``only_a`` and ``only_b`` (the discordant counts: samples robust under one model only), ``p``
    (two-sided binomial test of ``only_a`` successes in ``only_a + only_b`` trials at ½) and the signed
    ``z = (only_a − only_b)/√(only_a + only_b)`` of the normal approximation, kept for continuity with
    earlier reports (0 when no pair is discordant).
    """
    a, b = a.bool(), b.bool()
    if a.shape != b.shape:
        raise InputError(f"paired masks must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "z": 0.0, "p": 1.0}
    p = float(binomtest(only_a, n, 0.5, alternative="two-sided").pvalue)
    return {"only_a": only_a, "only_b": only_b, "z": (only_a - only_b) / math.sqrt(n), "p": min(p, 1.0)}


def significant(test: Mapping[str, Any], *, alpha: float = ALPHA) -> bool:
    """Whether a :func:`paired_test` result is significant in its claimed direction (a robust more often)."""
    return test["only_a"] > test["only_b"] and test["p"] < alpha


def verdict(points: Sequence[tuple[bool, bool]]) -> str:
    """A claim's verdict from ``points``: (holds in the claimed direction, significantly) per bit-width.

    *reproduced* when it holds everywhere and significantly somewhere; *partly reproduced* when it holds
    somewhere; *not reproduced* otherwise; *not measured* without points.
    """
    if not points:
        return "not measured"
    k = sum(h for h, _ in points)
    s = sum(h and sig for h, sig in points)
    if k == len(points) and s >= 1:
        return "reproduced"
    if k >= 1:
        return f"partly reproduced ({k}/{len(points)} in the claimed direction, {s} significant)"
    return "not reproduced"


def paired_text(c: Mapping[str, Any], *, signed: bool = False) -> str:
    """``z = 1.23`` — and ``, p = 0.045`` where the comparison has an exact p (results before the exact
    test carry z only and keep rendering as they did)."""
    z = f"z = {c['z']:+.2f}" if signed else f"z = {c['z']:.2f}"
    return z if c.get("p") is None else f"{z}, p = {c['p']:.2g}"


# ============================================================================================ timing
def median_epoch_time(history: Sequence[Mapping[str, Any]], *, skip_first: bool = False) -> float | None:
    """Median epoch time of a training history; ``skip_first`` drops the warm-up epoch when more than two."""
    times = [h["epoch_time_s"] for h in history]
    if not times:
        return None
    return statistics.median(times[1:] if skip_first and len(times) > 2 else times)


def interleaved_epoch_times(runs: Mapping[str, Callable[[], Sequence[Mapping[str, Any]]]], *, repeats: int
                            ) -> dict[str, list[float]]:
    """Time several recipes by back-to-back short runs, ``repeats`` rounds.

    ``runs`` maps a name to a callable that trains once and returns the history; a sample is the mean epoch
    time of one call. The order rotates each round (with two recipes: alternates), so slow drifts in
    machine load touch every recipe alike.
    """
    order = list(runs)
    times: dict[str, list[float]] = {r: [] for r in order}
    for rnd in range(repeats):
        k = rnd % len(order)
        for r in order[k:] + order[:k]:
            times[r].append(statistics.fmean(e["epoch_time_s"] for e in runs[r]()))
    return times


def timing_ratios(times: Mapping[str, Sequence[float]], reference: str) -> dict[str, dict[str, float]]:
    """Per recipe, its epoch time over ``reference``'s: ``median`` of the per-round ratios (the verdict:
    robust to drifts), ``of_medians`` and ``of_minima`` (the least load-disturbed estimate)."""
    ref = times[reference]
    return {r: {"median": statistics.median(a / b for a, b in zip(t, ref)),
                "of_medians": statistics.median(t) / statistics.median(ref),
                "of_minima": min(t) / min(ref)} for r, t in times.items()}


# ============================================================================================ formatting
def pct(v: float | None, *, missing: str = "—") -> str:
    """A fraction as a percentage with one decimal (``missing`` for None)."""
    return missing if v is None else f"{100 * v:.1f}"


def num(v: float | None, *, missing: str = "—") -> str:
    """A number to three significant digits (``missing`` for None)."""
    return missing if v is None else f"{v:.3g}"


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines (``|`` in a cell escaped, newlines flattened)."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


# ============================================================================================ studies
@dataclasses.dataclass(frozen=True)
class Option:
    """A study's command-line option: ``qrobust study NAME --flag VALUE`` → ``run(..., keyword=value)``.

    ``type`` names how the CLI parses the text: ``str``, ``int``, ``float``, ``flag`` (no value; True when
    given), ``int_list`` / ``float_list`` / ``str_list`` (comma-separated), ``eps255`` / ``eps255_list``
    (L∞ ε on the 0–255 scale, given to the study as fractions), ``json`` (an object). An option left out
    is not passed, so the study's own default applies.
    """

    flag: str
    type: str = "str"
    help: str = ""
    default: Any = None
    choices: tuple[str, ...] | None = None
    keyword: str | None = None

    TYPES: ClassVar[tuple[str, ...]] = ("str", "int", "float", "flag", "int_list", "float_list", "str_list",
                                        "eps255", "eps255_list", "json")

    def __post_init__(self) -> None:
        if not self.flag.startswith("--"):
            raise ConfigError(f"a study option's flag starts with '--', got {self.flag!r}")
        if self.type not in self.TYPES:
            raise ConfigError(f"option {self.flag}: type must be one of {self.TYPES}, got {self.type!r}")

    @property
    def dest(self) -> str:
        """The keyword of the study's ``run`` this option sets."""
        return self.keyword or self.flag[2:].replace("-", "_")


#: options every study takes: the harness's settings (:func:`run_study`) and the dataset
COMMON_OPTIONS = (
    Option("--dataset", "str", "dataset name (default: %(default)s)", default="digits"),
    Option("--data-dir", "str", "where the dataset lives"),
    Option("--budget", "json",
           'attack/timing budgets as JSON, e.g. \'{"square_queries": 300, "timing_batches": 40}\''),
    Option("--quick", "flag", "a small budget (seconds to a minute)"),
    Option("--resume", "flag", "reuse finished runs in --out"),
    Option("--seed", "int", "random seed (default: %(default)s)", default=0),
    Option("--out", "str", "report folder (default: runs/STUDY-DATASET)"),
)

#: the usual training options, for a study whose ``run`` takes ``model``, ``epochs``, ``n_train``,
#: ``n_eval`` and ``bf16`` (list them first in its :attr:`Study.options`)
TRAINING_OPTIONS = (
    Option("--model", "str", "architecture (default: per dataset)"),
    Option("--epochs", "int", "training epochs of every compared model (default: per dataset)"),
    Option("--n-train", "int", "train on a random subset of this size"),
    Option("--n-eval", "int", "test images evaluated"),
    Option("--bf16", "flag", "train under bfloat16 autocast"),
)


def check_parent_path(flag: str, path: str | Path | None) -> None:
    """Fail before any work when a study's parent checkpoint (``flag`` = its CLI option) cannot be found: a
    checkpoint file, a run folder or a zoo name ``"zoo:NAME"``, as :func:`qrobust.checkpoint.load` takes."""
    if path is None:
        return
    try:
        checkpoint.resolve_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"{flag} {path}: {e} (give a checkpoint file, a run folder or zoo:NAME)") from None


def load_parent(path: str | Path, *, dataset: str, info: Any, model: str | None = None, flag: str = "--parent",
                objective: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A study's float parent from the checkpoint ``path`` → ``(model in eval mode, its provenance)``.

    The checkpoint must hold a float model (not quantized) for ``dataset`` — the dataset its metadata names,
    where it names one, and an input shape and class count that fit ``info`` (:func:`qrobust.checkpoint.
    check_fits`) — and, where ``model`` (the study's ``--model``) is given, that architecture; anything else is
    one :class:`~qrobust.errors.InputError` line naming ``flag`` and the fix. ``objective`` is the training
    objective the study expects of this parent (``"ce"`` for a natural one; another name for an adversarial
    one): a checkpoint recording a different one is used, with a visible warning. The provenance (path,
    architecture, and the fit settings and objective the checkpoint records) goes into the study's results.
    """
    net = checkpoint.load(path)
    meta = getattr(net, "qrobust_meta", {}) or {}
    md = meta.get("metadata") or {}
    if is_quantized(net) or meta.get("spec"):
        raise InputError(f"{flag} {path} is a quantized checkpoint: give the float parent it was fine-tuned from")
    if md.get("dataset") and md["dataset"] != dataset:
        raise InputError(f"{flag} {path} was trained on {md['dataset']}, not {dataset}: give a {dataset} checkpoint "
                         f"or run the study with --dataset {md['dataset']}")
    checkpoint.check_fits(net, info, f"{flag} {path}")
    arch = (getattr(net, "qrobust_arch", None) or {}).get("name")
    if model is not None and arch is not None and arch != model:
        raise InputError(f"{flag} {path} is a {arch}, not the --model {model} asked for: drop --model or give a "
                         f"{model} checkpoint")
    recorded = (md.get("objective") or {}).get("name")
    if objective is not None and recorded is not None and (recorded == "ce") != (objective == "ce"):
        log.warning("%s %s was trained with objective %r, not the %r this parent stands for: its numbers will be "
                    "reported as that parent's all the same", flag, path, recorded, objective)
    source = {"checkpoint": str(path), "model": arch, "fit": md.get("fit"), "objective": md.get("objective")}
    return net.eval(), source


@dataclasses.dataclass
class StudyContext:
    """What the harness hands a study's :meth:`Study.run`: where to write, whether to resume, the seed,
    the resolved budget and the thread count in force."""

    study: str
    out: Path
    quick: bool
    budget: Any
    resume: bool
    seed: int
    threads: int
    t_start: float = dataclasses.field(default_factory=time.perf_counter)

    def run_dir(self, tag: str | Path) -> Path:
        """The folder of one training run: ``out/runs/TAG``."""
        return self.out / "runs" / tag

    def fit(self, tag: str | Path, model: nn.Module, train: Any, *, objective: Any, config: Any,
            callbacks: list[Any] | None = None, metadata: dict[str, Any] | None = None) -> Any:
        """Train ``model`` in :meth:`run_dir` ``(tag)`` — resumed there when the study runs with ``resume`` —
        and return :func:`qrobust.training.fit`'s result with the model in eval mode."""
        res = fit(model, train, objective=objective, config=config, out=self.run_dir(tag), resume=self.resume,
                  callbacks=callbacks, metadata=metadata)
        res.model.eval()
        return res

    def parent(self, tag: str, checkpoint_path: str | Path | None, build: Callable[[], nn.Module], train: Any, *,
               objective: Any, config: Any, dataset: str, model: str | None = None, flag: str = "--parent",
               metadata: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """A float parent: loaded from ``checkpoint_path`` (:func:`load_parent`, checked against ``dataset``
        and ``model``), else ``build()`` trained by :meth:`fit` under ``tag`` → ``(model, provenance)``; the
        provenance says which (``{"checkpoint": …}`` or ``{"trained": "runs/TAG"}``)."""
        if checkpoint_path is not None:
            obj_name = objective if isinstance(objective, str) else getattr(objective, "name", None)
            net, source = load_parent(checkpoint_path, dataset=dataset, info=train.info, model=model, flag=flag,
                                      objective=obj_name)
            log.info("%s: the float parent from %s (not trained here)", tag, checkpoint_path)
            return net, source
        net = self.fit(tag, build(), train, objective=objective, config=config, metadata=metadata).model
        return net, {"trained": f"runs/{tag}"}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


class Study:
    """Base of a study: subclass it, set the class attributes, write :meth:`run` and :meth:`render`.

    ``name`` is the CLI name (``qrobust study NAME``), ``summary`` its one-line help, ``format`` the
    version tag its results carry, ``options`` its own CLI options beyond :data:`COMMON_OPTIONS` (e.g.
    ``(*TRAINING_OPTIONS, Option("--bits", "int_list", "bit-widths"))``),
    ``budget``/``quick_budget`` its attack/timing budget dataclass (overridable by name with ``budget=``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    format: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    budget: ClassVar[Any] = None
    quick_budget: ClassVar[Any] = None
    default_dataset: ClassVar[str] = "digits"

    def run(self, ctx: StudyContext, *, dataset: str, data_dir: str | Path | None = None, **settings: Any
            ) -> dict[str, Any]:
        """The science: train the grid, measure, judge the claims; return the results dict (plain data)."""
        raise NotImplementedError

    def render(self, results: Mapping[str, Any]) -> str:
        """``report.md`` from the results dict alone."""
        raise NotImplementedError

    def figures(self, results: Mapping[str, Any]) -> dict[str, Any]:
        """File name → matplotlib Figure (from :func:`new_figure`) rendered from the results; none by default."""
        return {}

    def accepts(self, results: Mapping[str, Any]) -> bool:
        """Whether ``results`` were written by this study (by their ``format`` or ``study`` tag)."""
        fmt = str(results.get("format", ""))
        return results.get("study") == self.name or (bool(fmt) and fmt.split("/")[0] == self.format.split("/")[0])

    def cli_options(self) -> tuple[Option, ...]:
        """Every option of ``qrobust study NAME``: the common ones, then the study's own."""
        own = {o.flag for o in self.options}
        return tuple(o for o in COMMON_OPTIONS if o.flag not in own) + tuple(self.options)


_REGISTRY: dict[str, Study] = {}
_builtins_loaded = False


def register_study(cls: type[Study]) -> type[Study]:
    """Class decorator: make ``cls`` (a :class:`Study`) known as ``qrobust study cls.name``."""
    study = cls()
    if not study.name or study.name in RESERVED_NAMES:
        raise ConfigError(f"a study needs a name other than {RESERVED_NAMES}, got {study.name!r}")
    if study.name in _REGISTRY and type(_REGISTRY[study.name]) is not cls:
        raise ConfigError(f"a study named {study.name!r} is already registered ({type(_REGISTRY[study.name])})")
    _REGISTRY[study.name] = study
    return cls


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for mod in BUILTIN_STUDIES:
            importlib.import_module(mod)


def available_studies() -> list[str]:
    """The names of the registered studies (the built-in ones first)."""
    _load_builtins()
    return list(_REGISTRY)


def get_study(name: str | Study) -> Study:
    """The registered study ``name`` (a :class:`Study` passes through)."""
    if isinstance(name, Study):
        return name
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown study {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def run_study(study: str | Study, *, dataset: str | None = None, out: str | Path | None = None,
              quick: bool = False, budget: Mapping[str, Any] | None = None, resume: bool = False, seed: int = 0,
              threads: int | str | None = "auto", **settings: Any) -> dict[str, Any]:
    """Run ``study`` and write its report folder ``out`` (default ``runs/NAME-study``); returns the results.

    The harness resolves the budget (errors before anything trains), sets torch's threads for the run
    (:func:`study_threads`, restored afterwards), calls :meth:`Study.run` with ``dataset`` and
    ``settings``, adds ``wall_time_s`` and writes ``results.json``, the study's figures and ``report.md``.
    ``resume`` continues the training runs under ``out/runs``.
    """
    st = get_study(study)
    dataset = dataset or st.default_dataset
    _check_settings(st, settings)
    budget_v = resolve_budget(st, quick=quick, overrides=budget)
    out_p = Path(out if out is not None else f"runs/{st.name}-study")
    with study_threads(threads, dataset) as n_threads:
        ctx = StudyContext(study=st.name, out=out_p, quick=quick, budget=budget_v, resume=resume, seed=seed,
                           threads=n_threads)
        out_p.mkdir(parents=True, exist_ok=True)
        results = st.run(ctx, dataset=dataset, **settings)
        results["wall_time_s"] = ctx.elapsed()
        write_outputs(st, results, out_p)
        log.info("%s study written to %s (%.0f s)", st.name, out_p, results["wall_time_s"])
        return results


def _check_settings(study: Study, settings: Mapping[str, Any]) -> None:
    """Unknown keywords of a study fail before anything trains, naming the ones it takes."""
    params = inspect.signature(study.run).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "dataset"]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"the {study.name} study has no setting {unknown}; it takes {sorted(known)} and the "
                          "harness's out, quick, budget, resume, seed, threads")


def write_outputs(study: str | Study, results: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``results.json``, the study's figures and ``report.md`` into ``out`` (created)."""
    st = get_study(study)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=_json_default))}
    for fname, fig in st.figures(results).items():
        paths[fname] = save_figure(fig, out / fname)
    paths["markdown"] = atomic_write_text(out / "report.md", st.render(results))
    return paths


# ============================================================================================ re-rendering
def load_results(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A study's results: a dict as is, a ``results.json`` / ``NAME.json`` file, or a report folder."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise InputError(f"no study results at {path}: give a report folder or its results.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON ({e}); give a study's results.json") from e


def study_of(results: Mapping[str, Any]) -> Study:
    """The registered study that wrote ``results``."""
    for name in available_studies():
        if _REGISTRY[name].accepts(results):
            return _REGISTRY[name]
    raise InputError(f"these results name no known study (format {results.get('format')!r}, study "
                     f"{results.get('study')!r}); known: {available_studies()}")


def render_results(source: str | Path | Mapping[str, Any]) -> str:
    """``report.md`` of a study re-rendered from its results (dict, JSON file or report folder) alone."""
    results = load_results(source)
    return study_of(results).render(results)
