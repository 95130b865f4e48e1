"""``qrobust study odgq``: affordable robust quantization — natural QAT, FGSM-RS, PGD-AT, TRADES and ODG-Q
compared at each bit-width on robustness *and* training cost, in one run.

**The flow.** At every bit-width (``bits``: 4 → ``w4a4``; 1 → a binary network, see :data:`BINARY_SPEC`)
each recipe trains the same architecture from the same initialisation with the same data order, epochs and
optimiser (each recipe's own recommended schedule: the cyclic ``onecycle`` one for FGSM-RS). Two float
models are trained once as black-box sources: one with PGD-AT, one naturally.

**Per model** (on the first ``n_eval`` test samples, L∞ at the bit-width's ε — one for all by default; on
digits binary networks are attacked and trained at ε = 0.1, w4a4 ones at 0.2, since at 0.2 no recipe leaves
a binary digits network any robustness; the float PGD-AT source is trained at the first bit-width's ε):

* clean accuracy;
* five white-box attacks with straight-through gradients through every quantizer — FGSM, PGD-k (α = ε/4,
  random start), CW-L∞ (PGD on the margin), APGD-CE, APGD-DLR;
* five black-box attacks — transfer of PGD-k examples crafted on the float PGD-trained model; transfer from
  another precision (the same recipe's model at the next bit-width of the study); transfer of MI-FGSM
  examples crafted on the naturally trained float model; Square (score-based); SPSA (gradient-free);
* each attack's own robust accuracy, and the per-sample worst case over all ten;
* the **standard suite** of :func:`qrobust.evaluation.evaluate` (APGD-CE and APGD-T with straight-through
  gradients, then the gradient-free Square) with its gradient-masking diagnostics: its per-sample worst case
  is the headline robust accuracy the claims are judged on (``worst_all`` also folds in the ten attacks);
* for the single-step recipes (FGSM-RS, ODG-Q), the epochs where
  :class:`~qrobust.defenses.guards.OverfitGuard` saw catastrophic overfitting (PGD accuracy on held-out
  samples collapsing while FGSM accuracy stays high; warn only, it never changes training);
* training time per epoch relative to natural QAT at the same bit-width, measured in the same run twice:
  the median epoch time of the actual training runs, and — the verdict, robust to drifts in machine load —
  the median over ``timing_repeats`` rounds of back-to-back short runs of every recipe on copies of one
  model (the order rotates each round) of the per-round ratio to natural training.

**Claims** (per bit-width): ODG-Q's epoch time ≤ 1.5× natural; its standard-suite worst-case robust
accuracy ≥ FGSM-RS's and within 3 points of PGD-AT's. Each comparison also carries the exact McNemar
test on the same samples (:func:`~qrobust.studies.harness.paired_test`: p, the discordant counts and z).

The shared parts — budgets, resumption, timing, statistics, figures and the report folder — are
:mod:`qrobust.studies.harness`'s; this file is the study's science.

Outputs in ``out``: ``report.md``, ``results.json``, ``robustness_vs_cost.png``, ``attacks.png`` and the run
folders (checkpoints, ``metrics.jsonl``) under ``runs/``.
"""


from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust import checkpoint
from qrobust._version import __version__
from qrobust.data import load_dataset
from qrobust.defenses import make_objective
from qrobust.defenses.guards import OverfitGuard
from qrobust.errors import ConfigError
from qrobust.evaluation import evaluate
from qrobust.models import build_model
from qrobust.quant import is_quantized, quantize
from qrobust.quant.spec import BINARY_SPEC, spec_for_bits
from qrobust.studies.harness import (
    TRAINING_OPTIONS,
    Option,
    Study,
    StudyContext,
    dataset_defaults,
    interleaved_epoch_times,
    md_table,
    median_epoch_time,
    new_figure,
    paired_test,
    paired_text,
    pct,
    register_study,
    run_study,
    timing_ratios,
)
from qrobust.training import FitConfig, fit
from qrobust.validation import check_eps

log = logging.getLogger(__name__)

__all__ = ["BINARY_SPEC", "DATASET_DEFAULTS", "RECIPES", "RobustQAT", "run_odgq_study", "spec_for_bits"]

