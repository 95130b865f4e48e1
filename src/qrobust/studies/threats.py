"""``qrobust study threats``: quantization and adversarial threat models across precisions (Bernhard, Moëllic &
Dutertre 2019, arXiv 1909.12741), and the precision-diverse defenses built on them, attacked adaptively.

**The family.** One float parent (ReLU6) is trained; every other bit-width of ``bits`` (8 → ``w8a8``; 1 → a
binary network, :func:`qrobust.studies.odgq.spec_for_bits`) is a copy of it fine-tuned quantization-aware.
``32`` in ``bits`` is the parent itself (every claim compares against it, so it is required).

**What is measured** on the first ``n_eval`` test images, L∞ at ``eps``:

1. the **transfer matrix** (:func:`qrobust.analysis.transfer_matrix`): PGD with straight-through gradients
   crafted on every model, scored on every model on the points both classify correctly;
2. **value shift** per quantized model (:func:`qrobust.analysis.value_shift`: per layer, the fraction of
   activations whose bucket differs between the float copy and the quantized network on clean input, their
   relative L2 distance, and the fraction changed by the model's own PGD examples) and **gradient alignment**
   float vs each (:func:`qrobust.analysis.gradient_alignment`, per-sample cosine of input gradients);
3. the **masking table**: per model, the same points under PGD with native gradients, straight-through (ste),
   BPDA, the float parent as surrogate, gradient-free Square and SPSA, and PGD transfer from the float
   parent — each attack's own robust accuracy and the per-sample worst case over all of them;
4. an **EMPIR-style ensemble** (float + the two lowest non-binary bit-widths, vote) attacked naively (FGSM
   and PGD on the vote itself) and adaptively (:func:`qrobust.defenses.adaptive_suite`), and
   **RandomPrecision** over the quantized bit-widths (:class:`qrobust.defenses.RandomPrecision`, fine-tuned
   from the parent with random-precision training) attacked naively (PGD on random draws, one prediction)
   and adaptively (EOT PGD, APGD-CE on the exact expectation, Square; a point counts only if ``repeats``
   predictions are all right).

**Claims** (the paper's four findings, judged from the numbers; paired comparisons by the exact McNemar test
of :func:`~qrobust.studies.harness.paired_test`):

a. quantization gives no real robustness — each quantized model's worst case (gradient-free included) is not
   significantly above the float parent's, while its native-gradient number is inflated;
b. gradient masking at low bits (≤ 2) — native-gradient PGD leaves ≥ :data:`MASKING_GAP` more robust accuracy
   than the worst case;
c. poor transfer across precisions — transfer from the float parent leaves more robust accuracy than the
   model's own straight-through PGD (paired, per quantized model), explained by value shift growing and
   gradient alignment falling as bits fall;
d. precision diversity fools naive attacks only — each defense's naive robust accuracy is significantly
   above its adaptive one, and the adaptive one is not significantly above the best single member's worst
   case.

The shared parts — budgets, resumption, statistics, figures and the report folder — are
:mod:`qrobust.studies.harness`'s; this file is the study's science. Outputs in ``out``: ``report.md``,
``results.json``, ``transfer_matrix.png``, ``gradient_alignment.png``, ``masking.png`` and the run folders.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust._version import __version__
from qrobust.analysis import TransferMatrix, gradient_alignment, plot_alignment, transfer_matrix, value_shift
from qrobust.attacks import PGD
from qrobust.data import load_dataset
from qrobust.defenses import Ensemble, RandomPrecision, RandomPrecisionTraining, adaptive_suite
from qrobust.errors import ConfigError
from qrobust.evaluation import evaluate
from qrobust.evaluation.results import str_mask
from qrobust.models import build_model
from qrobust.quant import quantize
from qrobust.studies.harness import (
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
    run_study,
    significant,
    verdict,
)
from qrobust.studies.odgq import spec_for_bits
from qrobust.training import FitConfig
from qrobust.validation import check_eps

log = logging.getLogger(__name__)

__all__ = ["DATASET_DEFAULTS", "MASKING_GAP", "MASKING_LABELS", "ThreatModels", "run_threats_study"]

FORMAT = "qrobust-threats-study/1"
#: claim (b): native-gradient robust accuracy at least this far above the worst case counts as masking
MASKING_GAP = 0.10
#: bit-widths claim (b) calls "low"
LOW_BITS = 2
#: the masking table's columns, in order
MASKING_LABELS = ("native", "ste", "bpda", "surrogate", "square", "spsa", "transfer")

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"eps": 0.1, "float_epochs": 15, "epochs": 3, "lr": 0.05, "ft_lr": 0.01, "batch_size": 128,
               "n_eval": 300},
    "mnist": {"eps": 0.2, "float_epochs": 3, "epochs": 1, "lr": 0.05, "ft_lr": 0.01, "batch_size": 128,
              "n_eval": 1000},
    "cifar10": {"eps": 8 / 255, "float_epochs": 30, "epochs": 5, "lr": 0.1, "ft_lr": 0.01, "batch_size": 128,
                "n_eval": 1000},
}
_FALLBACK = {"model": "resnet20", "eps": 8 / 255, "float_epochs": 10, "epochs": 3, "lr": 0.05, "ft_lr": 0.01,
             "batch_size": 128, "n_eval": 500}


@dataclasses.dataclass
class _Budget:
    pgd_steps: int = 20
    apgd_iter: int = 50
    square_queries: int = 1000
    spsa_steps: int = 30
    spsa_samples: int = 32
    eot_samples: int = 3
    repeats: int = 5


_QUICK = _Budget(pgd_steps=5, apgd_iter=10, square_queries=100, spsa_steps=5, spsa_samples=8, eot_samples=2,
                 repeats=2)


def _name(bits: int) -> str:
    return "float" if bits == 32 else f"w{bits}a{bits}"


# ============================================================================================ measurements
def _masking_suite(b: _Budget, parent: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    pgd = {"steps": b.pgd_steps, "alpha": "eps/4", "individual": True}
    return [
        ("pgd", {**pgd, "gradients": "native", "label": "native"}),
        ("pgd", {**pgd, "gradients": "ste", "label": "ste"}),
        ("pgd", {**pgd, "gradients": "bpda", "label": "bpda"}),
        ("pgd", {**pgd, "gradients": "surrogate", "surrogate": parent, "label": "surrogate"}),
        ("square", {"n_queries": b.square_queries, "individual": True, "black_box": True, "label": "square"}),
        ("spsa", {"steps": b.spsa_steps, "nb_samples": b.spsa_samples, "individual": True, "black_box": True,
                  "label": "spsa"}),
        ("transfer", {"source": parent, "attack": "pgd", "steps": b.pgd_steps, "alpha": "eps/4", "individual": True,
                      "black_box": True, "label": "transfer"}),
    ]


def _masking_row(model: nn.Module, parent: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, b: _Budget,
                 seed: int) -> dict[str, Any]:
    rep = evaluate(model, (x, y), suite=_masking_suite(b, parent), eps=eps, seed=seed, diagnostics=False)
    r = rep.result(eps)
    return {"clean": rep.clean_accuracy, "attacks": {a.label: a.robust_accuracy for a in r.attacks},
            "masks": {a.label: a.robust for a in r.attacks}, "worst": r.robust_accuracy, "worst_mask": r.robust,
            "time_s": rep.wall_time_s}


def _defense_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, suite: Sequence[Any], seed: int,
                  repeats: int = 1) -> dict[str, Any]:
    rep = evaluate(model, (x, y), suite=list(suite), eps=eps, seed=seed, diagnostics=False, repeats=repeats)
    r = rep.result(eps)
    return {"clean": rep.clean_accuracy, "robust": r.robust_accuracy, "mask": r.robust, "repeats": repeats,
            "attacks": {a.label: {"broken": a.n_broken, "after": a.robust_accuracy_after} for a in r.attacks},
            "time_s": rep.wall_time_s}


def _shift_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        v = [r[key] for r in rows if r.get(key) is not None]
        return statistics.fmean(v) if v else None

    return {"float_vs_quant": mean("float_vs_quant"), "rel_l2_float_vs_quant": mean("rel_l2_float_vs_quant"),
            "clean_vs_adv": mean("clean_vs_adv")}


# ============================================================================================ the study
@register_study
class ThreatModels(Study):
    """The threat-model study (module docstring) as a :class:`~qrobust.studies.harness.Study`."""

    name = "threats"
    summary = ("threat models across precisions (Bernhard et al.): transfer, value shift, gradient alignment, "
               "masking, and precision-diverse defenses naive vs adaptive")
    format = FORMAT
    budget = _Budget()
    quick_budget = _QUICK
    options = (
        *(o for o in TRAINING_OPTIONS if o.flag != "--epochs"),
        Option("--epochs", "int", "epochs of each quantization-aware fine-tune from the float parent, and of the "
                                  "random-precision one (default per dataset)"),
        Option("--bits", "int_list", "bit-widths, 32 (the float parent) included, e.g. 32,8,4,2,1 (1 = binary)"),
        Option("--eps", "eps255", "L∞ ε on the 0–255 scale (default per dataset)"),
        Option("--float-epochs", "int", "epochs of the float parent (default per dataset)"),
        Option("--lr", "float", "learning rate of the float parent (default per dataset)"),
        Option("--parent", "str", "the float parent from this checkpoint (not trained here; e.g. a layerwise "
                                  "study's runs/float-natural)"),
    )

    def run(
        self,
        ctx: StudyContext,
        *,
        dataset: str,
        data_dir: str | Path | None = None,
        model: str | None = None,
        bits: Sequence[int] = (32, 8, 4, 2, 1),
        eps: float | None = None,
        epochs: int | None = None,
        float_epochs: int | None = None,
        lr: float | None = None,
        n_eval: int | None = None,
        n_train: int | None = None,
        bf16: bool = False,
        parent: str | Path | None = None,
    ) -> dict[str, Any]:
        """See :func:`run_threats_study`."""
        budget, seed = ctx.budget, ctx.seed
        bits_l = [int(b) for b in bits]
        if len(set(bits_l)) != len(bits_l):
            raise ConfigError(f"bits must be distinct bit-widths, got {list(bits)}")
        if 32 not in bits_l:
            raise ConfigError(f"bits must include 32 (the float parent every claim compares against), got "
                              f"{bits_l}; e.g. --bits 32,8,4,2,1")
        qbits = sorted((b for b in bits_l if b != 32), reverse=True)
        if not qbits:
            raise ConfigError("bits must include at least one quantized bit-width besides 32, e.g. 32,4,2")
        specs = {b: spec_for_bits(b) for b in [32, *qbits]}
        d = dataset_defaults(DATASET_DEFAULTS, dataset, _FALLBACK)
        if ctx.quick:
            d.update(float_epochs=max(2, d["float_epochs"] // 3), epochs=1, n_eval=min(d["n_eval"], 64))
        eps_v = check_eps(d["eps"] if eps is None else eps, "Linf", positive=True)
        model_name = model or d["model"]
        root = None if data_dir is None else Path(data_dir)
        train = load_dataset(dataset, "train", root=root)
        test = load_dataset(dataset, "test", root=root)
        if n_train is not None:
            train = train.subset(n_train, seed=seed)
        info = test.info
        x, y = test.tensors(n_eval or d["n_eval"])
        float_cfg = FitConfig(epochs=float_epochs or d["float_epochs"], batch_size=d["batch_size"], lr=lr or d["lr"],
                              seed=seed, bf16=bf16)
        ft_cfg = dataclasses.replace(float_cfg, epochs=epochs or d["epochs"], lr=d["ft_lr"])

        # ---- the family: one float parent, a quantization-aware fine-tuned copy per bit-width
        check_parent_path("--parent", parent)

        def build() -> nn.Module:
            torch.manual_seed(seed)
            c, h, _ = info.input_shape
            return build_model(model_name, num_classes=info.num_classes, in_channels=c, input_size=h,
                               activation="relu6", mean=list(info.mean), std=list(info.std))

        meta = {"dataset": dataset, "study": "threats"}
        parent_ckpt = parent
        parent, parent_source = ctx.parent("float", parent_ckpt, build, train, objective="ce", config=float_cfg,
                                           dataset=dataset, model=model, metadata=meta)
        model_name = parent_source.get("model") or model_name
        models: dict[str, nn.Module] = {"float": parent}
        for b in qbits:
            log.info("fine-tuning %s from the float parent", specs[b])
            q = quantize(copy.deepcopy(parent), specs[b])
            models[_name(b)] = ctx.fit(_name(b), q, train, objective="ce", config=ft_cfg, metadata=meta).model

        # ---- 1. transfer matrix
        log.info("transfer matrix")
        tm = transfer_matrix(models, x, y, eps=eps_v, attack_kwargs={"steps": budget.pgd_steps}, seed=seed)

        # ---- 2. value shift and gradient alignment
        shift: dict[str, Any] = {}
        align: dict[str, Any] = {}
        for b in qbits:
            q = models[_name(b)]
            adv = PGD(q, eps=eps_v, steps=budget.pgd_steps, seed=seed)(x, y)
            rows = value_shift(q, x, adv)
            shift[_name(b)] = {"layers": rows, **_shift_summary(rows)}
            cos = gradient_alignment(parent, q, x, y)
            fin = cos[~cos.isnan()]
            align[_name(b)] = {"median": float(fin.median()) if fin.numel() else None, "n_nan": int(cos.isnan().sum()),
                               "cosine": [round(float(v), 4) for v in fin]}

        # ---- 3. masking table
        masking: dict[str, Any] = {}
        for name, m in models.items():
            log.info("masking table: %s", name)
            masking[name] = _masking_row(m, parent, x, y, eps_v, budget, seed)

        # ---- 4. precision-diverse defenses
        defenses: dict[str, Any] = {}
        low = [b for b in qbits if b != 1][-2:] if len([b for b in qbits if b != 1]) >= 2 else qbits[-2:]
        if len(low) == 2:
            members = {"float": parent, **{_name(b): models[_name(b)] for b in low}}
            ens = Ensemble(members, combine="vote")
            log.info("ensemble %s: naive and adaptive", list(members))
            pgd = {"steps": budget.pgd_steps, "alpha": "eps/4"}
            defenses["ensemble"] = {
                "members": list(members),
                "naive": _defense_eval(ens, x, y, eps_v, [("fgsm", {"label": "fgsm[vote]"}),
                                                          ("pgd", {**pgd, "label": "pgd[vote]"})], seed),
                "adaptive": _defense_eval(ens, x, y, eps_v, adaptive_suite(
                    ens, n_iter=budget.apgd_iter, n_queries=budget.square_queries,
                    transfer_steps=budget.pgd_steps), seed),
            }
        else:
            log.warning("the ensemble needs two quantized bit-widths; only %s given, so it is not measured", qbits)
        # binary left out where two other bit-widths remain (as in the ensemble, EMPIR and Double-Win Quant): a
        # binary draw's clean errors would decide the repeated-prediction worst case before any attack does
        rp_bits = [b for b in qbits if b != 1] if len([b for b in qbits if b != 1]) >= 2 else list(qbits)
        if len(rp_bits) < 2:
            log.warning("RandomPrecision needs two quantized bit-widths; only %s given, so it is not measured", qbits)
        else:
            log.info("RandomPrecision%s: random-precision fine-tuning, then naive and adaptive", tuple(rp_bits))
            torch.manual_seed(seed)
            rp = RandomPrecision(copy.deepcopy(parent), bits=rp_bits, seed=seed)
            rp = ctx.fit("random-precision", rp, train, objective=RandomPrecisionTraining("ce"), config=ft_cfg,
                         metadata=meta).model
            defenses["random_precision"] = {
                "members": [_name(b) for b in rp_bits],
                "naive": _defense_eval(rp, x, y, eps_v, [("pgd", {"steps": budget.pgd_steps, "alpha": "eps/4",
                                                                  "label": "pgd[one draw]"})], seed),
                "adaptive": _defense_eval(rp, x, y, eps_v, [
                    ("pgd", {"steps": budget.pgd_steps, "alpha": "eps/4", "eot_samples": budget.eot_samples,
                             "label": f"pgd[eot-{budget.eot_samples}]"}),
                    ("apgd-ce", {"n_iter": budget.apgd_iter, "gradients": "surrogate",
                                 "surrogate": rp.as_ensemble(), "label": "apgd-ce[expectation]"}),
                    ("square", {"n_queries": budget.square_queries, "label": "square"})],
                    seed, repeats=budget.repeats),
            }

        results = {
            "study": "threats",
            "format": FORMAT,
            "settings": {"dataset": dataset, "model": model_name, "eps": eps_v, "bits": [32, *qbits],
                         "specs": {_name(b): specs[b] for b in [32, *qbits]}, "float_fit": float_cfg.to_dict(),
                         "fine_tune_fit": ft_cfg.to_dict(), "parent": parent_source, "n_train": len(train),
                         "n_eval": len(y),
                         "quick": ctx.quick, "seed": seed, "threads": ctx.threads,
                         "budget": dataclasses.asdict(budget)},
            "transfer": tm.to_dict(),
            "value_shift": shift,
            "alignment": align,
            "masking": masking,
            "defenses": defenses,
            "versions": {"qrobust": __version__, "torch": torch.__version__},
        }
        results["claims"] = _claims(results, qbits)
        return results

    def render(self, results: Mapping[str, Any]) -> str:
        return _report(results)

    def figures(self, results: Mapping[str, Any]) -> dict[str, Any]:
        tm = TransferMatrix.from_dict(results["transfer"])
        s = results["settings"]
        title = f"{s['dataset']}: robust accuracy (%) under PGD-{s['budget']['pgd_steps']} transfer, ε = {s['eps']:.3g}"
        cos = {f"float vs {k}": torch.tensor(v["cosine"]) for k, v in results["alignment"].items()}
        return {"transfer_matrix.png": _Deferred(lambda p: tm.plot(p, title=title)),
                "gradient_alignment.png": _Deferred(lambda p: plot_alignment(
                    cos, p, title=f"{s['dataset']}: input-gradient cosine, float parent vs each quantized copy")),
                "masking.png": _plot_masking(results)}


class _Deferred:
    """A figure drawn by a function that writes its own PNG (:meth:`TransferMatrix.plot`,
    :func:`plot_alignment`), in the shape :func:`~qrobust.report.save_figure` takes (``savefig(path)``)."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw

    def savefig(self, path: str, **_: Any) -> None:
        self.draw(path)


