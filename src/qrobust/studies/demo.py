"""``qrobust demo``: the main job on the embedded digits data, end to end in a couple of minutes.

It is the quick showcase of the Defensive-Quantization study (:mod:`qrobust.studies.dq`): one float model
(ReLU6, as in the paper), then w4a4 models fine-tuned from it quantization-aware — vanilla, and with the DQ
orthogonality penalty — attacked with FGSM and PGD at several ε and confirmed at the main ε by the
``quantized`` suite (APGD with straight-through/BPDA and float-surrogate gradients, Square, transfer), so
rounding cannot hide the gradient. The report folder holds report.md, results.json, plots and the runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qrobust.studies.dq import run_dq_study

log = logging.getLogger(__name__)


def run_demo(out: Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    results = run_dq_study(dataset="digits", bits=(4, 32), betas=(3e-2,), quantize_weights="both", out=out,
                           quick=quick, resume=True, seed=seed)
    print(demo_table(results))
    print(f"\nreport: {Path(out) / 'report.md'}  ({results['wall_time_s']:.0f} s)")
    return results


def demo_table(results: dict[str, Any]) -> str:
    """Clean, FGSM/PGD per ε and the per-sample worst case at the main ε for every model of the study, in %
    — the same numbers as the report's table (the worst case includes the confirmation suite)."""
    models = results["models"]
    eps = sorted(models[0]["pgd"], key=float)
    main = results["settings"].get("main_eps")

    def pct(v: Any) -> str:
        return "—" if v is None else f"{100 * v:.1f}"

    head = (["model", "clean %"] + [f"FGSM {float(e):g} %" for e in eps] + [f"PGD {float(e):g} %" for e in eps]
            + [f"worst case {main:g} %" if main is not None else "worst case %", "flags"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        flags = ", ".join(m.get("confirm", {}).get("flags", [])) or "none"
        cells = [m["label"], pct(m["clean"])] + [pct(m["fgsm"][e]) for e in eps] + \
            [pct(m["pgd"][e]) for e in eps] + [pct(m.get("robust_main")), flags]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
