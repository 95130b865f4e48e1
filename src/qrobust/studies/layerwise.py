"""``qrobust study layerwise``: Song, Ranjan & Li (2021) — does adversarial training make a network more
vulnerable to post-training quantization, and does a Lipschitz-guided per-layer bit allocation
(:mod:`qrobust.analysis.allocation`, docs/layerwise.md) protect its robustness better than the baselines?

**Parents.** One architecture trained twice from the same initialisation, data order and epochs: naturally
(cross-entropy) and with PGD-AT (:class:`~qrobust.defenses.PgdAT`, ``at_steps`` steps, α = ε/4) at ε — or
either taken from a checkpoint (``natural=`` / ``adversarial=``, :meth:`StudyContext.parent`: checked to be a
float model of this dataset and architecture), so that expensive parents are trained once and shared.

**Part 1 — the claim.** Each float parent quantized *post-training* (no fine-tune) at ``bits`` (8/6/4/3/2):
weights only (``w{b}a32``) and weights + activations (``w{b}a{b}``, activation clips calibrated on
``n_calib`` training images). Clean accuracy and PGD robust accuracy (``pgd_steps``, α = ε/4,
straight-through gradients through the quantizers) on the first ``n_eval`` test images, and their drop from
the float parent. Claim 1 — *the AT model loses more* — is judged per (mode, bits) on the robust-accuracy drop,
with an exact McNemar test on the per-sample "lost" masks (robust in the float parent, not after quantizing).

**Part 2 — the allocation.** For each parent, each method of :data:`~qrobust.analysis.allocation.METHODS` at
each budget (average weight bits; activations float — a weights-only allocation) over the candidate settings
``candidates`` × ``clips`` (bits and a clipping rule per layer; clipping costs no bits): clean accuracy, the
per-sample worst case of the standard suite (APGD-CE, APGD-T with ``apgd_iter`` iterations, then Square with
``square_queries`` queries, :func:`qrobust.evaluation.evaluate`), model size, the bits (and clips) per layer —
post-training, and with ``qat_epochs`` > 0 also after a short quantization-aware fine-tune of that allocation
(:func:`qrobust.fit` with the registered objective ``qat_objective``: ``"natural"`` = cross-entropy,
``"pgd-at"`` = PGD-AT at ε; ``qat_batches`` caps the batches per epoch on large datasets), side by side.
Claim 2 — *Lipschitz beats uniform, HAWQ and random at equal budget on robust accuracy* — paired per (parent,
budget, baseline) by the exact McNemar test on the worst-case masks, post-training (the verdict) and after the
fine-tune (``qat_points``, ``qat_verdict``).

**Consistency (claim 3).** Every single-layer setting (one layer at ``b`` bits with clipping rule ``c``, the
rest float): its criterion cost ``c_l(b, c)`` against its measured adversarial loss increase (mean cross-entropy
under PGD-``consistency_steps`` on the first ``consistency_images`` test images (all by default), minus the
float parent's); Spearman's ρ (``scipy.stats.spearmanr``) per parent and method. With several clipping rules
also the *clip agreement*: the fraction of (layer, bits) pairs where the criterion's cheapest clip is the one
with the least measured loss.

Outputs in ``out``: ``report.md``, ``results.json``, ``part1.png``, ``bits.png``, ``consistency.png``, and the
two parents' run folders under ``runs/``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrobust._version import __version__
from qrobust.analysis.allocation import DEFAULT_CANDIDATES, DEFAULT_CLIPS, METHODS, allocate, check_clips, parse_setting
from qrobust.attacks import PGD
from qrobust.data import load_dataset
from qrobust.defenses import PgdAT, make_objective
from qrobust.errors import ConfigError
from qrobust.evaluation import evaluate
from qrobust.models import build_model
from qrobust.models.introspect import weight_layers
from qrobust.quant import QuantSpec, describe, quantize, size_totals
from qrobust.studies.harness import (
    ALPHA,
    TRAINING_OPTIONS,
    Option,
    Study,
    StudyContext,
    check_parent_path,
    dataset_defaults,
    md_table,
    new_figure,
    paired_test,
    paired_text,
    pct,
    register_study,
    significant,
    verdict,
)
from qrobust.training import FitConfig
from qrobust.validation import check_eps

log = logging.getLogger(__name__)

__all__ = ["DATASET_DEFAULTS", "FORMAT", "QAT_OBJECTIVES", "Layerwise", "make_qat_objective"]

FORMAT = "qrobust-layerwise-study/1"
PARENTS = ("natural", "pgd-at")
PARENT_NAMES = {"natural": "natural", "pgd-at": "PGD-AT"}
MODES = {"w": "weights only", "wa": "weights + activations"}
BASELINES = ("uniform", "hawq", "random")
#: the criteria whose claims 2 and 3 are judged: the paper's (a Lipschitz *bound* of the rest of the network) and
#: our variant with its local gain at the adversarial calibration points (docs/layerwise.md §7)
OURS = ("lipschitz", "lipschitz-local")
CLAIM_NAMES = {"lipschitz": "Lipschitz", "lipschitz-local": "local-gain Lipschitz (ours)"}
#: the objective each role's parent is expected to have been trained with, and how an objective reads in a figure
ROLE_OBJECTIVES = {"natural": "ce", "pgd-at": "pgd-at"}
OBJECTIVE_NAMES = {"ce": "natural", "pgd-at": "PGD-AT", "fgsm-rs": "FGSM-RS", "trades": "TRADES", "odgq": "ODG-Q"}


def parent_names(res: Mapping[str, Any]) -> dict[str, str]:
    """What to call each parent in tables and figures: its role (natural, PGD-AT), or — for a loaded parent trained
    otherwise than its role says, e.g. FGSM-RS as the robust one — "FGSM-RS (PGD-AT role)", so that no figure
    names a training the model did not have."""
    srcs = res["settings"].get("parents") or {}
    out = {}
    for p in PARENTS:
        got = ((srcs.get(p) or {}).get("objective") or {}).get("name")
        out[p] = (f"{OBJECTIVE_NAMES.get(got, got.upper())} ({PARENT_NAMES[p]} role)"
                  if got and got != ROLE_OBJECTIVES[p] else PARENT_NAMES[p])
    return out


#: the fine-tunes after allocation: the name a user gives → the registered objective (qrobust.defenses)
QAT_OBJECTIVES = {"natural": "ce", "pgd-at": "pgd-at"}

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"eps": 0.1, "epochs": 15, "batch_size": 64, "lr": 0.05, "n_eval": 359, "n_calib": 128,
               "qat_lr": 0.01},
    "mnist": {"eps": 0.2, "epochs": 5, "batch_size": 128, "lr": 0.05, "n_eval": 1000, "n_calib": 256,
              "qat_lr": 0.01},
    "cifar10": {"eps": 8 / 255, "epochs": 30, "batch_size": 128, "lr": 0.1, "n_eval": 1000, "n_calib": 256,
                "qat_lr": 0.01},
}
_FALLBACK = {"model": "resnet20", "eps": 8 / 255, "epochs": 10, "batch_size": 128, "lr": 0.05, "n_eval": 500,
             "n_calib": 256, "qat_lr": 0.01}


@dataclasses.dataclass
class _Budget:
    at_steps: int = 7
    pgd_steps: int = 20
    apgd_iter: int = 25
    square_queries: int = 300
    calib_steps: int = 10
    consistency_steps: int = 10
    consistency_images: int | None = None  # the first N evaluation images (None: all); a ResNet has 240 settings
    hutchinson_samples: int = 8


_QUICK = _Budget(at_steps=3, pgd_steps=5, apgd_iter=5, square_queries=20, calib_steps=3, consistency_steps=3,
                 hutchinson_samples=2)


# ============================================================================================ pieces
def make_qat_objective(name: str, *, eps: float, steps: int) -> Any:
    """The registered objective of the fine-tune ``name`` (:data:`QAT_OBJECTIVES`): cross-entropy, or PGD-AT
    at ``eps`` with ``steps`` steps (α = ε/4)."""
    if name not in QAT_OBJECTIVES:
        raise ConfigError(f"unknown fine-tune objective {name!r}; choose from {sorted(QAT_OBJECTIVES)}")
    if name == "natural":
        return make_objective("ce")
    return make_objective(QAT_OBJECTIVES[name], eps=eps, steps=steps)


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).argmax(1) == y


def _pgd_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, seed: int
              ) -> torch.Tensor:
    x_adv = PGD(model, eps=eps, steps=steps, seed=seed)(x, y)
    return _correct(model, x_adv, y)


def _adv_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, seed: int) -> float:
    x_adv = PGD(model, eps=eps, steps=steps, seed=seed)(x, y)
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(x_adv), y))


def _standard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, b: _Budget, seed: int
              ) -> tuple[dict[str, Any], torch.Tensor]:
    rep = evaluate(model, (x, y), suite="standard", eps=eps, seed=seed, n_queries=b.square_queries,
                   attack_kwargs={"apgd-ce": {"n_iter": b.apgd_iter}, "apgd-t": {"n_iter": b.apgd_iter}},
                   diagnostics=False)
    r = rep.result(eps)
    return {"clean": rep.clean_accuracy, "worst": r.robust_accuracy,
            "after": {a.label: a.robust_accuracy_after for a in r.attacks}}, r.robust_mask


def _clip_agreement(settings: Sequence[Mapping[str, Any]], method: str) -> dict[str, Any]:
    """Over the (layer, bits) pairs with several clipping rules: how often the rule ``method`` finds cheapest
    is the one whose measured adversarial loss increase is least."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for s in settings:
        groups.setdefault((s["layer"], s["bits"]), []).append(s)
    hits = [min(g, key=lambda s: s["cost"][method])["clip"] == min(g, key=lambda s: s["loss_increase"])["clip"]
            for g in groups.values() if len(g) > 1]
    return {"agree": sum(hits), "n": len(hits), "chance": 1 / max(len(next(iter(groups.values()))), 1)}