STUDY = ThreatModels()


def run_threats_study(**settings: Any) -> dict[str, Any]:
    """Run the study (module docstring) and write its report folder ``out``; returns ``results.json``'s dict.

    ``bits`` — bit-widths, 32 (the float parent) included (1 = binary); ``eps`` (L∞, a fraction of the pixel
    range), ``float_epochs`` and ``lr`` (the parent), ``epochs`` (each quantization-aware fine-tune and the
    random-precision one) and ``n_eval`` default per dataset (:data:`DATASET_DEFAULTS`); ``n_train`` trains on
    a random subset; ``budget`` overrides attack budgets by name (``{"square_queries": 300, "repeats": 3}``);
    ``parent`` — a float checkpoint of this dataset to use as the parent instead of training one
    (:meth:`~qrobust.studies.harness.StudyContext.parent`); ``out``, ``quick``, ``resume``, ``seed`` and
    ``threads`` are the harness's (:func:`~qrobust.studies.harness.run_study`).
    """
    return run_study(STUDY, **settings)


# ============================================================================================ claims
def _monotone(values: Sequence[float | None], *, rising: bool) -> bool | None:
    """Whether ``values`` (ordered by falling bits) rise (fall) throughout; None with fewer than two."""
    v = [x for x in values if x is not None]
    if len(v) < 2:
        return None
    return all((b >= a) if rising else (b <= a) for a, b in zip(v, v[1:]))


