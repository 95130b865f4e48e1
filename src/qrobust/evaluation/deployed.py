"""Re-verification: the same attacks on the deployed graph and on its simulation, on the same points.

:func:`reverify` evaluates a :class:`~qrobust.export.DeployedModel` (onnxruntime, no gradients) and its
fake-quant twin with one suite (:func:`deployed_suite`), each attack on every clean-correct point
(``individual``), same seed, same samples:

* ``square`` and ``spsa`` — score-based and gradient-free, run on the deployed graph itself;
* ``transfer-pgd[twin,ste]`` — PGD with straight-through gradients on the fake-quant twin, applied to the
  target (BPDA for a graph without gradients; on the twin itself it is plain white-box PGD);
* ``diva`` — DIVA (:class:`qrobust.attacks.DIVA`): maximise the disagreement between the float parent (or
  the twin with its quantizers off) and the target, crafted on the twin, judged on the target.

The comparison puts clean accuracy, each attack's robust accuracy and the per-point worst case side by side,
counts the points one model survives and the other does not (with an exact McNemar p on those discordant
points: a randomized attack's trajectory on two graphs that differ by rounding can diverge, so a small gap
may be chance), and flags every gap above :data:`GAP_FLAG` (1 point): a deployed model weaker than its
simulation means the verification of the simulation did not carry over to what ships.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import binomtest
from torch import nn

from qrobust.errors import ConfigError
from qrobust.evaluation.results import RobustnessReport, str_mask
from qrobust.evaluation.runner import evaluate
from qrobust.utils import atomic_write_text

__all__ = ["GAP_FLAG", "DeployedComparison", "deployed_suite", "reverify"]

log = logging.getLogger(__name__)

#: a deployed-vs-simulated robust-accuracy gap above this (a fraction: 1 point) is flagged
GAP_FLAG = 0.01


def deployed_suite(
    twin: nn.Module,
    *,
    parent: nn.Module | None = None,
    n_queries: int = 1000,
    spsa_steps: int = 20,
    spsa_samples: int = 64,
    steps: int = 20,
) -> list[tuple[str, dict[str, Any]]]:
    """The re-verification suite (see the module docstring): Square, SPSA, transfer from the twin, DIVA."""
    return [
        ("square", {"n_queries": n_queries, "label": "square", "individual": True}),
        ("spsa", {"steps": spsa_steps, "nb_samples": spsa_samples, "label": "spsa", "individual": True}),
        ("transfer", {"source": twin, "attack": "pgd", "steps": steps, "alpha": "eps/4", "gradients": "ste",
                      "label": "transfer-pgd[twin,ste]", "individual": True}),
        ("diva", {"twin": twin, "reference": parent, "steps": steps, "alpha": "eps/4",
                  "label": "diva[parent]" if parent is not None else "diva[twin-float]", "individual": True}),
    ]


@dataclass
class DeployedComparison:
    """Deployed and simulated reports of one :func:`reverify` and the side-by-side table rendered from them."""

    deployed: RobustnessReport
    simulated: RobustnessReport
    rows: list[dict[str, Any]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    agreement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "flags": self.flags, "gap_flag": GAP_FLAG, "agreement": self.agreement,
                "deployed": self.deployed.to_dict(), "simulated": self.simulated.to_dict()}

    def markdown(self, *, plot: str | None = None) -> str:
        """The side-by-side table; ``plot`` — a PNG file name beside the Markdown to show under the table."""
        d, s = self.deployed, self.simulated
        lines = [f"# Deployed vs simulated: {d.model}", "",
                 f"{d.n} points of {d.dataset}, {d.threat_model}; the same attacks, seed and points on the ONNX graph "
                 "(onnxruntime) and on its fake-quant twin. Gaps above "
                 f"{100 * GAP_FLAG:g} point are flagged.", ""]
        if self.agreement:
            lines += [f"Export agreement (prediction): {self.agreement.get('agreement', float('nan')):.2%} of "
                      f"{self.agreement.get('n')} images.", ""]
        lines += ["| ε | attack | deployed | simulated | gap (points) | broken only on deployed | only on simulated "
                  "| McNemar p |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            flag = " ⚠" if r["flagged"] else ""
            lines.append(f"| {r['eps']:.4g} | {r['attack']} | {r['deployed']:.2%} | {r['simulated']:.2%} | "
                         f"{100 * r['gap']:+.1f}{flag} | {r['only_deployed_broken']} | {r['only_simulated_broken']} | "
                         f"{r['mcnemar_p']:.3g} |")
        lines.append("")
        if plot:
            lines += [f"![deployed vs simulated]({plot})", ""]
        lines += [f"- {f}" for f in self.flags] or ["- no gap above the flag: the deployed graph is as robust as its "
                                                    "simulation under these attacks"]
        lines += ["", f"Clean accuracy: deployed {d.clean_accuracy:.2%}, simulated {s.clean_accuracy:.2%}."]
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        worst = [r for r in self.rows if r["attack"] == "worst case"]
        parts = [f"ε={r['eps']:.4g}: deployed {r['deployed']:.2%} vs simulated {r['simulated']:.2%}" for r in worst]
        return "; ".join(parts) + (f" — {len(self.flags)} gap(s) flagged" if self.flags else " — no gap flagged")

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``deployed.json``, ``deployed.md`` and its plot (``deployed_vs_simulated.png``) into ``out``."""
        from qrobust.report import DEPLOYED_PNG, plot_deployed

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()  # both full reports: built once for the JSON and the plot
        atomic_write_text(out / "deployed.json", json.dumps(data, indent=2, default=str) + "\n")
        plot_deployed(data, out / DEPLOYED_PNG)
        atomic_write_text(out / "deployed.md", self.markdown(plot=DEPLOYED_PNG))
        return out