RECIPES = ("ce", "fgsm-rs", "pgd-at", "trades", "odgq")
RECIPE_NAMES = {"ce": "natural QAT", "fgsm-rs": "FGSM-RS", "pgd-at": "PGD-AT", "trades": "TRADES", "odgq": "ODG-Q"}
#: 1-bit weights (sign × per-channel mean |w|) and sign activations with BinaryNet's clipped STE; first and
#: last layer at 8 bits, the usual BNN practice (XNOR-Net, BinaryNet)
COST_LIMIT = 1.5
NEAR_PGD = 0.03
#: results format (absent before: z only); 2 records the exact McNemar test (p, discordant counts) next to z
FORMAT = "qrobust-odgq-study/2"

#: per-dataset defaults (each can be overridden by the matching keyword of :func:`run_odgq_study`; the
#: architecture is :data:`qrobust.studies.harness.DEFAULT_MODEL`'s)
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"eps": 0.2, "binary_eps": 0.1, "epochs": 20, "batch_size": 64, "lr": 0.05, "n_eval": 359},
    # MNIST's customary ε = 0.3 is out of reach of a few-epoch budget: PGD-AT (7 steps, SGD lr 0.05 or 0.01)
    # stays at chance (loss 2.31 after 120 batches) where ε = 0.2 is already at 50 % train accuracy
    "mnist": {"eps": 0.2, "binary_eps": 0.1, "epochs": 10, "batch_size": 128, "lr": 0.05, "n_eval": 1000},
    "fashion-mnist": {"eps": 0.1, "epochs": 10, "batch_size": 128, "lr": 0.05, "n_eval": 1000},
    "cifar10": {"eps": 8 / 255, "epochs": 30, "batch_size": 128, "lr": 0.1, "n_eval": 1000},
    "svhn": {"eps": 8 / 255, "epochs": 15, "batch_size": 128, "lr": 0.05, "n_eval": 1000},
}
_FALLBACK = {"model": "resnet20", "eps": 8 / 255, "epochs": 10, "batch_size": 128, "lr": 0.05, "n_eval": 500}


@dataclasses.dataclass
class _Budget:
    pgd_steps: int = 20
    cw_steps: int = 30
    apgd_iter: int = 100
    mi_steps: int = 10
    square_queries: int = 1000
    spsa_steps: int = 50
    spsa_samples: int = 64
    at_steps: int = 10
    diagnostic_n: int = 128
    diagnostic_steps: int = 20
    timing_repeats: int = 7
    timing_epochs: int = 3
    timing_batches: int | None = None
    guard_steps: int = 10


_QUICK = _Budget(pgd_steps=10, cw_steps=10, apgd_iter=25, mi_steps=5, square_queries=200, spsa_steps=10,
                 spsa_samples=32, at_steps=5, diagnostic_n=64, diagnostic_steps=10, timing_repeats=3,
                 timing_epochs=1)


# ============================================================================================ pieces
def _build(name: str, info: Any, spec: str, seed: int, init: nn.Module | None = None) -> nn.Module:
    """A fresh ``name`` model (seeded), or a copy of the float ``init`` model, quantized to ``spec``."""
    torch.manual_seed(seed)
    if init is not None:
        m = copy.deepcopy(init)
    else:
        c, h, _ = info.input_shape
        m = build_model(name, num_classes=info.num_classes, in_channels=c, input_size=h, activation="relu6",
                        mean=list(info.mean), std=list(info.std))
    return m if spec == "float" else quantize(m, spec)


def _objective(recipe: str, eps: float, budget: _Budget, options: Mapping[str, Mapping[str, Any]]) -> Any:
    if recipe == "ce":
        return make_objective("ce", **dict(options.get("ce", {})))
    base: dict[str, Any] = {"eps": eps}
    if recipe in ("pgd-at", "trades"):
        base["steps"] = budget.at_steps
    return make_objective(recipe, **{**base, **dict(options.get(recipe, {}))})


def _fit_config(cfg: Any, obj: Any) -> Any:
    return dataclasses.replace(cfg, **getattr(obj, "recommended_fit", {}))