def _trend(flag: bool | None, yes: str, no: str) -> str:
    return "not measured (one quantized bit-width)" if flag is None else yes if flag else no


def _claims(res: Mapping[str, Any], qbits: Sequence[int]) -> dict[str, Any]:
    mk = res["masking"]
    fl = str_mask(mk["float"]["worst_mask"])
    a_rows, b_rows, c_rows = [], [], []
    for b in qbits:
        n = _name(b)
        row = mk[n]
        worst = str_mask(row["worst_mask"])
        native = str_mask(row["masks"]["native"])
        t_up = paired_test(worst, fl)  # quantized more robust than float?
        a_rows.append({"bits": b, "worst": row["worst"], "float_worst": mk["float"]["worst"],
                       "native": row["attacks"]["native"], "inflation": row["attacks"]["native"] - row["worst"],
                       **t_up, "holds": not significant(t_up), "inflation_test": paired_test(native, worst)})
        t_mask = paired_test(native, worst)
        gap = row["attacks"]["native"] - row["worst"]
        b_rows.append({"bits": b, "native": row["attacks"]["native"], "worst": row["worst"], "gap": gap, **t_mask,
                       "holds": gap >= MASKING_GAP, "low": b <= LOW_BITS})
        t_tr = paired_test(str_mask(row["masks"]["transfer"]), str_mask(row["masks"]["ste"]))
        c_rows.append({"bits": b, "transfer": row["attacks"]["transfer"], "ste": row["attacks"]["ste"],
                       "gap": row["attacks"]["transfer"] - row["attacks"]["ste"], **t_tr,
                       "holds": t_tr["only_a"] > t_tr["only_b"]})
    shift_l2 = [res["value_shift"][_name(b)]["rel_l2_float_vs_quant"] for b in qbits]
    shift_bk = [res["value_shift"][_name(b)]["float_vs_quant"] for b in qbits]
    med = [res["alignment"][_name(b)]["median"] for b in qbits]
    tm = res["transfer"]
    names = tm["names"]
    off_low = [tm["robust"][i][j] for i, s in enumerate(names) for j, t in enumerate(names)
               if i != j and (s in _low_names(qbits) or t in _low_names(qbits)) and tm["robust"][i][j] is not None]
    off_high = [tm["robust"][i][j] for i, s in enumerate(names) for j, t in enumerate(names)
                if i != j and s not in _low_names(qbits) and t not in _low_names(qbits)
                and tm["robust"][i][j] is not None]
    diag = [tm["robust"][i][i] for i in range(len(names)) if tm["robust"][i][i] is not None]
    out: dict[str, Any] = {
        "a": {"rows": a_rows, "verdict": verdict([(r["holds"], significant(r["inflation_test"])) for r in a_rows])},
        "b": {"rows": b_rows, "verdict": verdict([(r["holds"], significant(r)) for r in b_rows if r["low"]])},
        "c": {"rows": c_rows, "verdict": verdict([(r["holds"], significant(r)) for r in c_rows]),
              "diagonal_mean": statistics.fmean(diag) if diag else None,
              "off_diagonal_low_mean": statistics.fmean(off_low) if off_low else None,
              "off_diagonal_high_mean": statistics.fmean(off_high) if off_high else None,
              "value_shift_rel_l2": shift_l2, "value_shift_buckets": shift_bk, "alignment_median": med,
              "value_shift_grows": _monotone(shift_l2, rising=True),
              "alignment_falls": _monotone(med, rising=False)},
    }
    d_rows = []
    for key, dfn in res["defenses"].items():
        nv, ad = str_mask(dfn["naive"]["mask"]), str_mask(dfn["adaptive"]["mask"])
        best = max(dfn["members"], key=lambda m: mk[m]["worst"])
        t_na = paired_test(nv, ad)
        t_bm = paired_test(ad, str_mask(mk[best]["worst_mask"]))
        d_rows.append({"defense": key, "naive": dfn["naive"]["robust"], "adaptive": dfn["adaptive"]["robust"],
                       "best_member": best, "best_member_worst": mk[best]["worst"],
                       "naive_vs_adaptive": t_na, "adaptive_vs_best_member": t_bm,
                       "holds_naive": significant(t_na), "holds_adaptive": not significant(t_bm)})
    points = []
    for r in d_rows:
        points.append((r["naive"] > r["adaptive"], r["holds_naive"]))
        points.append((r["holds_adaptive"], False))
    out["d"] = {"rows": d_rows, "verdict": verdict(points)}
    return out


