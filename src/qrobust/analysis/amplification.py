"""Error amplification: how an adversarial perturbation grows through the activations of a network.

Lin, Gan & Han (2019) explain why quantized networks are less robust than their float parents: a small
input perturbation grows layer by layer, and once it pushes activations across quantization-bucket
boundaries the rounding *amplifies* it instead of removing it. This module measures exactly that.

For clean inputs ``x`` and adversarial ``x′``, at every activation module (``nn.ReLU``/``nn.ReLU6`` or
their ``QuantAct`` replacements, in forward order — :func:`qrobust.models.activation_modules`):

* ``rel_l2`` — the mean over samples of ``‖f_l(x′) − f_l(x)‖₂ / ‖f_l(x)‖₂`` (samples whose clean
  activation is all zero are left out; ``n_zero`` counts them), and ``rel_l2_total``, the same ratio over
  the whole batch at once;
* ``bucket_change`` — the fraction of activations whose quantization bucket differs between ``x`` and
  ``x′``. The bucket of a pre-activation ``z`` on the b-bit grid of the "clip" scheme is
  ``round(clamp(z, 0, α)·(2^b − 1)/α)``, computed with the quantizer's own arithmetic
  (:func:`qrobust.quant.functional.clip_act_quantize`), so it is the level the layer outputs. A
  ``QuantAct`` uses its own bits and α (PACT: its learned α; sign activations: the sign). A float
  activation has no buckets unless ``bits=`` is given: then it is bucketed on that grid with ``alpha=``
  (default: the layer's ReLU6 range, 6, also for ReLU) — so a float model can be compared with a
  quantized one on the same grid. ``force_grid=True`` applies ``bits``/``alpha`` to ``QuantAct`` layers
  too.

>>> import torch
>>> from torch import nn
>>> from qrobust.quant import QuantAct
>>> net = nn.Sequential(QuantAct(2, clip=3.0))
>>> x, x_adv = torch.tensor([[0.4, 1.2, 2.6, 9.0]]), torch.tensor([[0.6, 1.6, 2.4, 8.0]])
>>> row = amplification(net, x, x_adv)[0]
>>> row["bucket_change"], round(row["rel_l2"] ** 2 * 19, 6)     # buckets 0,1,3,3 → 1,2,2,3
(0.75, 3.0)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust.attacks import FGSM, PGD
from qrobust.errors import ConfigError, InputError
from qrobust.models.introspect import activation_modules
from qrobust.quant import functional as QF
from qrobust.quant.modes import quantization_disabled
from qrobust.quant.spec import check_bits
from qrobust.utils import atomic_write, atomic_write_text, eval_mode, model_device

log = logging.getLogger(__name__)

__all__ = [
    "ATTACKS",
    "amplification",
    "amplification_report",
    "amplification_summary",
    "amplification_sweep",
    "plot_amplification",
    "value_shift",
]

ATTACKS = ("pgd", "fgsm")


def _layer_grid(
    module: nn.Module, bits: int | None, alpha: float | None, force_grid: bool
) -> tuple[str, int | None, float | None]:
    """``(kind, bits, alpha)``: kind "clip" (bucket on [0, α] with 2^bits levels), "sign" or "none"."""
    q = getattr(module, "act_quant", None) if type(module).__name__ == "QuantAct" else None
    quant_on = q is not None and getattr(module, "quant_enabled", True) and getattr(q, "quant_enabled", True)
    if quant_on and not (force_grid and bits is not None):
        if q.scheme == "sign":
            return "sign", 1, None
        a = q.alpha
        return "clip", int(q.bits), float(a.detach()) if isinstance(a, torch.Tensor) else float(a)
    if bits is None:
        return "none", None, None
    if alpha is None:
        alpha = float(getattr(module, "clip", 6.0))  # a QuantAct's configured α; ReLU6's range otherwise
    return "clip", bits, float(alpha)


def _buckets(z: torch.Tensor, kind: str, bits: int | None, alpha: float | None) -> torch.Tensor:
    if kind == "sign":
        return z >= 0
    assert bits is not None and alpha is not None
    n = 2**bits - 1
    levels = QF.clip_act_quantize(z.float(), alpha, bits)
    return torch.round(levels / (alpha / n)).to(torch.int16)


@torch.no_grad()
def amplification(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    bits: int | None = None,
    alpha: float | None = None,
    force_grid: bool = False,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """One row per activation module: relative L2 distance and bucket-change fraction (module docstring).

    Row keys: ``index, name, type, rel_l2, rel_l2_total, n_zero, bucket_change`` (None without a grid),
    ``grid`` ("clip" | "sign" | None), ``bits, alpha, numel`` (activations per sample).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(x_adv, torch.Tensor) or x.shape != x_adv.shape:
        raise InputError(
            f"x and x_adv must be tensors of the same shape, got {getattr(x, 'shape', x)} and "
            f"{getattr(x_adv, 'shape', x_adv)}"
        )
    if len(x) == 0:
        raise InputError("x is empty: give at least one sample")
    if bits is not None:
        bits = check_bits(bits, name="bits")
        if bits == 32:
            bits = None
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a positive number (the clip level of the grid), got {alpha!r}")
    acts = activation_modules(model)
    if not acts:
        raise ConfigError(
            f"{type(model).__name__} has no activation modules (nn.ReLU/nn.ReLU6/QuantAct) to measure; "
            "build it with qrobust.models.build_model"
        )
    grids = [_layer_grid(m, bits, alpha, force_grid) for _, m in acts]
    return _compare_passes(model, acts, grids, x, x_adv, batch_size=batch_size)