def _interleaved_cost(
    name: str, info: Any, spec: str, train: Any, cfg: Any, recipes: Sequence[str], eps: float,
    budget: _Budget, options: Mapping[str, Mapping[str, Any]], seed: int, init: nn.Module | None = None,
) -> dict[str, Any]:
    """Back-to-back short runs (``timing_epochs`` epochs) of every recipe on copies of one model,
    ``timing_repeats`` rounds (the order rotates); per round the ratio of each recipe's mean epoch time to
    natural training's."""
    base = _build(name, info, spec, seed, init)

    def one_run(recipe: str) -> list[dict[str, Any]]:
        obj = _objective(recipe, eps, budget, options)
        one = dataclasses.replace(_fit_config(cfg, obj), epochs=budget.timing_epochs, max_batches=budget.timing_batches)
        return fit(copy.deepcopy(base), train, objective=obj, config=one).history

    order = ["ce", *[r for r in recipes if r != "ce"]]
    times = interleaved_epoch_times({r: (lambda r=r: one_run(r)) for r in order}, repeats=budget.timing_repeats)
    ratios = timing_ratios(times, "ce")
    out: dict[str, Any] = {"repeats": budget.timing_repeats, "epochs_per_sample": budget.timing_epochs,
                           "batches_per_epoch": budget.timing_batches, "epoch_s": times}
    out["ratio"] = {r: ratios[r]["median"] for r in order}
    out["ratio_of_minima"] = {r: ratios[r]["of_minima"] for r in order}
    return out


def _attack_suite(eps: float, b: _Budget, *, float_pgd: nn.Module, float_ce: nn.Module,
                  other: nn.Module | None, other_label: str | None) -> list[Any]:
    wb = [
        ("fgsm", {"label": "FGSM"}),
        ("pgd", {"steps": b.pgd_steps, "alpha": "eps/4", "label": f"PGD-{b.pgd_steps}"}),
        ("cwlinf", {"steps": b.cw_steps, "alpha": "eps/4", "label": "CW-Linf"}),
        ("apgd-ce", {"n_iter": b.apgd_iter, "label": "APGD-CE"}),
        ("apgd-dlr", {"n_iter": b.apgd_iter, "label": "APGD-DLR"}),
    ]
    bb = [("transfer", {"source": float_pgd, "attack": "pgd", "steps": b.pgd_steps, "alpha": "eps/4",
                        "label": "T-float-PGD-AT"})]
    if other is not None:
        bb.append(("transfer", {"source": other, "attack": "pgd", "steps": b.pgd_steps, "alpha": "eps/4",
                                "label": f"T-{other_label}"}))
    bb += [
        ("transfer", {"source": float_ce, "attack": "mifgsm", "steps": b.mi_steps, "alpha": f"eps/{b.mi_steps}",
                      "label": "T-MI-FGSM"}),
        ("square", {"n_queries": b.square_queries, "label": "Square"}),
        ("spsa", {"steps": b.spsa_steps, "nb_samples": b.spsa_samples, "label": "SPSA"}),
    ]
    suite = [(n, {**kw, "individual": True}) for n, kw in wb]
    suite += [(n, {**kw, "individual": True, "black_box": True}) for n, kw in bb]
    return suite


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, b: _Budget, seed: int,
              **sources: Any) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    wide = evaluate(model, (x, y), suite=_attack_suite(eps, b, **sources), eps=eps, seed=seed, diagnostics=False)
    std = evaluate(model, (x, y), suite="standard", eps=eps, seed=seed, n_queries=b.square_queries,
                   attack_kwargs={"apgd-ce": {"n_iter": b.apgd_iter}, "apgd-t": {"n_iter": b.apgd_iter}},
                   diagnostic_n=min(b.diagnostic_n, len(y)), diagnostic_steps=b.diagnostic_steps)
    wr, sr = wide.result(eps), std.result(eps)
    attacks = {a.label: a.robust_accuracy for a in wr.attacks}
    black = {a.label for a in wr.attacks if a.black_box}
    wb_vals = [v for k, v in attacks.items() if k not in black]
    bb_vals = [v for k, v in attacks.items() if k in black]
    worst_all = wr.robust_mask & sr.robust_mask
    res = {
        "clean": wide.clean_accuracy,
        "attacks": attacks,
        "white_box": sorted(set(attacks) - black, key=list(attacks).index),
        "black_box": sorted(black, key=list(attacks).index),
        "white_box_mean": statistics.fmean(wb_vals), "black_box_mean": statistics.fmean(bb_vals),
        "worst_ten": wr.robust_accuracy,
        "standard": sr.robust_accuracy,
        "standard_attacks": {a.label: {"n_broken": a.n_broken, "after": a.robust_accuracy_after}
                             for a in sr.attacks},
        "worst_all": float(worst_all.float().mean()),
        "flags": [f"{d.name}" + ("" if d.eps is None else f"@{d.eps:g}") for d in std.flagged],
        "eval_time_s": wide.wall_time_s + std.wall_time_s,
    }
    return res, sr.robust_mask, worst_all