def _spearman(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    from scipy.stats import spearmanr  # deferred: scipy is slow to import

    res = spearmanr(a, b)
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": None if math.isnan(rho) else rho, "p": None if math.isnan(p) else p, "n": len(a)}


# ============================================================================================ the study
@register_study
class Layerwise(Study):
    """The layer-wise adversarial-aware quantization study (module docstring)."""

    name = "layerwise"
    summary = ("Song, Ranjan & Li: does PGD-AT lose more to post-training quantization, and does Lipschitz-guided "
               "per-layer bit allocation beat uniform/HAWQ/QUANOS/random at equal budget?")
    format = FORMAT
    budget = _Budget()
    quick_budget = _QUICK
    options = (
        *TRAINING_OPTIONS,
        Option("--bits", "int_list", "part 1 bit-widths (default 8,6,4,3,2)"),
        Option("--budgets", "float_list", "part 2 budgets in average weight bits (default 3,4)"),
        Option("--methods", "str_list", "part 2 allocation methods (default: all)"),
        Option("--eps", "eps255", "L∞ ε on the 0–255 scale (default per dataset; digits 0.1)"),
        Option("--n-calib", "int", "calibration images from the training split (default per dataset)"),
        Option("--candidates", "int_list", "part 2 candidate weight bit-widths per layer (default 2,3,4,5,6,8)"),
        Option("--clips", "str_list", "part 2 clipping rules per layer: max, mse, pQ (e.g. max,mse,p99.9; "
                                      "default max)"),
        Option("--qat-epochs", "int", "epochs of the quantization-aware fine-tune after each allocation "
                                      "(default 0: post-training only)"),
        Option("--qat-objective", "str", "the fine-tune's objective (default: %(default)s)", default="pgd-at",
               choices=tuple(QAT_OBJECTIVES)),
        Option("--qat-lr", "float", "the fine-tune's learning rate (default per dataset)"),
        Option("--qat-batches", "int", "batches per fine-tune epoch (default: the whole training set)"),
        Option("--natural", "str", "the natural float parent from this checkpoint (not trained here)"),
        Option("--adversarial", "str", "the PGD-AT float parent from this checkpoint (not trained here)"),
    )

    def run(
        self,
        ctx: StudyContext,
        *,
        dataset: str,
        data_dir: str | Path | None = None,
        model: str | None = None,
        epochs: int | None = None,
        n_train: int | None = None,
        n_eval: int | None = None,
        bf16: bool = False,
        bits: Sequence[int] = (8, 6, 4, 3, 2),
        budgets: Sequence[float] = (3.0, 4.0),
        methods: Sequence[str] = METHODS,
        eps: float | None = None,
        n_calib: int | None = None,
        candidates: Sequence[int] = DEFAULT_CANDIDATES,
        clips: Sequence[str] = DEFAULT_CLIPS,
        qat_epochs: int = 0,
        qat_objective: str = "pgd-at",
        qat_lr: float | None = None,
        qat_batches: int | None = None,
        natural: str | Path | None = None,
        adversarial: str | Path | None = None,
    ) -> dict[str, Any]:
        b, seed = ctx.budget, ctx.seed
        clips_l = list(check_clips(clips))
        if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
            raise ConfigError(f"qat_epochs must be an integer ≥ 0 (0 = post-training only), got {qat_epochs!r}")
        if qat_objective not in QAT_OBJECTIVES:
            raise ConfigError(f"unknown qat_objective {qat_objective!r}; choose from {sorted(QAT_OBJECTIVES)}")
        checkpoints = {"natural": natural, "pgd-at": adversarial}
        for flag, path in (("--natural", natural), ("--adversarial", adversarial)):
            check_parent_path(flag, path)
        bits_l = [int(v) for v in bits]
        if not bits_l or any(not 2 <= v <= 8 for v in bits_l) or len(set(bits_l)) != len(bits_l):
            raise ConfigError(f"bits must be distinct bit-widths from 2 to 8, got {list(bits)}")
        candidates = sorted({int(v) for v in candidates})
        if not candidates or any(not 2 <= v <= 8 for v in candidates):
            raise ConfigError(f"candidates must be weight bit-widths from 2 to 8, got {candidates}")
        budgets_l = [float(v) for v in budgets]
        if not budgets_l or any(not min(candidates) <= v <= 8 for v in budgets_l):
            raise ConfigError(f"budgets must lie between {min(candidates)} and 8 average bits, got {list(budgets)}")
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ConfigError(f"unknown allocation methods {bad}; choose from {METHODS}")
        methods_l = [m for m in METHODS if m in methods]
        d = dataset_defaults(DATASET_DEFAULTS, dataset, _FALLBACK)
        if ctx.quick:
            d.update(epochs=2, n_eval=min(d["n_eval"], 64), n_calib=min(d["n_calib"], 32))
        eps_v = check_eps(eps if eps is not None else d["eps"], "Linf", positive=True)
        root = None if data_dir is None else Path(data_dir)
        train = load_dataset(dataset, "train", root=root)
        test = load_dataset(dataset, "test", root=root)
        if n_train is not None:
            train = train.subset(n_train, seed=seed)
        n_calib_v = n_calib or d["n_calib"]
        if n_calib_v > len(train):
            raise ConfigError(f"n_calib={n_calib_v} exceeds the {len(train)} training images; give fewer")
        cx, cy = train.subset(n_calib_v, seed=seed).tensors()
        x, y = test.tensors(n_eval or d["n_eval"])
        info = test.info
        model_name = model or d["model"]
        cfg = FitConfig(epochs=epochs or d["epochs"], batch_size=d["batch_size"], lr=d["lr"], seed=seed, bf16=bf16)
        qat_cfg = dataclasses.replace(cfg, epochs=max(qat_epochs, 1), lr=qat_lr or d["qat_lr"],
                                      max_batches=qat_batches).validate()

        def build() -> nn.Module:
            torch.manual_seed(seed)
            c, h, _ = info.input_shape
            return build_model(model_name, num_classes=info.num_classes, in_channels=c, input_size=h,
                               activation="relu6", mean=list(info.mean), std=list(info.std))

        parents: dict[str, nn.Module] = {}
        sources: dict[str, dict[str, Any]] = {}
        for p in sorted(PARENTS, key=lambda p: checkpoints[p] is None):  # loaded ones first: they set the model
            model_name = next((s["model"] for s in sources.values() if s.get("model")), model_name)
            obj = make_objective("ce") if p == "natural" else PgdAT(eps=eps_v, steps=b.at_steps)
            if checkpoints[p] is None:
                log.info("training the %s parent", PARENT_NAMES[p])
            parents[p], sources[p] = ctx.parent(
                f"float-{p}", checkpoints[p], build, train, objective=obj, config=cfg, dataset=dataset,
                model=model, flag="--natural" if p == "natural" else "--adversarial",
                metadata={"dataset": dataset, "study": "layerwise", "parent": p})
        parents = {p: parents[p] for p in PARENTS}
        if len({type(n).__name__ for n in parents.values()}) > 1 or \
                _layer_sizes(parents["natural"]) != _layer_sizes(parents["pgd-at"]):
            raise ConfigError("the natural and PGD-AT parents have different architectures: give checkpoints of "
                              "the same architecture (or let the study train the missing one)")
        qat_obj = make_qat_objective(qat_objective, eps=eps_v, steps=b.at_steps) if qat_epochs else None

        # ---------------------------------------------------------------- part 1: uniform PTQ
        part1: dict[str, Any] = {}
        lost: dict[tuple[str, str, int], torch.Tensor] = {}
        for p, net in parents.items():
            clean_f = _correct(net, x, y)
            rob_f = _pgd_mask(net, x, y, eps_v, b.pgd_steps, seed)
            rows = []
            for mode in MODES:
                for bb in bits_l:
                    spec = f"w{bb}a32" if mode == "w" else f"w{bb}a{bb}"
                    q = quantize(net, spec, calibrate=cx if mode == "wa" else None).eval()
                    clean_q = _correct(q, x, y)
                    rob_q = _pgd_mask(q, x, y, eps_v, b.pgd_steps, seed)
                    lost[p, mode, bb] = rob_f & ~rob_q
                    rows.append({"mode": mode, "bits": bb, "spec": spec, "clean": float(clean_q.float().mean()),
                                 "robust": float(rob_q.float().mean()),
                                 "clean_drop": float(clean_f.float().mean() - clean_q.float().mean()),
                                 "robust_drop": float(rob_f.float().mean() - rob_q.float().mean())})
            part1[p] = {"float_clean": float(clean_f.float().mean()), "float_robust": float(rob_f.float().mean()),
                        "rows": rows}
        c1_points = []
        for mode in MODES:
            for bb in bits_l:
                t = paired_test(lost["pgd-at", mode, bb], lost["natural", mode, bb])
                at = next(r for r in part1["pgd-at"]["rows"] if r["mode"] == mode and r["bits"] == bb)
                nat = next(r for r in part1["natural"]["rows"] if r["mode"] == mode and r["bits"] == bb)
                holds = at["robust_drop"] > nat["robust_drop"]
                c1_points.append({"mode": mode, "bits": bb, "at_drop": at["robust_drop"],
                                  "natural_drop": nat["robust_drop"], "at_clean_drop": at["clean_drop"],
                                  "natural_clean_drop": nat["clean_drop"], "holds": holds, **t})

        # ---------------------------------------------------------------- part 2: allocations
        part2: list[dict[str, Any]] = []
        masks: dict[tuple[str, float, str], torch.Tensor] = {}
        qat_masks: dict[tuple[str, float, str], torch.Tensor] = {}
        costs: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
        ratios: dict[str, dict[str, dict[str, float]]] = {}
        float_std: dict[str, Any] = {}
        for p, net in parents.items():
            float_std[p], _ = _standard(net, x, y, eps_v, b, seed)
            if qat_obj is not None:
                # the control: the float parent fine-tuned the same way. A fine-tuned allocation above its float
                # parent may owe that to the extra (e.g. PGD) training, not to repairing quantization
                log.info("%s parent, float: the same %d-epoch %s fine-tune (the control)", PARENT_NAMES[p],
                         qat_epochs, qat_objective)
                ft = ctx.fit(f"qat-{p}-float", copy.deepcopy(net), train, objective=qat_obj, config=qat_cfg,
                             metadata={"dataset": dataset, "study": "layerwise", "parent": p,
                                       "allocation": "float"}).model
                float_std[p]["qat"], _ = _standard(ft, x, y, eps_v, b, seed)
            for budget in budgets_l:
                for m in methods_l:
                    log.info("%s parent, %s allocation at %g bits", PARENT_NAMES[p], m, budget)
                    spec, ainfo = allocate(net, cx, cy, budget=budget, method=m, candidates=candidates, clips=clips_l,
                                           eps=eps_v, seed=seed, attack_steps=b.calib_steps,
                                           hutchinson_samples=b.hutchinson_samples)
                    costs.setdefault((p, m), ainfo["costs"])
                    ratios.setdefault(p, ainfo["ratios"])
                    q = quantize(net, spec).eval()
                    res, mask = _standard(q, x, y, eps_v, b, seed)
                    masks[p, budget, m] = mask
                    row = {"parent": p, "budget": budget, "method": m, "bits": ainfo["bits"], "clip": ainfo["clip"],
                           "clip_ratio": ainfo["clip_ratio"], "average_bits": ainfo["average_bits"],
                           "size_bits": size_totals(describe(q))["size_bits"], **res}
                    if qat_obj is not None:
                        log.info("%s parent, %s allocation at %g bits: %d-epoch %s fine-tune", PARENT_NAMES[p], m,
                                 budget, qat_epochs, qat_objective)
                        ft = ctx.fit(f"qat-{p}-{budget:g}-{m}", quantize(net, spec), train, objective=qat_obj,
                                     config=qat_cfg, metadata={"dataset": dataset, "study": "layerwise", "parent": p,
                                                               "allocation": m, "budget": budget}).model
                        row["qat"], qat_masks[p, budget, m] = _standard(ft, x, y, eps_v, b, seed)
                    part2.append(row)
        sizes = next(iter(costs.values())) if costs else {}
        c2_points, c2_qat = [], []
        for crit in (m for m in OURS if m in methods_l):
            for p in PARENTS:
                for budget in budgets_l:
                    for base in (m for m in BASELINES if m in methods_l):
                        lip = next(r for r in part2 if (r["parent"], r["budget"], r["method"]) == (p, budget, crit))
                        ref = next(r for r in part2 if (r["parent"], r["budget"], r["method"]) == (p, budget, base))
                        t = paired_test(masks[p, budget, crit], masks[p, budget, base])
                        c2_points.append({"criterion": crit, "parent": p, "budget": budget, "baseline": base,
                                          "lipschitz": lip["worst"], "other": ref["worst"],
                                          "holds": t["only_a"] > t["only_b"], **t})
                        if qat_masks:
                            t = paired_test(qat_masks[p, budget, crit], qat_masks[p, budget, base])
                            c2_qat.append({"criterion": crit, "parent": p, "budget": budget, "baseline": base,
                                           "lipschitz": lip["qat"]["worst"], "other": ref["qat"]["worst"],
                                           "holds": t["only_a"] > t["only_b"], **t})

        # ---------------------------------------------------------------- consistency
        consistency: dict[str, Any] = {}
        for p, net in parents.items():
            xc, yc = x[:b.consistency_images], y[:b.consistency_images]
            base_loss = _adv_loss(net, xc, yc, eps_v, b.consistency_steps, seed)
            settings = []
            for layer in sizes:
                for key in sizes[layer]:
                    bb, clip = parse_setting(key)
                    r = ratios[p][layer][key]
                    ov = {"weight_bits": bb, **({"weight_clip": r} if r != 1.0 else {})}
                    q = quantize(net, QuantSpec(weight_bits=32, act_bits=32, overrides={layer: ov})).eval()
                    settings.append({"layer": layer, "bits": bb, "clip": clip, "clip_ratio": r, "key": key,
                                     "loss_increase": _adv_loss(q, xc, yc, eps_v, b.consistency_steps, seed)
                                     - base_loss})
            measured = [s["loss_increase"] for s in settings]
            for s in settings:
                s["cost"] = {m: costs[p, m][s["layer"]][s["key"]] for m in methods_l if (p, m) in costs}
            criteria = [m for m in methods_l if m not in ("uniform", "random")]
            consistency[p] = {"float_adv_loss": base_loss, "settings": settings,
                              "spearman": {m: _spearman([s["cost"][m] for s in settings], measured) for m in criteria},
                              "clip_agreement": {m: _clip_agreement(settings, m) for m in criteria}
                              if len(clips_l) > 1 else {}}

        claims = _claims(c1_points, c2_points, consistency, c2_qat)
        return {
            "study": self.name, "format": FORMAT,
            "settings": {"dataset": dataset, "model": model_name, "eps": eps_v, "bits": bits_l, "budgets": budgets_l,
                         "methods": methods_l, "candidates": sorted(candidates), "clips": clips_l,
                         "qat": {"epochs": qat_epochs, "objective": qat_objective if qat_epochs else None,
                                 "fit": qat_cfg.to_dict() if qat_epochs else None},
                         "parents": sources, "n_train": len(train),
                         "n_eval": len(y), "n_calib": len(cy), "fit": cfg.to_dict(), "quick": ctx.quick,
                         "seed": seed, "threads": ctx.threads, "budget": dataclasses.asdict(b),
                         "layers": {n: int(v) for n, v in _layer_sizes(parents["natural"]).items()}},
            "part1": part1, "part2": part2, "float_standard": float_std, "consistency": consistency,
            "claims": claims, "versions": {"qrobust": __version__, "torch": torch.__version__},
        }

    def render(self, results: Mapping[str, Any]) -> str:
        return _report(results)

    def figures(self, results: Mapping[str, Any]) -> dict[str, Any]:
        return {"part1.png": _plot_part1(results), "bits.png": _plot_bits(results),
                "consistency.png": _plot_consistency(results)}


def _layer_sizes(model: nn.Module) -> dict[str, int]:
    """Weights per Conv2d/Linear layer (the sizes the budget averages over; biases are not counted)."""
    return {n: m.weight.numel() for n, m in weight_layers(model)}


# ============================================================================================ claims
def _claims(c1: list[dict[str, Any]], c2: list[dict[str, Any]], cons: Mapping[str, Any],
            c2_qat: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Claims 1–3 for the paper's criterion; claims ``2+``/``3+`` the same for our local-gain variant where it ran
    (a point without ``criterion`` is the paper's, as in results written before the variant existed)."""
    out: dict[str, Any] = {
        "1": {"claim": "an adversarially trained model loses more robust accuracy to post-training quantization",
              "points": c1, "verdict": verdict([(c["holds"], c["holds"] and significant(c)) for c in c1])}}
    for crit, suffix in zip(OURS, ("", "+")):
        pts = [c for c in c2 if c.get("criterion", "lipschitz") == crit]
        qat = [c for c in (c2_qat or []) if c.get("criterion", "lipschitz") == crit]
        rhos = {p: c["spearman"].get(crit) for p, c in cons.items()}
        if suffix and not pts and all(r is None for r in rhos.values()):
            continue
        # a parent counts for claim 3 only where ρ is positive *and* significant: ρ = +0.02 (p = 0.9) is no ranking
        sig3 = [r["rho"] is not None and r["rho"] > 0 and r["p"] is not None and r["p"] < ALPHA
                for r in rhos.values() if r is not None]
        name = CLAIM_NAMES[crit]
        out["2" + suffix] = {
            "claim": f"{name} allocation beats uniform, HAWQ and random at equal budget on robust accuracy",
            "criterion": crit, "points": pts, "verdict": verdict([(c["holds"], significant(c)) for c in pts]),
            "qat_points": qat, "qat_verdict": verdict([(c["holds"], significant(c)) for c in qat]) if qat
            else "not measured"}
        out["3" + suffix] = {
            "claim": f"the {name} criterion ranks single-layer settings as their measured adversarial loss does",
            "criterion": crit, "spearman": rhos,
            "verdict": verdict([(ok, ok) for ok in sig3]) if all(r is not None for r in rhos.values())
            else "not measured"}
    return out


# ============================================================================================ report
def _drop(v: float) -> str:
    return f"{100 * v:+.1f}"


def _report(res: Mapping[str, Any]) -> str:
    s = res["settings"]
    b = s["budget"]
    names = parent_names(res)
    qat = s.get("qat") or {}
    srcs = s.get("parents") or {}
    loaded = {p: v["checkpoint"] for p, v in srcs.items() if v.get("checkpoint")}
    if loaded:
        trained = [PARENT_NAMES[p] for p in PARENTS if p not in loaded]
        def role(p: str) -> str:  # a parent trained otherwise than its role says (FGSM-RS as the robust one)
            got = ((srcs[p].get("objective") or {}).get("name"))
            return (f" (trained with {got}, not {ROLE_OBJECTIVES[p]}: it stands in the {PARENT_NAMES[p]} role, and the "
                    f"tables and figures call it {names[p]})" if names[p] != PARENT_NAMES[p] else "")

        origin = ("Parents from checkpoints: " + "; ".join(f"{PARENT_NAMES[p]} `{v}`{role(p)}"
                                                             for p, v in loaded.items())
                  + (f"; {', '.join(trained)} trained here ({s['fit']['epochs']} epochs on {s['n_train']} "
                     "training images)" if trained else "") + ".")
    else:
        origin = (f"Two parents of the same architecture from the same initialisation, {s['fit']['epochs']} epochs "
                  f"on {s['n_train']} training images: natural (cross-entropy) and PGD-AT ({b['at_steps']} steps, "
                  f"ε = {s['eps']:.4g}).")
    cap = (qat.get("fit") or {}).get("max_batches")
    ft = (f"Part 2 also fine-tunes every allocation for {qat['epochs']} epoch(s)"
          + (f" of {cap} batches" if cap else "") + f" ({qat['objective']}, lr {qat['fit']['lr']:g}, batch "
          f"{qat['fit']['batch_size']}) and reports both. Calibration uses " if qat.get("epochs") else
          "Everything below is **post-training** quantization (no fine-tune); calibration uses ")
    L = [f"# Layer-wise adversarial-aware quantization study — {s['dataset']}, {s['model']}\n",
         f"{origin} {ft}"
         f"{s['n_calib']} training images; evaluation the first {s['n_eval']} test images at L∞ ε = {s['eps']:.4g}. "
         f"Wall time {res['wall_time_s']:.0f} s on {s['threads']} thread(s)"
         f"{' (quick budgets)' if s['quick'] else ''}.\n",
         "## Part 1 — uniform post-training quantization of each parent\n",
         f"Robust accuracy: PGD-{b['pgd_steps']} (α = ε/4, straight-through gradients through the quantizers). "
         "Accuracies in %, drops in points from the float parent (positive = lost).\n"]
    p1 = res["part1"]
    head = ["parent", "mode", "bits", "clean", "clean drop", "robust", "robust drop"]
    rows = []
    for p, d in p1.items():
        rows.append([names[p], "float", "32", pct(d["float_clean"]), "", pct(d["float_robust"]), ""])
        rows += [[names[p], MODES[r["mode"]], r["bits"], pct(r["clean"]), _drop(r["clean_drop"]),
                  pct(r["robust"]), _drop(r["robust_drop"])] for r in d["rows"]]
    L += md_table(head, rows)
    L.append("\n![part 1](part1.png)\n")
    L.append("## Part 2 — per-layer bit allocation at equal budgets (weights only, activations float)\n")
    clips = s.get("clips") or ["max"]
    if clips != ["max"]:
        L.append(f"Candidate settings per layer: bits {s['candidates']} × clipping rules {clips} (a cell "
                 "`3·mse` is 3 bits with the grid clipped at the MSE-optimal fraction of max|w|; plain bits = "
                 "max-|w| grid).\n")
    L.append(f"Worst case = per-sample worst of the standard suite: APGD-CE and APGD-T ({b['apgd_iter']} iterations "
             f"each, straight-through gradients), then Square ({b['square_queries']} queries). The columns per "
             "attack are cumulative (robust after that attack). Float parents: "
             + "; ".join(f"{names[p]} clean {pct(v['clean'])} %, worst case {pct(v['worst'])} %"
                         + (f" (after the same fine-tune as the allocations, unquantized: clean "
                            f"{pct(v['qat']['clean'])} %, worst case {pct(v['qat']['worst'])} %)" if "qat" in v else "")
                         for p, v in res["float_standard"].items()) + ".\n")
    if any("qat" in v for v in res["float_standard"].values()):
        L.append("The fine-tuned float parent is the control for the fine-tuned allocations: an allocation that ends "
                 "above its float parent owes at least the float parent's own gain to the extra training, not to "
                 "the quantization.\n")
    layers = list(s["layers"])
    for p in PARENTS:
        for budget in s["budgets"]:
            rs = [r for r in res["part2"] if r["parent"] == p and r["budget"] == budget]
            if not rs:
                continue
            L.append(f"### {names[p]} parent, budget {budget:g} bits\n")
            labels = list(rs[0]["after"])
            has_qat = all("qat" in r for r in rs)
            head = ["method", *layers, "avg bits", "size (KiB)", "clean", *labels, "**worst case**"]
            if has_qat:
                head += ["QAT clean", "**QAT worst case**"]
            L += md_table(head, [[r["method"], *(_cell(r, n) for n in layers), f"{r['average_bits']:.2f}",
                                  f"{r['size_bits'] / 8192:.2f}", pct(r["clean"]),
                                  *(pct(r["after"][k]) for k in labels), f"**{pct(r['worst'])}**",
                                  *([pct(r["qat"]["clean"]), f"**{pct(r['qat']['worst'])}**"] if has_qat else [])]
                                 for r in rs])
            L.append("")
    L.append(f"Layer sizes (weights): {', '.join(f'{n} {v:,}' for n, v in s['layers'].items())}.\n")
    L.append("![bits per layer](bits.png)\n")
    L.append("## Consistency of the criteria\n")
    L.append(f"Every single-layer setting (one layer at b ∈ {s['candidates']} bits"
             + (f", clipping {clips}" if clips != ["max"] else "") + ", the rest float): the method's "
             f"cost against the measured increase of the adversarial loss (mean cross-entropy under "
             f"PGD-{b['consistency_steps']} on the "
             + (f"first {b['consistency_images']} " if b.get("consistency_images") else "")
             + "test images, minus the float parent's; a negative increase means "
             "PGD with straight-through gradients found weaker examples on the quantized network than on the float "
             "one). Spearman's ρ over all settings (uniform and random have no criterion of their own):\n")
    ms = sorted({m for c in res["consistency"].values() for m in c["spearman"]}, key=list(METHODS).index)
    L += md_table(["parent", *ms], [[names[p], *(_rho(c["spearman"][m]) for m in ms)]
                                    for p, c in res["consistency"].items()])
    if any(c.get("clip_agreement") for c in res["consistency"].values()):
        any_c = next(c for c in res["consistency"].values() if c.get("clip_agreement"))
        chance = next(iter(any_c["clip_agreement"].values()))["chance"]
        L.append(f"\nClip agreement — of the (layer, bits) pairs, how often the method's cheapest clipping rule is "
                 f"the one with the least measured loss increase (chance {chance:.2f}):\n")
        L += md_table(["parent", *ms], [[names[p], *(
            f"{c['clip_agreement'][m]['agree']}/{c['clip_agreement'][m]['n']}" for m in ms)]
            for p, c in res["consistency"].items()])
    L.append("\n![consistency](consistency.png)\n")
    L.append("## Claims\n")
    c = res["claims"]
    L.append(f"1. *{c['1']['claim']}* — **{c['1']['verdict']}**. Robust drop PGD-AT vs natural (McNemar on the "
             "per-sample lost masks): " + "; ".join(
                 f"{MODES[q['mode']]} {q['bits']} bits {_drop(q['at_drop'])} vs {_drop(q['natural_drop'])} "
                 f"({paired_text(q, signed=True)})" for q in c["1"]["points"]) + ".")
    for k in (k for k in ("2", "3", "2+", "3+") if k in c):
        if k.startswith("2"):
            L.append(f"{k}. *{c[k]['claim']}* — **{c[k]['verdict']}**. " + ("; ".join(
                f"{names[q['parent']]} {q['budget']:g} bits vs {q['baseline']}: {pct(q['lipschitz'])} vs "
                f"{pct(q['other'])} % ({paired_text(q, signed=True)})" for q in c[k]["points"]) or "not measured")
                + ".")
            if c[k].get("qat_points"):
                L.append(f"   After the fine-tune — **{c[k]['qat_verdict']}**. " + "; ".join(
                    f"{names[q['parent']]} {q['budget']:g} bits vs {q['baseline']}: {pct(q['lipschitz'])} vs "
                    f"{pct(q['other'])} % ({paired_text(q, signed=True)})" for q in c[k]["qat_points"]) + ".")
        else:
            L.append(f"{k}. *{c[k]['claim']}* — **{c[k]['verdict']}**: "
                     + "; ".join(f"{names[p]} {_rho(r)}" for p, r in c[k]["spearman"].items()) + ".")
    n = s["n_eval"]
    L.append(f"\nWith {n} test samples one accuracy has a standard error of about {100 * math.sqrt(0.25 / n):.1f} "
             "points; paired differences are judged by an exact McNemar test at α = 0.05 (a claim is *reproduced* "
             "when it holds at every point and significantly at one at least)."
             + ("" if qat.get("epochs") else " Post-training only: the short quantization-aware fine-tune of "
                "docs/layerwise.md is not part of this run.") + "\n")
    return "\n".join(L)


def _cell(r: Mapping[str, Any], layer: str) -> str:
    clip = (r.get("clip") or {}).get(layer, "max")
    return f"{r['bits'][layer]}" if clip == "max" else f"{r['bits'][layer]}·{clip}"


def _rho(r: Mapping[str, Any] | None) -> str:
    if r is None or r["rho"] is None:
        return "—"
    return f"ρ = {r['rho']:+.2f} (p = {r['p']:.2g}, n = {r['n']})"


# ============================================================================================ figures
def _plot_part1(res: Mapping[str, Any]) -> Any:
    fig = new_figure((9, 6))
    axes = fig.subplots(2, 2, sharex=True, squeeze=False)
    for j, mode in enumerate(MODES):
        for i, (key, what) in enumerate((("clean_drop", "clean"), ("robust_drop", "robust"))):
            ax = axes[i, j]
            for k, (p, d) in enumerate(res["part1"].items()):
                rows = sorted((r for r in d["rows"] if r["mode"] == mode), key=lambda r: -r["bits"])
                ax.plot([r["bits"] for r in rows], [100 * r[key] for r in rows], marker="os"[k % 2],
                        label=f"{parent_names(res)[p]} (float {pct(d['float_' + what])} %)")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(res["settings"]["bits"])
            ax.set_xlim(max(res["settings"]["bits"]) + 0.5, min(res["settings"]["bits"]) - 0.5)  # fewer bits →
            ax.set_title(f"{MODES[mode]}: {what} accuracy lost", fontsize=9)
            ax.set_ylabel("points lost vs float parent")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("bits")
    fig.tight_layout()
    return fig


def _plot_bits(res: Mapping[str, Any]) -> Any:
    s = res["settings"]
    layers = list(s["layers"])
    budgets = s["budgets"]
    fig = new_figure((max(4.2, 0.32 * len(layers)) * len(budgets), (3.2 if len(layers) <= 6 else 4.2) * len(PARENTS)))
    axes = fig.subplots(len(PARENTS), len(budgets), squeeze=False, sharey=True)
    for i, p in enumerate(PARENTS):
        for j, budget in enumerate(budgets):
            ax = axes[i, j]
            rs = [r for r in res["part2"] if r["parent"] == p and r["budget"] == budget]
            w = 0.8 / max(len(rs), 1)
            for k, r in enumerate(rs):
                ax.bar([li + k * w - 0.4 + w / 2 for li in range(len(layers))], [r["bits"][n] for n in layers],
                       width=w, color=f"C{k}", label=f"{r['method']} ({pct(r['worst'])} %"
                       + (f" → QAT {pct(r['qat']['worst'])} %)" if "qat" in r else ")"))
            if len(layers) > 6:  # a deep network: names and sizes upright, one per bar group
                ax.set_xticks(range(len(layers)), [f"{n} ({s['layers'][n]:,})" for n in layers], fontsize=6,
                              rotation=90)
            else:
                ax.set_xticks(range(len(layers)), [f"{n}\n{s['layers'][n]:,}" for n in layers], fontsize=7)
            ax.set_yticks([2, 3, 4, 5, 6, 8])
            ax.set_title(f"{parent_names(res)[p]} parent, budget {budget:g} bits", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=6, title="method (worst-case robust" + (", post-training → fine-tuned)" if any(
                "qat" in r for r in rs) else ")"), title_fontsize=6, loc="upper left",
                      ncol=2)
            ax.set_ylim(0, 11.5)
            if j == 0:
                ax.set_ylabel("weight bits")
    fig.tight_layout()
    return fig


def _plot_consistency(res: Mapping[str, Any]) -> Any:
    """Criterion against measured adversarial-loss increase, one panel per parent and criterion of ours. Few
    layers: a colour per layer in the legend; many (a ResNet): colour = depth on a colour bar, so that no legend
    of dozens of entries covers the points."""
    import matplotlib as mpl  # deferred, as in qrobust.report

    cons = res["consistency"]
    clips = res["settings"].get("clips") or ["max"]
    markers = dict(zip(clips, "o^sDvP"))
    crits = [m for m in OURS if any(m in st["cost"] for c in cons.values() for st in c["settings"])] or ["lipschitz"]
    fig = new_figure((4.5 * len(cons), 3.8 * len(crits)))
    axes = fig.subplots(len(crits), len(cons), squeeze=False)
    for i, crit in enumerate(crits):
        for ax, (p, c) in zip(axes[i], cons.items()):
            layers = list(dict.fromkeys(st["layer"] for st in c["settings"]))
            deep = len(layers) > 8
            cmap = mpl.colormaps["viridis"]
            for k, layer in enumerate(layers):
                colour = cmap(k / max(len(layers) - 1, 1)) if deep else f"C{k % 10}"
                for clip in clips:
                    pts = [st for st in c["settings"] if st["layer"] == layer and st.get("clip", "max") == clip
                           and crit in st["cost"]]
                    label = None if deep else (layer if len(clips) == 1 else f"{layer}, {clip}")
                    xs = [max(st["cost"][crit], 1e-12) for st in pts]
                    ax.scatter(xs, [st["loss_increase"] for st in pts], color=colour, marker=markers[clip],
                               label=label, s=22)
                    for st, xv in zip(pts, xs):
                        ax.annotate(str(st["bits"]), (xv, st["loss_increase"]), fontsize=6, xytext=(3, 2),
                                    textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel(f"{CLAIM_NAMES[crit]} criterion c_l(b) (log)")
            ax.set_ylabel("adversarial loss increase")
            ax.set_title(f"{parent_names(res)[p]} parent, {CLAIM_NAMES[crit]}:\n{_rho(c['spearman'].get(crit))}",
                         fontsize=8)
            ax.grid(alpha=0.3)
            if deep:
                sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, len(layers) - 1))
                fig.colorbar(sm, ax=ax, label="layer (0 = first)", pad=0.01)
                if len(clips) > 1:
                    for clip in clips:
                        ax.scatter([], [], color="grey", marker=markers[clip], label=f"clip {clip}")
                    ax.legend(fontsize=7, title="labels: bits", title_fontsize=7, loc="best")
            else:
                ax.legend(fontsize=6 if len(clips) > 1 else 7, ncol=1 if len(clips) == 1 else 2,
                          title="layer (labels: bits)" if len(clips) == 1 else "layer, clip (labels: bits)",
                          title_fontsize=7)
    fig.tight_layout()
    return fig