def _compare_passes(
    model: nn.Module,
    acts: list[tuple[str, nn.Module]],
    grids: list[tuple[str, int | None, float | None]],
    x: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    batch_size: int,
    first_pass: Any = None,
) -> list[dict[str, Any]]:
    """The rows of :func:`amplification`: each activation's output under ``x`` and under ``x_adv``
    compared (relative L2, buckets on ``grids``). ``first_pass`` is a context-manager factory the ``x``
    pass runs in (``lambda: quantization_disabled(model)`` compares the float copy with the quantized one)."""
    k = len(acts)
    ratio_sum = [0.0] * k
    ratio_n = [0] * k
    n_zero = [0] * k
    d2 = [0.0] * k
    f2 = [0.0] * k
    changed = [0] * k
    total = [0] * k
    numel = [0] * k
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    idx_of = {id(m): i for i, (_, m) in enumerate(acts)}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        i = idx_of[id(mod)]
        if i not in captured:  # qrobust models call each activation once; keep the first call otherwise
            captured[i] = (args[0].detach(), out.detach())

    handles = [m.register_forward_hook(hook) for _, m in acts]
    device = model_device(model) if any(True for _ in model.parameters()) else x.device
    with eval_mode(model):
        try:
            for s in range(0, len(x), batch_size):
                xb = x[s : s + batch_size].to(device)
                xa = x_adv[s : s + batch_size].to(device)
                captured.clear()
                with first_pass() if first_pass is not None else contextlib.nullcontext():
                    model(xb)
                clean = dict(captured)
                captured.clear()
                model(xa)
                adv = dict(captured)
                for i in range(k):
                    if i not in clean or i not in adv:
                        continue
                    (zc, fc), (za, fa) = clean[i], adv[i]
                    fc_flat = fc.reshape(fc.shape[0], -1).double()
                    diff = fa.reshape(fa.shape[0], -1).double() - fc_flat
                    dn, fn = diff.norm(dim=1), fc_flat.norm(dim=1)
                    ok = fn > 0
                    ratio_sum[i] += float((dn[ok] / fn[ok]).sum())
                    ratio_n[i] += int(ok.sum())
                    n_zero[i] += int((~ok).sum())
                    d2[i] += float(dn.square().sum())
                    f2[i] += float(fn.square().sum())
                    numel[i] = fc_flat.shape[1]
                    kind, b, a = grids[i]
                    if kind != "none":
                        changed[i] += int((_buckets(zc, kind, b, a) != _buckets(za, kind, b, a)).sum())
                        total[i] += zc.numel()
        finally:
            for h in handles:
                h.remove()
    rows = []
    for i, (name, m) in enumerate(acts):
        kind, b, a = grids[i]
        rows.append({
            "index": i,
            "name": name,
            "type": type(m).__name__,
            "rel_l2": ratio_sum[i] / ratio_n[i] if ratio_n[i] else None,
            "rel_l2_total": math.sqrt(d2[i] / f2[i]) if f2[i] > 0 else None,
            "n_zero": n_zero[i],
            "bucket_change": changed[i] / total[i] if kind != "none" and total[i] else None,
            "grid": None if kind == "none" else kind,
            "bits": b,
            "alpha": a,
            "numel": numel[i],
        })
    return rows