def _low_names(qbits: Sequence[int]) -> list[str]:
    return [_name(b) for b in qbits if b <= LOW_BITS]


# ============================================================================================ report
CLAIM_TEXT = {
    "a": "quantization gives no real robustness: each quantized model's worst case (gradient-free attacks "
         "included) is not significantly above the float parent's, while its native-gradient number is higher",
    "b": f"gradient masking at low bits (≤ {LOW_BITS}): native-gradient PGD leaves ≥ {100 * MASKING_GAP:.0f} "
         "points more robust accuracy than the worst case",
    "c": "poor transfer across precisions: PGD transferred from the float parent leaves more robust accuracy "
         "than the model's own straight-through PGD; value shift grows and gradient alignment falls as bits fall",
    "d": "an ensemble of precisions (EMPIR vote; random precision) resists naive attacks only: naive robust "
         "accuracy significantly above adaptive, adaptive not significantly above the best member's worst case (for "
         "random precision, whose precisions share one network, the family's fixed-precision models stand in)",
}
DEFENSE_NAMES = {"ensemble": "EMPIR-style ensemble (vote)", "random_precision": "RandomPrecision"}


def _p(v: float | None) -> str:
    return pct(v, missing="–")


def _report(res: Mapping[str, Any]) -> str:
    s, b = res["settings"], res["settings"]["budget"]
    names = res["transfer"]["names"]
    L = [f"# Threat models across precisions — {s['dataset']}, {s['model']}\n",
         "Bernhard, Moëllic & Dutertre (2019) on one float parent ("
         + (f"from the checkpoint `{s['parent']['checkpoint']}`" if (s.get("parent") or {}).get("checkpoint") else
            f"ReLU6, {s['float_fit']['epochs']} epochs, lr {s['float_fit']['lr']:g}")
         + f") and its quantization-aware copies fine-tuned {s['fine_tune_fit']['epochs']} "
         f"epoch(s) at lr {s['fine_tune_fit']['lr']:g}: "
         + ", ".join(f"{n} = `{sp}`" for n, sp in s["specs"].items())
         + f". {s['n_train']} training images; {s['n_eval']} test images under L∞ ε = {s['eps']:.4g} "
         f"({255 * s['eps']:.3g}/255). Budgets: PGD-{b['pgd_steps']} (α = ε/4), Square {b['square_queries']} "
         f"queries, SPSA {b['spsa_steps']} steps × {b['spsa_samples']} samples, APGD {b['apgd_iter']} iterations, "
         f"EOT {b['eot_samples']} draws, {b['repeats']} repeated predictions for the randomized defense. Wall "
         f"time {res['wall_time_s']:.0f} s on {s['threads']} thread(s){' (quick budgets)' if s['quick'] else ''}."
         "\n",
         "Accuracies in %. Every robust number is on all evaluated images (a misclassified clean image counts as "
         "broken); a worst case is per sample over every attack of its row and includes gradient-free ones.\n",
         "## 1. Transfer matrix\n",
         "PGD with straight-through gradients crafted on the row's model, scored on the column's, on the points "
         "both classify correctly (n beside each cell in the heat map); the diagonal is the white-box attack.\n"]
    tm = res["transfer"]
    L += md_table(["crafted on ↓ / attacked →", *names],
                  [[src, *(_p(v) for v in row)] for src, row in zip(names, tm["robust"])])
    L.append("\nClean accuracy: " + ", ".join(f"{n} {_p(tm['clean'][n])}" for n in names) + ".\n")
    L.append("![transfer matrix](transfer_matrix.png)\n")
    L.append("## 2. Value shift and gradient alignment\n")
    L.append("**value shift (buckets)** — mean over layers of the fraction of activations whose quantization "
             "bucket differs between the float copy and the quantized network on clean input; **(rel. L2)** — "
             "their relative L2 distance; **clean→adv** — fraction changed by the model's own PGD examples; "
             "**alignment** — median per-sample cosine of the input gradients, float parent vs the model.\n")
    L += md_table(["model", "value shift (buckets)", "value shift (rel. L2)", "clean→adv (buckets)",
                   "alignment (median cos)", "zero-gradient samples"],
                  [[n, _p(v["float_vs_quant"]), f"{v['rel_l2_float_vs_quant']:.3f}", _p(v["clean_vs_adv"]),
                    "–" if res["alignment"][n]["median"] is None else f"{res['alignment'][n]['median']:.3f}",
                    res["alignment"][n]["n_nan"]] for n, v in res["value_shift"].items()])
    L.append("\n![gradient alignment](gradient_alignment.png)\n")
    L.append("## 3. Masking table\n")
    L.append("The same points attacked per model: PGD with **native** gradients (what autograd gives through "
             "the quantizers), straight-through (**ste**), **bpda**, the float parent's gradients (**surrogate**), "
             "gradient-free **Square** and **SPSA**, and PGD **transfer** from the float parent; **worst** = "
             "per-sample worst case over all seven.\n")
    L += md_table(["model", "clean", *MASKING_LABELS, "**worst**"],
                  [[n, _p(r["clean"]), *(_p(r["attacks"][k]) for k in MASKING_LABELS), f"**{_p(r['worst'])}**"]
                   for n, r in res["masking"].items()])
    L.append("\n![masking](masking.png)\n")
    L.append("## 4. Precision-diverse defenses, naive vs adaptive\n")
    L.append("Naive: attacks on the defense as it presents itself (gradients through the vote; PGD on one random "
             "precision per step, one prediction). Adaptive: the ensemble's averaged-softmax and mean-logit views "
             "(APGD-CE/-T), transfer from every member and Square; for random precision, PGD with gradients averaged "
             "over draws (EOT), APGD-CE on the exact expectation over precisions and Square. The binary network is "
             "left out of both defenses when two other bit-widths remain. **broken** = points an attack broke that "
             "were robust until then.\n")
    if not res["defenses"]:
        L.append("Not measured (needs two quantized bit-widths).\n")
    for key, dfn in res["defenses"].items():
        rep = dfn["adaptive"]["repeats"]
        L.append(f"**{DEFENSE_NAMES[key]}** over {', '.join(dfn['members'])}: naive — clean "
                 f"{_p(dfn['naive']['clean'])}, robust {_p(dfn['naive']['robust'])}; adaptive — clean "
                 f"{_p(dfn['adaptive']['clean'])}, robust **{_p(dfn['adaptive']['robust'])}**"
                 + (f" (a point counts only if all {rep} repeated predictions are right)" if rep > 1 else "") + ".\n")
        rows = [[f"naive: {lab}", v["broken"], _p(v["after"])] for lab, v in dfn["naive"]["attacks"].items()]
        rows += [[f"adaptive: {lab}", v["broken"], _p(v["after"])] for lab, v in dfn["adaptive"]["attacks"].items()]
        L += md_table(["attack", "broken", "robust after"], rows)
        L.append("")
    L.append("## Claims (the paper's findings)\n")
    c = res["claims"]
    L.append(f"**(a)** {CLAIM_TEXT['a']} — **{c['a']['verdict']}**.\n")
    L += md_table(["model", "worst", "float worst", "native", "native − worst", "worst vs float (McNemar)"],
                  [[_name(r["bits"]), _p(r["worst"]), _p(r["float_worst"]), _p(r["native"]),
                    f"{100 * r['inflation']:+.1f}", paired_text(r, signed=True)] for r in c["a"]["rows"]])
    L.append(f"\n**(b)** {CLAIM_TEXT['b']} — **{c['b']['verdict']}**.\n")
    L += md_table(["model", "native", "worst", "gap", "native vs worst (McNemar)", "judged"],
                  [[_name(r["bits"]), _p(r["native"]), _p(r["worst"]), f"{100 * r['gap']:+.1f}",
                    paired_text(r, signed=True), "yes" if r["low"] else "no (> 2 bits)"] for r in c["b"]["rows"]])
    cc = c["c"]
    L.append(f"\n**(c)** {CLAIM_TEXT['c']} — transfer **{cc['verdict']}**; value shift (rel. L2) "
             f"{_trend(cc['value_shift_grows'], 'grows', 'does not grow monotonically')} as bits fall "
             f"({', '.join(f'{v:.3f}' for v in cc['value_shift_rel_l2'])}); gradient alignment "
             f"{_trend(cc['alignment_falls'], 'falls', 'does not fall monotonically')} "
             f"({', '.join('–' if v is None else f'{v:.3f}' for v in cc['alignment_median'])}). Transfer matrix: "
             f"diagonal mean {_p(cc['diagonal_mean'])}, off-diagonal cells touching ≤ {LOW_BITS} bits "
             f"{_p(cc['off_diagonal_low_mean'])}, other off-diagonal cells {_p(cc['off_diagonal_high_mean'])}.\n")
    L += md_table(["model", "transfer from float", "own ste PGD", "gap", "transfer vs ste (McNemar)"],
                  [[_name(r["bits"]), _p(r["transfer"]), _p(r["ste"]), f"{100 * r['gap']:+.1f}",
                    paired_text(r, signed=True)] for r in cc["rows"]])
    L.append(f"\n**(d)** {CLAIM_TEXT['d']} — **{c['d']['verdict']}**.\n")
    if c["d"]["rows"]:
        L += md_table(["defense", "naive", "adaptive", "naive vs adaptive (McNemar)", "best member (worst)",
                       "adaptive vs best member (McNemar)"],
                      [[DEFENSE_NAMES[r["defense"]], _p(r["naive"]), _p(r["adaptive"]),
                        paired_text(r["naive_vs_adaptive"], signed=True),
                        f"{r['best_member']} ({_p(r['best_member_worst'])})",
                        paired_text(r["adaptive_vs_best_member"], signed=True)] for r in c["d"]["rows"]])
    n = s["n_eval"]
    L.append(f"\nWith {n} test images one accuracy has a standard error of about {100 * math.sqrt(0.25 / n):.1f} "
             "points; paired differences are judged by an exact McNemar test (α = 0.05). A verdict is *reproduced* "
             "when the claim holds at every bit-width (defense) and significantly at one at least.\n")
    return "\n".join(L)


def _plot_masking(res: Mapping[str, Any]) -> Any:
    rows = res["masking"]
    labels = ["clean", *MASKING_LABELS, "worst"]
    fig = new_figure((9, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(rows)
    for j, (name, r) in enumerate(rows.items()):
        vals = [r["clean"], *(r["attacks"][k] for k in MASKING_LABELS), r["worst"]]
        ax.bar([i + j * w for i in range(len(labels))], [100 * v for v in vals], width=w, label=name,
               color=f"C{j}")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{res['settings']['dataset']}: the same points under each attack, ε = {res['settings']['eps']:.3g}",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=len(rows), loc="upper right")
    fig.tight_layout()
    return fig