# ============================================================================================ the study
@register_study
class RobustQAT(Study):
    """The ODG-Q study (module docstring) as a :class:`~qrobust.studies.harness.Study`."""

    name = "odgq"
    summary = "affordable robust quantization: natural QAT, FGSM-RS, PGD-AT, TRADES, ODG-Q on robustness and cost"
    format = FORMAT
    budget = _Budget()
    quick_budget = _QUICK
    options = (
        *TRAINING_OPTIONS,
        Option("--bits", "int_list", "bit-widths, e.g. 4,1 (1 = binary)"),
        Option("--eps", "eps255", "L∞ ε on the 0–255 scale (default per dataset and bit-width)"),
        Option("--recipes", "str_list", "subset of ce (natural),fgsm-rs,pgd-at,trades,odgq"),
        Option("--init", "str", "float checkpoint every model is fine-tuned from"),
        Option("--lr", "float", "learning rate (default per dataset)"),
    )

    def run(
        self,
        ctx: StudyContext,
        *,
        dataset: str,
        data_dir: str | Path | None = None,
        model: str | None = None,
        bits: Sequence[int] = (4, 1),
        recipes: Sequence[str] = RECIPES,
        epochs: int | None = None,
        n_eval: int | None = None,
        n_train: int | None = None,
        eps: float | Mapping[int, float] | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        recipe_options: Mapping[str, Mapping[str, Any]] | None = None,
        bf16: bool = False,
        init: str | Path | None = None,
    ) -> dict[str, Any]:
        """See :func:`run_odgq_study`."""
        quick, budget, seed = ctx.quick, ctx.budget, ctx.seed
        recipe_options = dict(recipe_options or {})
        bits_l = [int(b) for b in bits]
        if not bits_l or len(set(bits_l)) != len(bits_l):
            raise ConfigError(f"bits must be a non-empty list of distinct bit-widths, got {list(bits)}")
        specs = {b: spec_for_bits(b) for b in bits_l}
        bad = [r for r in recipes if r not in RECIPES]
        if bad:
            raise ConfigError(f"unknown recipes {bad}; choose from {RECIPES}")
        recipes_l = ["ce", *[r for r in RECIPES if r in recipes and r != "ce"]]
        d = dataset_defaults(DATASET_DEFAULTS, dataset, _FALLBACK)
        if quick:
            d.update(epochs=max(2, d["epochs"] // 3), n_eval=min(d["n_eval"], 200))
        model_name = model or d["model"]
        parent = None
        if init is not None:
            parent = checkpoint.load(init)
            if is_quantized(parent):
                raise ConfigError(f"init={init} is a quantized checkpoint; the study starts from a float model")
            model_name = parent.qrobust_arch["name"]
            if model is not None and model != model_name:
                raise ConfigError(f"init={init} is a {model_name}, but model={model!r} was asked for")
        if eps is None:
            eps_by = {b: d.get("binary_eps", d["eps"]) if b == 1 else d["eps"] for b in bits_l}
        elif isinstance(eps, Mapping):
            missing = [b for b in bits_l if b not in eps]
            if missing:
                raise ConfigError(f"eps gives no ε for bit-widths {missing}; give one per bit-width or a single value")
            eps_by = {b: eps[b] for b in bits_l}
        else:
            eps_by = {b: eps for b in bits_l}
        eps_by = {b: check_eps(e, "Linf", positive=True) for b, e in eps_by.items()}
        eps_v = eps_by[bits_l[0]]  # the float PGD-AT source is trained at the first bit-width's ε
        epochs_v = epochs or d["epochs"]
        root = None if data_dir is None else Path(data_dir)
        train = load_dataset(dataset, "train", root=root)
        test = load_dataset(dataset, "test", root=root)
        if n_train is not None:
            train = train.subset(n_train, seed=seed)
        info = test.info
        x, y = test.tensors(n_eval or d["n_eval"])
        if parent is not None:
            try:
                with torch.no_grad():
                    out_shape = parent.eval()(x[:1]).shape
            except RuntimeError as e:
                raise ConfigError(f"init={init} does not take {dataset} images {tuple(x.shape[1:])}: {e}") from e
            if out_shape[-1] != info.num_classes:
                raise ConfigError(f"init={init} predicts {out_shape[-1]} classes, {dataset} has {info.num_classes}")
        cfg = FitConfig(epochs=epochs_v, batch_size=batch_size or d["batch_size"], lr=lr or d["lr"], seed=seed,
                        bf16=bf16)

        def train_one(tag: str, recipe: str, spec: str, eps_t: float) -> tuple[nn.Module, dict[str, Any]]:
            obj = _objective(recipe, eps_t, budget, recipe_options)
            net = _build(model_name, info, spec, seed, parent)
            cbs = [obj.callback] if hasattr(obj, "callback") else []
            guard = None
            if recipe in ("fgsm-rs", "odgq"):  # single-step recipes: watch for catastrophic overfitting (warn only)
                guard = OverfitGuard((x, y), eps=eps_t, n=min(256, len(y)), steps=budget.guard_steps, seed=seed)
                cbs.append(guard)
            t0 = time.perf_counter()
            res = ctx.fit(tag, net, train, objective=obj, config=_fit_config(cfg, obj), callbacks=cbs,
                          metadata={"dataset": dataset, "study": "odgq", "recipe": recipe})
            log.info("trained %s in %.0f s", tag, time.perf_counter() - t0)
            cfg_obj = obj.config() if hasattr(obj, "config") else {"name": recipe}
            return res.model, {"epoch_time_s": median_epoch_time(res.history, skip_first=True), "train_time_s":
                                      sum(h["epoch_time_s"] for h in res.history), "objective": cfg_obj,
                                      "final_train_acc": res.history[-1]["train_acc"],
                                      "co_flagged_epochs": [] if guard is None else guard.flagged}

        log.info("float sources: PGD-AT and natural training")
        float_pgd, src_pgd = train_one("float-pgd-at", "pgd-at", "float", eps_v)
        float_ce, src_ce = train_one("float-ce", "ce", "float", eps_v)
        models: dict[tuple[int, str], nn.Module] = {}
        rows: list[dict[str, Any]] = []
        for b in bits_l:
            for r in recipes_l:
                log.info("%s at %s", RECIPE_NAMES[r], specs[b])
                m, meta = train_one(f"{'binary' if b == 1 else specs[b]}-{r}", r, specs[b], eps_by[b])
                models[b, r] = m
                rows.append({"recipe": r, "bits": b, "spec": specs[b], "eps": eps_by[b], **meta})
        cost = {}
        for b in bits_l:
            log.info("interleaved cost measurement at %s", specs[b])
            cost[b] = _interleaved_cost(model_name, info, specs[b], train, cfg, recipes_l, eps_by[b], budget,
                                        recipe_options, seed, parent)

        masks: dict[tuple[int, str], torch.Tensor] = {}
        for row in rows:
            b, r = row["bits"], row["recipe"]
            others = [o for o in bits_l if o != b]
            other_b = others[0] if others else None
            log.info("evaluating %s at %s", RECIPE_NAMES[r], specs[b])
            res, std_mask, _ = _evaluate(
                models[b, r], x, y, eps_by[b], budget, seed, float_pgd=float_pgd, float_ce=float_ce,
                other=models[other_b, r] if other_b is not None else None,
                other_label=None if other_b is None else ("binary" if other_b == 1 else specs[other_b]))
            masks[b, r] = std_mask
            nat = next(rr for rr in rows if rr["bits"] == b and rr["recipe"] == "ce")
            row.update(res)
            row["epoch_time_ratio_run"] = row["epoch_time_s"] / nat["epoch_time_s"]
            row["epoch_time_ratio"] = cost[b]["ratio"][r]
            row["epoch_time_ratio_min"] = cost[b]["ratio_of_minima"][r]

        claims = _claims(rows, masks, bits_l)
        return {
            "study": "odgq",
            "format": FORMAT,
            "settings": {"dataset": dataset, "model": model_name, "eps": {str(b): e for b, e in eps_by.items()},
                         "source_eps": eps_v, "bits": bits_l, "specs":
                         {str(b): s for b, s in specs.items()}, "recipes": recipes_l, "fit": cfg.to_dict(),
                         "n_train": len(train), "n_eval": len(y), "init": None if init is None else str(init),
                         "quick": quick, "seed": seed, "threads": ctx.threads,
                         "budget": dataclasses.asdict(budget), "recipe_options": recipe_options},
            "sources": {"float-pgd-at": src_pgd, "float-ce": src_ce},
            "rows": rows,
            "cost": {str(b): c for b, c in cost.items()},
            "claims": claims,
            "versions": {"qrobust": __version__, "torch": torch.__version__},
        }

    def render(self, results: Mapping[str, Any]) -> str:
        return _report(results)

    def figures(self, results: Mapping[str, Any]) -> dict[str, Any]:
        return {"robustness_vs_cost.png": _plot_cost(results), "attacks.png": _plot_attacks(results)}


STUDY = RobustQAT()


def run_odgq_study(**settings: Any) -> dict[str, Any]:
    """Run the study (module docstring) and write its report folder ``out``; returns ``results.json``'s dict.

    ``bits`` — bit-widths (1 = binary); ``recipes`` — a subset of :data:`RECIPES` (natural QAT is always
    trained: it is the cost reference); ``epochs``, ``batch_size``, ``lr``, ``eps`` (L∞, a fraction of the
    pixel range; one value, or one per bit-width as ``{bits: eps}``), ``n_eval`` default per dataset
    (:data:`DATASET_DEFAULTS`; on digits binary networks get ε = 0.1, where they have robustness to gain,
    and the others 0.2); ``n_train`` trains on a
    class-mixed random subset; ``recipe_options`` overrides a recipe's options
    (``{"odgq": {"craft_fraction": 0.5}}``); ``quick`` shrinks epochs, samples and attack budgets for smoke
    tests; ``budget`` overrides attack, adversarial-training and timing budgets by name
    (``{"at_steps": 7, "spsa_steps": 20, "timing_batches": 50}``; unknown names are an error); ``bf16``
    trains under bfloat16 autocast; ``init`` (a float checkpoint of ``model``'s architecture) makes every
    model, the float sources included, start from it instead of a random initialisation — adversarial
    fine-tuning, which a CPU budget can afford on CIFAR-10. ``out`` (default ``runs/odgq-study``),
    ``resume`` (continue the run folders under ``out/runs``), ``seed`` and ``threads`` (torch intra-op
    threads; ``"auto"``: 1 on digits, whose 8×8 images gain nothing from more) are the harness's
    (:func:`~qrobust.studies.harness.run_study`).
    """
    return run_study(STUDY, **settings)


# ============================================================================================ claims
def _claims(rows: list[dict[str, Any]], masks: dict[tuple[int, str], torch.Tensor], bits: list[int]
            ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in bits:
        get = {r["recipe"]: r for r in rows if r["bits"] == b}
        if "odgq" not in get:
            continue
        o = get["odgq"]
        c: dict[str, Any] = {"odgq_epoch_time_ratio": o["epoch_time_ratio"],
                             "odgq_epoch_time_ratio_min": o["epoch_time_ratio_min"],
                             "odgq_epoch_time_ratio_run": o["epoch_time_ratio_run"],
                             "cost_ok": o["epoch_time_ratio"] <= COST_LIMIT}
        if "pgd-at" in get:
            c["pgd_at_epoch_time_ratio"] = get["pgd-at"]["epoch_time_ratio"]
        for ref, key, ok in (("fgsm-rs", "vs_fgsm_rs", lambda gap: gap >= 0),
                             ("pgd-at", "vs_pgd_at", lambda gap: gap >= -NEAR_PGD)):
            if ref in get:
                gap = o["standard"] - get[ref]["standard"]
                c[key] = {"odgq": o["standard"], ref: get[ref]["standard"], "gap": gap, "holds": bool(ok(gap)),
                          **paired_test(masks[b, "odgq"], masks[b, ref]),
                          "gap_worst_all": o["worst_all"] - get[ref]["worst_all"]}
        out[str(b)] = c
    return out


# ============================================================================================ report
def _pct(v: float | None) -> str:
    return pct(v, missing="–")


def _report(res: Mapping[str, Any]) -> str:
    s = res["settings"]
    exact = "format" in res  # results before the exact test (no format tag) carry McNemar's z only
    # before adversarial fine-tuning from a checkpoint (no "init" setting) the start was just "initialisation"
    start = "random initialisation" if exact or "init" in s else "initialisation"
    L = [f"# ODG-Q study — {s['dataset']}, {s['model']}\n",
         "Natural QAT, FGSM-RS, PGD-AT, TRADES and ODG-Q trained from the same "
         + (f"float checkpoint (`{Path(s['init']).name}`, adversarial fine-tuning)" if s.get("init") else
            start)
         + f" for {s['fit']['epochs']} epochs (batch {s['fit']['batch_size']}, lr {s['fit']['lr']:g}, SGD; FGSM-RS "
         f"with its onecycle schedule, the others cosine{', bf16 autocast' if s['fit'].get('bf16') else ''}) on "
         f"{s['n_train']} training images; evaluated on "
         f"{s['n_eval']} test images under L∞ attacks. Specs: "
         + ", ".join(f"{b} bits = `{sp}` (ε = {s['eps'][b]:.4g})" for b, sp in s["specs"].items())
         + f". PGD-AT/TRADES use {s['budget']['at_steps']} steps. Wall time {res['wall_time_s']:.0f} s on "
         f"{s['threads']} thread(s){' (quick budgets)' if s['quick'] else ''}.\n",
         "Robust accuracies in %. White-box attacks use straight-through gradients through every quantizer. "
         "**standard** = per-sample worst case of the standard suite (APGD-CE, APGD-T with ste gradients, then "
         "gradient-free Square) — the headline number; **worst-all** also folds in the ten attacks. **cost** = "
         "epoch time ÷ natural QAT's, interleaved short runs (median of per-round ratios; **cost (fastest)**: "
         "ratio of each recipe's fastest epoch, the least load-disturbed estimate); **cost (run)** = the same from "
         "the training runs' median epoch times.\n"]
    for b in s["bits"]:
        rows = [r for r in res["rows"] if r["bits"] == b]
        if not rows:
            continue
        labels = rows[0]["white_box"] + rows[0]["black_box"]
        L.append(f"## {b} bit{'s' if b > 1 else ''} (`{s['specs'][str(b)]}`), ε = {s['eps'][str(b)]:.4g}\n")
        head = ["recipe", "clean", *labels, "white-box mean", "black-box mean", "worst-ten", "**standard**",
                "worst-all", "**cost**", "cost (fastest)", "cost (run)"]
        L += md_table(head, [[RECIPE_NAMES[r["recipe"]], _pct(r["clean"]), *(_pct(r["attacks"][k]) for k in labels),
                              _pct(r["white_box_mean"]), _pct(r["black_box_mean"]), _pct(r["worst_ten"]),
                              f"**{_pct(r['standard'])}**", _pct(r["worst_all"]), f"**{r['epoch_time_ratio']:.2f}×**",
                              f"{r['epoch_time_ratio_min']:.2f}×", f"{r['epoch_time_ratio_run']:.2f}×"] for r in rows])
        flags = [f"{RECIPE_NAMES[r['recipe']]}: {', '.join(r['flags'])}" for r in rows if r["flags"]]
        L.append("\nGradient-masking diagnostics (standard suite): " + ("; ".join(flags) if flags else "none flagged")
                 + ".\n")
        co = [f"{RECIPE_NAMES[r['recipe']]} at epochs {r['co_flagged_epochs']}" for r in rows
              if r.get("co_flagged_epochs")]
        L.append("Catastrophic overfitting seen by the guard (FGSM-RS, ODG-Q; warn only): "
                 + ("; ".join(co) if co else "none") + ".\n")
    L.append("## Claims\n")
    for b, c in res["claims"].items():
        name = f"{b} bit{'s' if int(b) > 1 else ''}"
        L.append(f"- **{name} — cost**: ODG-Q epoch {c['odgq_epoch_time_ratio']:.3f}× natural (fastest epochs: "
                 f"{c['odgq_epoch_time_ratio_min']:.2f}×; training runs: {c['odgq_epoch_time_ratio_run']:.2f}×"
                 + (f"; PGD-AT {c['pgd_at_epoch_time_ratio']:.2f}×" if "pgd_at_epoch_time_ratio" in c else "") + ")"
                 f" — {'holds' if c['cost_ok'] else 'does not hold'} (≤ {COST_LIMIT}×).")
        near = f"within {100 * NEAR_PGD:.0f} points of PGD-AT"
        for key, ref, what in (("vs_fgsm_rs", "fgsm-rs", "≥ FGSM-RS"), ("vs_pgd_at", "pgd-at", near)):
            if key in c:
                v = c[key]
                L.append(f"- **{name} — {what}**: ODG-Q {_pct(v['odgq'])}% vs {RECIPE_NAMES[ref]} {_pct(v[ref])}% "
                         f"(gap {100 * v['gap']:+.1f} points, McNemar {paired_text(v, signed=True)}; worst-all gap "
                         f"{100 * v['gap_worst_all']:+.1f}) — **{'holds' if v['holds'] else 'does not hold'}**.")
    n = s["n_eval"]
    L.append(f"\nWith {n} test samples one accuracy has a standard error of about "
             f"{100 * math.sqrt(0.25 / n):.1f} points; paired differences are judged by "
             + ("an exact McNemar test.\n" if exact else "McNemar's z.\n"))
    L.append("![robust accuracy vs training cost](robustness_vs_cost.png)\n\n![per attack](attacks.png)\n")
    return "\n".join(L)


def _plot_cost(res: Mapping[str, Any]) -> Any:
    fig = new_figure((5.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    markers = {"ce": "o", "fgsm-rs": "s", "pgd-at": "^", "trades": "v", "odgq": "*"}
    for i, b in enumerate(res["settings"]["bits"]):
        for r in (r for r in res["rows"] if r["bits"] == b):
            ax.scatter(r["epoch_time_ratio"], 100 * r["standard"], marker=markers[r["recipe"]], color=f"C{i}",
                       s=90 if r["recipe"] == "odgq" else 45,
                       label=f"{RECIPE_NAMES[r['recipe']]} {b}-bit")
    ax.axvline(COST_LIMIT, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ticks = [t for t in (1, 1.5, 2, 3, 5, 8, 12, 20) if t <= max(r["epoch_time_ratio"] for r in res["rows"]) * 1.2]
    ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("epoch time ÷ natural QAT (log)")
    ax.set_ylabel("standard-suite robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _plot_attacks(res: Mapping[str, Any]) -> Any:
    bits = res["settings"]["bits"]
    fig = new_figure((9, 3.2 * len(bits)))
    axes = fig.subplots(len(bits), 1, squeeze=False)
    for ax, b in zip(axes[:, 0], bits):
        rows = [r for r in res["rows"] if r["bits"] == b]
        labels = ["clean", *rows[0]["white_box"], *rows[0]["black_box"], "standard"]
        w = 0.8 / len(rows)
        for j, r in enumerate(rows):
            vals = [r["clean"], *[r["attacks"][k] for k in labels[1:-1]], r["standard"]]
            ax.bar([i + j * w for i in range(len(labels))], [100 * v for v in vals], width=w,
                   label=RECIPE_NAMES[r["recipe"]])
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(labels))], labels, rotation=30, fontsize=7, ha="right")
        ax.set_ylabel(f"{b}-bit accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7, ncol=5)
    fig.tight_layout()
    return fig