@torch.no_grad()
def value_shift(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor | None = None, *, batch_size: int = 256
) -> list[dict[str, Any]]:
    """Quantization value shift (Bernhard et al. 2019), per activation layer of a quantized ``model``:

    * ``float_vs_quant`` — the fraction of activations whose quantization bucket differs between the float
      copy of the network (every quantizer off, :func:`qrobust.quant.quantization_disabled`) and the
      quantized network on the *same* input ``x``: how far quantization moves the values the layers see;
      ``rel_l2_float_vs_quant`` — the relative L2 distance of the two activations;
    * ``clean_vs_adv`` — with ``x_adv``, the fraction whose bucket changes between ``x`` and ``x_adv`` in the
      quantized network (:func:`amplification`'s ``bucket_change``).

    Buckets are each ``QuantAct``'s own grid, computed as in :func:`amplification` (one concept, one place).
    """
    acts = activation_modules(model)
    grids = [_layer_grid(m, None, None, False) for _, m in acts]
    if all(g[0] == "none" for g in grids):
        raise ConfigError(f"{type(model).__name__} has no quantized activations: value shift needs a "
                          f"quantized model (qrobust.quantize(model, 'w4a4'))")
    fq = _compare_passes(model, acts, grids, x, x, batch_size=batch_size,
                         first_pass=lambda: quantization_disabled(model))
    adv = amplification(model, x, x_adv, batch_size=batch_size) if x_adv is not None else None
    rows = []
    for i, r in enumerate(fq):
        rows.append({"index": r["index"], "name": r["name"], "bits": r["bits"], "alpha": r["alpha"],
                     "float_vs_quant": r["bucket_change"], "rel_l2_float_vs_quant": r["rel_l2"],
                     "clean_vs_adv": None if adv is None else adv[i]["bucket_change"]})
    return rows


