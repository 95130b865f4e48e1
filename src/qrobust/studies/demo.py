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
    """Clean, FGSM/PGD per ε and the per-sample worst case at the main ε for every model of the study."""
    models = results["models"]
    eps = sorted(models[0]["pgd"], key=float)
    main = results["settings"].get("main_eps")
    head = ["model", "clean"] + [f"FGSM {e}" for e in eps] + [f"PGD {e}" for e in eps] + [f"worst {main}", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        worst = m["worst"].get(str(main), m["worst"].get(main)) if main is not None else None
        flags = ", ".join(m.get("confirm", {}).get("flags", [])) or "none"
        cells = [m["label"], f"{m['clean']:.3f}"] + [f"{m['fgsm'][e]:.3f}" for e in eps] + \
            [f"{m['pgd'][e]:.3f}" for e in eps] + [f"{worst:.3f}" if worst is not None else "—", flags]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
