"""Every committed study report (bench/results/NAME/report.md) re-renders byte-identically from its JSON.

Baseline before the study harness: the then-current ``_report`` functions reproduced dq_cifar10_fold,
odgq_digits_3ep, odgq_mnist and odgq_cifar10 but not the five studies committed before later report changes —
dq_digits and dq_mnist (no BN-factor or BN-folded columns then), dq_digits_adv (run before the header named
the training subset and transfer-source epochs), dq_cifar10 (before the BN-folded column) and odgq_digits
(before "random initialisation", when the settings had no ``init``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qrobust.studies import dq, odgq

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
COMMITTED = ["dq_digits", "dq_mnist", "dq_cifar10", "dq_cifar10_fold", "dq_digits_adv", "odgq_digits",
             "odgq_digits_3ep", "odgq_mnist", "odgq_cifar10"]
BASELINE_MISMATCH = {"dq_digits", "dq_mnist", "dq_cifar10", "dq_digits_adv", "odgq_digits"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="baseline"))
                                  if n in BASELINE_MISMATCH else n for n in COMMITTED])
def test_committed_report_re_renders_identically(name):
    results = json.loads((RESULTS / f"{name}.json").read_text())
    render = dq._report if name.startswith("dq") else odgq._report
    assert render(results) == (RESULTS / name / "report.md").read_text()