def amplification_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``first``/``last`` layer's relative distance (None where that layer's clean activations are all zero),
    ``growth`` = last/first, and the mean and last-layer bucket-change fractions."""
    buckets = [r["bucket_change"] for r in rows if r.get("bucket_change") is not None]
    first, last = (rows[0].get("rel_l2"), rows[-1].get("rel_l2")) if rows else (None, None)
    return {
        "first_rel_l2": first,
        "last_rel_l2": last,
        "growth": last / first if first and last is not None else None,
        "mean_bucket_change": sum(buckets) / len(buckets) if buckets else None,
        "last_bucket_change": buckets[-1] if buckets else None,
    }


def _make_attack(name: str, model: nn.Module, eps: float, *, steps: int, seed: int, gradients: str) -> Any:
    if name == "fgsm":
        return FGSM(model, eps=eps, gradients=gradients, early_stop=False)
    return PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True, seed=seed, gradients=gradients,
               early_stop=False)


def amplification_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float],
    *,
    attack: str = "pgd",
    steps: int = 10,
    source: nn.Module | None = None,
    gradients: str = "ste",
    bits: int | None = None,
    alpha: float | None = None,
    force_grid: bool = False,
    seed: int = 0,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """:func:`amplification` at each ε, with L∞ adversarials from ``attack`` ("pgd": PGD-``steps``, α = ε/4,
    random start; "fgsm") crafted on ``source`` (default: the model itself, white-box) without early
    stopping, so every sample carries a full-budget perturbation.

    Returns one dict per ε: ``eps, attack, clean_accuracy, adv_accuracy, rows, summary``.
    """
    if attack not in ATTACKS:
        raise ConfigError(f"attack must be one of {ATTACKS}, got {attack!r}")
    if not len(eps_list):
        raise ConfigError("eps_list is empty: give at least one ε (fraction of the pixel range, e.g. 0.1)")
    src = source if source is not None else model
    out = []
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else x.device

    def acc(inp: torch.Tensor) -> float:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                preds = torch.cat([model(inp[s : s + batch_size].to(device)).argmax(1).cpu()
                                   for s in range(0, len(inp), batch_size)])
        finally:
            model.train(was)
        return float((preds == y.cpu()).float().mean())

    clean_acc = acc(x)
    for eps in eps_list:
        atk = _make_attack(attack, src, float(eps), steps=steps, seed=seed, gradients=gradients)
        x_adv = torch.cat([atk(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size)])
        rows = amplification(model, x, x_adv, bits=bits, alpha=alpha, force_grid=force_grid, batch_size=batch_size)
        out.append({
            "eps": float(eps),
            "attack": attack if attack == "fgsm" else f"pgd-{steps}",
            "white_box": source is None,
            "clean_accuracy": clean_acc,
            "adv_accuracy": acc(x_adv),
            "rows": rows,
            "summary": amplification_summary(rows),
        })
    return out


def _as_series(results: Any) -> list[tuple[str, float, list[Mapping[str, Any]]]]:
    series = []
    if isinstance(results, Mapping):
        for label, sweep in results.items():
            for r in sweep:
                series.append((str(label), float(r["eps"]), r["rows"]))
    else:
        for r in results:
            series.append((str(r.get("label", "")), float(r["eps"]), r["rows"]))
    return series


def plot_amplification(results: Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Layer index on x, relative L2 distance on y (log scale), one line per model and ε; a second panel
    with the bucket-change fraction when any row has one. ``results``: ``{label: amplification_sweep(...)}``
    or a list of ``{"label", "eps", "rows"}``. Written atomically as PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    series = _as_series(results)
    if not series:
        raise ConfigError("nothing to plot: results hold no sweep")
    has_buckets = any(r.get("bucket_change") is not None for _, _, rows in series for r in rows)
    fig, axes = plt.subplots(1, 2 if has_buckets else 1, figsize=(11 if has_buckets else 6, 4), squeeze=False)
    labels = sorted({s[0] for s in series}, key=[s[0] for s in series].index)
    eps_values = sorted({s[1] for s in series})
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for label, eps, rows in series:
        color = colors[labels.index(label) % len(colors)]
        ls = styles[eps_values.index(eps) % len(styles)]
        xs = [r["index"] for r in rows if r.get("rel_l2") is not None]
        ys = [max(r["rel_l2"], 1e-6) for r in rows if r.get("rel_l2") is not None]
        axes[0][0].plot(xs, ys, ls, color=color, marker="o", ms=3, label=f"{label} ε={eps:.3g}")
        if has_buckets:
            xb = [r["index"] for r in rows if r.get("bucket_change") is not None]
            yb = [r["bucket_change"] for r in rows if r.get("bucket_change") is not None]
            axes[0][1].plot(xb, yb, ls, color=color, marker="o", ms=3, label=f"{label} ε={eps:.3g}")
    first_rows = series[0][2]
    ticks = [r["index"] for r in first_rows]
    names = [r["name"] for r in first_rows]
    ax = axes[0][0]
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.2g}")  # 0.3, not 3×10⁻¹
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("‖f(x′) − f(x)‖₂ / ‖f(x)‖₂")
    # two small legends outside the panels — colour is the model, line style the ε — so none covers a curve
    model_handles = [Line2D([], [], color=colors[i % len(colors)], marker="o", ms=3, label=lab)
                     for i, lab in enumerate(labels)]
    eps_handles = [Line2D([], [], color="0.3", ls=styles[i % len(styles)], label=f"ε = {e:.3g}")
                   for i, e in enumerate(eps_values)]
    leg = fig.legend(handles=model_handles, title="model", fontsize=8, title_fontsize=8, loc="upper left",
                     bbox_to_anchor=(1.0, 0.95), frameon=False)
    fig.add_artist(leg)
    fig.legend(handles=eps_handles, title="attack radius", fontsize=8, title_fontsize=8, loc="lower left",
               bbox_to_anchor=(1.0, 0.1), frameon=False)
    if has_buckets:
        axes[0][1].set_ylabel("fraction of activations in another bucket")
        axes[0][1].set_ylim(bottom=0)
    for a in axes[0]:
        a.set_xlabel("activation layer (forward order)")
        a.set_xticks(ticks, names if len(ticks) <= 12 else [str(t) for t in ticks],
                     rotation=0 if len(ticks) <= 6 else 60, fontsize=8)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def amplification_report(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps_list: Sequence[float],
    out: str | os.PathLike | None = None,
    attack: str = "pgd",
    steps: int = 10,
    bits: int | None = None,
    alpha: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`amplification_sweep` for each named model (each attacked white-box); with ``out``, writes
    ``amplification.json`` and ``amplification.png`` there. ``bits``/``alpha`` set the grid of float
    activations (so float models get bucket statistics comparable with quantized ones).

    Returns ``{"eps", "attack", "bits", "alpha", "n", "models": {label: sweep}}``.
    """
    if not models:
        raise ConfigError("give at least one model to analyse")
    result: dict[str, Any] = {
        "eps": [float(e) for e in eps_list], "attack": attack, "steps": steps, "bits": bits, "alpha": alpha,
        "n": len(y), "seed": seed, "models": {},
    }
    for label, model in models.items():
        log.info("amplification: %s", label)
        result["models"][label] = amplification_sweep(
            model, x, y, eps_list, attack=attack, steps=steps, bits=bits, alpha=alpha, seed=seed
        )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "amplification.json", json.dumps(result, indent=2))
        plot_amplification(result["models"], out / "amplification.png",
                           title=f"error amplification ({attack}, n={len(y)})")
    return result