def _row(eps: float, attack: str, dep: str, sim: str, n: int) -> dict[str, Any]:
    m_dep, m_sim = str_mask(dep), str_mask(sim)
    a_dep, a_sim = float(m_dep.float().mean()), float(m_sim.float().mean())
    gap = a_dep - a_sim
    b, c = int((m_sim & ~m_dep).sum()), int((m_dep & ~m_sim).sum())
    p = float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0  # exact McNemar on the discordant points
    return {"eps": eps, "attack": attack, "deployed": a_dep, "simulated": a_sim, "gap": gap,
            "only_deployed_broken": b, "only_simulated_broken": c, "mcnemar_p": p,
            "flagged": abs(gap) > GAP_FLAG, "n": n}


def compare_reports(deployed: RobustnessReport, simulated: RobustnessReport) -> tuple[list[dict], list[str]]:
    """Side-by-side rows (clean, each attack, worst case, per ε) and the flags of two reports on the same points."""
    if deployed.n != simulated.n:
        raise ConfigError(f"the reports cover {deployed.n} and {simulated.n} points: compare the same points")
    rows = [_row(0.0, "clean", deployed.clean, simulated.clean, deployed.n)]
    for ed, es in zip(deployed.results, simulated.results):
        for ad, as_ in zip(ed.attacks, es.attacks):
            if ad.robust is not None and as_.robust is not None:
                rows.append(_row(ed.eps, ad.label, ad.robust, as_.robust, deployed.n))
        rows.append(_row(ed.eps, "worst case", ed.robust, es.robust, deployed.n))
    flags = [f"ε={r['eps']:.4g} {r['attack']}: deployed {r['deployed']:.2%} vs simulated {r['simulated']:.2%} "
             f"({100 * r['gap']:+.1f} points; {r['only_deployed_broken']} points broken only on the deployed graph, "
             f"{r['only_simulated_broken']} only on the simulation; exact McNemar p = {r['mcnemar_p']:.3g})"
             for r in rows if r["flagged"]]
    return rows, flags


def reverify(
    deployed: nn.Module,
    twin: nn.Module,
    data: Any,
    *,
    eps: float | list[float],
    parent: nn.Module | None = None,
    n: int | None = None,
    n_queries: int = 1000,
    spsa_steps: int = 20,
    spsa_samples: int = 64,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    model_name: str | None = None,
    dataset: str | None = None,
) -> DeployedComparison:
    """Attack the ``deployed`` model and its fake-quant ``twin`` with :func:`deployed_suite` on the same points
    and compare (see the module docstring). ``parent`` — the float model DIVA keeps correct (default: the twin
    with its quantizers disabled)."""
    suite = deployed_suite(twin, parent=parent, n_queries=n_queries, spsa_steps=spsa_steps,
                           spsa_samples=spsa_samples, steps=steps)
    common = {"suite": suite, "eps": eps, "n": n, "seed": seed, "batch_size": batch_size, "diagnostics": False,
              "dataset": dataset}
    name = model_name or str(getattr(deployed, "path", type(deployed).__name__))
    log.info("re-verifying %s: the deployed graph", name)
    rep_dep = evaluate(deployed, data, model_name=name, **common)
    log.info("re-verifying %s: its fake-quant twin, same attacks and points", name)
    rep_sim = evaluate(twin, data, model_name=f"{name} (fake-quant twin)", **common)
    rows, flags = compare_reports(rep_dep, rep_sim)
    for f in flags:
        log.warning("deployed vs simulated: %s", f)
    export = getattr(deployed, "qrobust_export", None) or {}
    return DeployedComparison(rep_dep, rep_sim, rows, flags, export.get("agreement"))
