"""Rendering of evaluation results: report JSON → Markdown and PNG plots; adversarial examples → files.

Everything here works from the report's plain data (the dict :meth:`RobustnessReport.to_dict` returns, i.e.
the content of ``report.json``), so a saved report can be re-rendered without re-running anything::

    data = json.loads(Path("runs/eval/report.json").read_text())
    save_report(data, "runs/eval")

Plots use matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend change), so they
work on machines without a display; :func:`new_figure` and :func:`save_figure` are that recipe for other
rooms' figures (the studies use them).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qrobust.analysis.diagnostics import CHECKS
from qrobust.errors import InputError
from qrobust.figures import new_figure, save_figure
from qrobust.utils import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ACCURACY_PNG = "accuracy_vs_eps.png"  # an ε sweep: accuracy against ε
BY_ATTACK_PNG = "accuracy_by_attack.png"  # one ε: a bar per attack
EXAMPLES_NAME = "adversarial_examples"


# ---------------------------------------------------------------------------------------------- writing
def _as_dict(report: Any) -> dict[str, Any]:
    if isinstance(report, Mapping):
        return dict(report)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    raise InputError(f"expected a RobustnessReport or its dict, got {type(report).__name__}")


def plot_name(report: Any) -> str:
    """The plot's file name says what it shows: ``accuracy_vs_eps.png`` for an ε sweep,
    ``accuracy_by_attack.png`` for a single ε (a bar per attack)."""
    return ACCURACY_PNG if len(_as_dict(report).get("results", [])) > 1 else BY_ATTACK_PNG


def save_report(report: Any, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plot (:func:`plot_name`) into ``out_dir`` (created)."""
    data = _as_dict(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": atomic_write_text(out / REPORT_JSON, json.dumps(data, indent=2, allow_nan=False) + "\n")}
    name = plot_name(data)
    paths["plot"] = plot_accuracy(data, out / name)
    paths["markdown"] = atomic_write_text(out / REPORT_MD, render_markdown(data, plot=name))
    return paths


# --------------------------------------------------------------------------------------------- markdown
def _pct(v: Any) -> str:
    return "–" if v is None else f"{100.0 * float(v):.2f}%"


def _eps(v: float, norm: str) -> str:
    if norm == "Linf":
        k = v * 255
        if k >= 1 and abs(k - round(k)) < 1e-6:
            return f"{v:.4g} ({int(round(k))}/255)"
    return f"{v:.4g}"


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return lines


def render_markdown(report: Any, *, plot: str | None = "auto") -> str:
    """The report as Markdown: headline, **Diagnostics** (right after it), per-ε attack tables, settings.
    ``plot``: the figure's file name to link (``"auto"``: :func:`plot_name`; ``None``: no figure)."""
    d = _as_dict(report)
    if plot == "auto":
        plot = plot_name(d)
    norm = d.get("threat_model", "Linf")
    results = d.get("results", [])
    diags = d.get("diagnostics", [])
    flagged = [g for g in diags if g.get("flagged")]
    lines = [f"# Robustness report: {d.get('model')} ({d.get('bits_str', 'float')})", ""]
    lines.append(
        f"Dataset **{d.get('dataset')}**, threat model **{norm}**, n = {d.get('n_examples')} examples, "
        f"suite `{d.get('suite')}`, gradients `{d.get('gradients')}`, seed {d.get('seed')}."
    )
    lines.append("")
    rows = [[_eps(r["eps"], norm), _pct(d.get("clean_acc")), f"**{_pct(r['robust_accuracy'])}**"]
            for r in results]
    lines += _table(["ε", "clean accuracy", "robust accuracy (worst case over all attacks)"], rows)
    lines.append("")

    lines += ["## Diagnostics", ""]
    if not diags:
        lines.append("Diagnostics were not run (`diagnostics=False`): the numbers above are unchecked for "
                     "gradient masking.")
    elif flagged:
        names = ", ".join(dict.fromkeys(g["name"] for g in flagged))
        lines.append(f"**WARNING: {len(flagged)} gradient-masking flag(s) raised ({names}).** The robust "
                     f"accuracy above may overestimate the model's robustness; read the evidence below.")
    else:
        lines.append("No gradient-masking flag raised.")
    if diags:
        lines.append("")
        drows = []
        for g in diags:
            status = "ok" if g.get("checked", True) else "not checked"
            status = "**FLAGGED**" if g.get("flagged") else status
            eps = "all" if g.get("eps") is None else _eps(g["eps"], norm)
            drows.append([_title(g["name"]), eps, status, g.get("evidence", "")])
        lines += _table(["check", "ε", "status", "evidence"], drows)
    lines.append("")

    lines += ["## Attacks", ""]
    lines.append("Attacks run in the order listed; each attacks only the samples no earlier attack broke, "
                 "unless it is run on all clean-correct samples (then its own robust accuracy is known). "
                 "*Worst case after* is the robust accuracy over that attack and every one before it.")
    lines.append("")
    for r in results:
        lines.append(f"### ε = {_eps(r['eps'], norm)}")
        lines.append("")
        arows = []
        for a in r.get("attacks", []):
            kind = "black-box" if a.get("black_box") else "white-box"
            run_on = f"all ({a['n_attacked']})" if a.get("individual") else f"survivors ({a['n_attacked']})"
            arows.append([f"`{a['label']}`", kind, a.get("gradients") or "–", run_on,
                          _pct(a.get("robust_accuracy")), _pct(a.get("robust_accuracy_after")),
                          a.get("n_broken"), f"{a.get('time_s', 0.0):.1f} s"])
        lines += _table(["attack", "kind", "gradients", "run on", "own robust acc", "worst case after",
                         "newly broken", "time"], arows)
        if r.get("n_inherited"):
            lines.append("")
            lines.append(f"{r['n_inherited']} sample(s) broken at a smaller ε count as broken here and were "
                         f"not attacked again.")
        lines.append("")
    if plot:
        alt = "robust accuracy by attack" if plot == BY_ATTACK_PNG else "accuracy vs ε"
        lines += [f"![{alt}]({plot})", ""]

    lines += ["## Attack settings", ""]
    per_label: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        for a in r.get("attacks", []):
            per_label.setdefault(a["label"], []).append(
                {k: v for k, v in a.get("settings", {}).items() if k != "eps"})
    for label, dicts in per_label.items():
        shown: dict[str, Any] = {}
        for key in dict.fromkeys(k for s in dicts for k in s):
            vals = [s.get(key) for s in dicts]
            if all(json.dumps(v, sort_keys=True) == json.dumps(vals[0], sort_keys=True) for v in vals):
                shown[key] = vals[0]
            else:
                shown[key] = "per ε: " + ", ".join(
                    f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals)
        lines.append(f"- `{label}`: `{json.dumps(shown, sort_keys=True, ensure_ascii=False)}`")
    lines.append("")
    settings = d.get("settings") or {}
    if settings:
        lines.append("Evaluation settings: `" + json.dumps(settings, sort_keys=True) + "`")
        lines.append("")

    lines += ["## Environment", ""]
    versions = d.get("versions", {})
    env = [[", ".join(f"{k} {v}" for k, v in versions.items()), f"{d.get('wall_time_s', 0.0):.1f} s",
            d.get("created", ""), d.get("parent") or "–"]]
    lines += _table(["versions", "wall time", "created", "parent (transfer source)"], env)
    lines.append("")
    if d.get("bits"):
        lines.append("Quantization: `" + json.dumps(d["bits"], sort_keys=True) + "`")
        lines.append("")
    return "\n".join(lines)


def _title(name: str) -> str:
    return CHECKS.get(name, name)


# ------------------------------------------------------------------------------------------------ plots
def plot_accuracy(report: Any, path: str | os.PathLike) -> Path:
    """Accuracy vs ε per attack (own robust accuracy where known, else the worst case after it, dashed),
    the headline worst case and the clean accuracy. With a single ε, a bar chart per attack."""
    d = _as_dict(report)
    norm = d.get("threat_model", "Linf")
    results = sorted(d.get("results", []), key=lambda r: r["eps"])
    clean = 100.0 * float(d.get("clean_acc", 0.0))
    path = Path(path)
    title = f"{d.get('model')} ({d.get('bits_str', 'float')}) on {d.get('dataset')}, {norm}"
    if len(results) <= 1:
        fig = new_figure((6.4, 0.45 * (len(results[0]["attacks"]) if results else 1) + 2.0))
        ax = fig.add_subplot(1, 1, 1)
        names, vals, colors = ["clean"], [clean], ["0.6"]
        if results:
            for a in results[0]["attacks"]:
                own = a.get("robust_accuracy")
                names.append(a["label"] + ("" if own is not None else " (worst case after)"))
                vals.append(100.0 * float(own if own is not None else a["robust_accuracy_after"]))
                colors.append("tab:orange" if a.get("black_box") else "tab:blue")
            names.append("worst case")
            vals.append(100.0 * float(results[0]["robust_accuracy"]))
            colors.append("black")
        ys = list(range(len(names)))[::-1]
        ax.barh(ys, vals, color=colors)
        ax.set_yticks(ys)
        ax.set_yticklabels(names)
        for yv, v in zip(ys, vals):
            ax.text(v + 1, yv, f"{v:.1f}%", va="center", fontsize=8)
        ax.set_xlim(0, 110)
        ax.set_xlabel("accuracy (%)")
        eps_txt = _eps(results[0]["eps"], norm) if results else "?"
        ax.set_title(f"{title}, ε = {eps_txt}", fontsize=9)
    else:
        fig = new_figure((6.4, 4.2))
        ax = fig.add_subplot(1, 1, 1)
        xs = [r["eps"] * (255 if norm == "Linf" else 1) for r in results]
        labels = list(dict.fromkeys(a["label"] for r in results for a in r["attacks"]))
        for label in labels:
            pts, dashed = [], False
            for xv, r in zip(xs, results):
                a = next((a for a in r["attacks"] if a["label"] == label), None)
                if a is None:
                    continue
                own = a.get("robust_accuracy")
                if own is None:
                    dashed, own = True, a["robust_accuracy_after"]
                pts.append((xv, 100.0 * float(own)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        ls="--" if dashed else "-", label=label + (" (worst case after)" if dashed else ""))
        ax.plot([0.0, *xs], [clean] + [100.0 * r["robust_accuracy"] for r in results], color="black", lw=2.2,
                marker="s", ms=4, label="worst case")
        ax.axhline(clean, color="0.5", ls=":", label="clean")
        ax.set_xlabel("ε (×1/255)" if norm == "Linf" else "ε (L2)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


DEPLOYED_PNG = "deployed_vs_simulated.png"


def plot_deployed(comparison: Any, path: str | os.PathLike) -> Path:
    """Re-verification (:class:`~qrobust.evaluation.DeployedComparison` or its ``to_dict()``): a pair of bars per
    row (clean, each attack, worst case; per ε) — the deployed graph and its simulation — with the gap in points,
    a flagged gap marked."""
    d = comparison.to_dict() if hasattr(comparison, "to_dict") else dict(comparison)
    rows = d["rows"]
    several = len({r["eps"] for r in rows if r["attack"] != "clean"}) > 1
    names = [r["attack"] + (f" (ε {r['eps']:.4g})" if several and r["attack"] != "clean" else "") for r in rows]
    fig = new_figure((6.8, 0.55 * len(rows) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(rows)))[::-1]
    h = 0.38
    dep = [100.0 * r["deployed"] for r in rows]
    sim = [100.0 * r["simulated"] for r in rows]
    ax.barh([y + h / 2 for y in ys], dep, height=h, color="tab:red", label="deployed (onnxruntime)")
    ax.barh([y - h / 2 for y in ys], sim, height=h, color="tab:blue", label="simulated (fake-quant twin)")
    for y, r, a, b in zip(ys, rows, dep, sim):
        flag = "  ⚠ flagged" if r["flagged"] else ""
        ax.text(max(a, b) + 1, y, f"{a:.1f} vs {b:.1f}% ({100 * r['gap']:+.1f}){flag}", va="center", fontsize=7,
                color="darkred" if r["flagged"] else "black")
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, 135)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("accuracy (%) on the same points")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    dev = d.get("deployed", {})
    ax.set_title(f"Deployed vs simulated: {dev.get('model', '?')} on {dev.get('dataset', '?')}, "
                 f"{rows[0]['n']} points (gaps above {100 * d.get('gap_flag', 0.01):g} point flagged)", fontsize=8)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------- adversarial images
def _check_examples(x: Any, x_adv: Any, y: Any, pred_clean: Any, pred_adv: Any) -> None:
    for name, t in (("x", x), ("x_adv", x_adv)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
            got = getattr(t, "shape", type(t).__name__)
            raise InputError(f"{name} must be a float tensor N×C×H×W, got {got}")
    if x.shape != x_adv.shape:
        raise InputError(f"x {tuple(x.shape)} and x_adv {tuple(x_adv.shape)} must have the same shape")
    for name, t in (("y", y), ("pred_clean", pred_clean), ("pred_adv", pred_adv)):
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],) or t.is_floating_point():
            raise InputError(f"{name} must be integer labels of shape ({x.shape[0]},), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")


def _image(t: torch.Tensor) -> tuple[Any, str | None]:
    """C×H×W in [0, 1] → an array imshow takes, and a colormap for single channels."""
    t = t.detach().float().clamp(0, 1).cpu()
    if t.shape[0] == 3:
        return t.permute(1, 2, 0).numpy(), None
    return (t[0] if t.shape[0] == 1 else t.mean(0)).numpy(), "gray"


def save_adversarial_examples(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    pred_clean: torch.Tensor,
    pred_adv: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    max_images: int = 16,
    name: str = EXAMPLES_NAME,
    classes: list[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``{name}.safetensors`` (all of x, x_adv, y, pred_clean, pred_adv) and ``{name}.png``: a grid
    of up to ``max_images`` columns — originals, perturbations (amplified, centred at mid-gray) and
    adversarial examples — showing first the samples the attack flipped from right to wrong.

    ``metadata`` (JSON-serialisable, e.g. ``{"attack": ..., "eps": ...}``) is stored in the safetensors
    header under ``"qrobust"`` together with counts and the largest L∞/L2 perturbation.
    """
    from safetensors.torch import save_file

    _check_examples(x, x_adv, y, pred_clean, pred_adv)
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise InputError(f"max_images must be a positive integer, got {max_images!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, x_adv = x.detach().cpu().float(), x_adv.detach().cpu().float()
    y, pc, pa = y.detach().cpu().long(), pred_clean.detach().cpu().long(), pred_adv.detach().cpu().long()
    delta = x_adv - x
    flat = delta.reshape(delta.shape[0], -1)
    fooled = (pc == y) & (pa != y)
    info = {
        "format": "qrobust-adversarial/1",
        "n": int(x.shape[0]),
        "clean_correct": int((pc == y).sum()),
        "adversarial_correct": int((pa == y).sum()),
        "fooled": int(fooled.sum()),
        "linf_max": float(flat.abs().amax()) if flat.numel() else 0.0,
        "l2_max": float(flat.norm(dim=1).max()) if flat.numel() else 0.0,
        **dict(metadata or {}),
    }
    tensors = {"x": x.contiguous(), "x_adv": x_adv.contiguous(), "y": y.contiguous(),
               "pred_clean": pc.contiguous(), "pred_adv": pa.contiguous()}
    header = {"qrobust": json.dumps(info, default=str)}
    st_path = atomic_write(out / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp, metadata=header))

    order = torch.cat([fooled.nonzero().squeeze(1), (~fooled).nonzero().squeeze(1)])[:max_images]
    k = int(order.numel())
    amax = float(delta[order].abs().max()) if k else 0.0
    gain = 0.5 / amax if amax > 0 else 1.0
    fig = new_figure((1.25 * max(k, 1) + 1.2, 4.4))
    axes = fig.subplots(3, max(k, 1), squeeze=False)

    def cls(i: int) -> str:
        return classes[i] if classes and 0 <= i < len(classes) else str(i)

    row_names = ["original", f"perturbation ×{gain:.3g}", "adversarial"]
    for col in range(max(k, 1)):
        for row in range(3):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(row_names[row], fontsize=8)
        if col >= k:
            continue
        i = int(order[col])
        for row, img in enumerate((x[i], (delta[i] * gain + 0.5), x_adv[i])):
            arr, cmap = _image(img)
            axes[row][col].imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axes[0][col].set_title(f"#{i} y={cls(int(y[i]))}\npred {cls(int(pc[i]))}", fontsize=7)
        color = "red" if bool(fooled[i]) else "black"
        axes[2][col].set_title(f"pred {cls(int(pa[i]))}", fontsize=7, color=color)
    linf = info["linf_max"]
    fig.suptitle(f"{info['fooled']} of {info['n']} flipped; max L∞ {linf:.4g}"
                 + (f" ({linf * 255:.1f}/255)" if not math.isclose(linf, 0.0) else ""), fontsize=9)
    png_path = save_figure(fig, out / f"{name}.png")
    return {"safetensors": st_path, "png": png_path}
