"""Every committed study report (bench/results/NAME/report.md) re-renders byte-identically from its JSON.

Baseline before the study harness: the then-current ``_report`` functions reproduced dq_cifar10_fold,
odgq_digits_3ep, odgq_mnist and odgq_cifar10 but not the five studies committed before later report changes —
dq_digits and dq_mnist (no BN-factor or BN-folded columns then), dq_digits_adv (run before the header named
the training subset and transfer-source epochs), dq_cifar10 (before the BN-folded column) and odgq_digits
(before "random initialisation", when the settings had no ``init``). The renderers now show what each
generation of results carries, so all nine match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qrobust.cli import main
from qrobust.studies.harness import get_study, load_results, render_results, study_of

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
COMMITTED = ["dq_digits", "dq_mnist", "dq_cifar10", "dq_cifar10_fold", "dq_digits_adv", "odgq_digits",
             "odgq_digits_3ep", "odgq_mnist", "odgq_cifar10"]


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_report_re_renders_identically(name):
    results = load_results(RESULTS / f"{name}.json")
    assert study_of(results) is get_study(name.split("_")[0])
    assert render_results(results) == (RESULTS / name / "report.md").read_text()


def test_study_render_command(tmp_path, capsys):
    folder = tmp_path / "odgq_mnist"
    folder.mkdir()
    shutil.copyfile(RESULTS / "odgq_mnist.json", folder / "results.json")
    want = (RESULTS / "odgq_mnist" / "report.md").read_text()
    assert main(["study", "render", str(folder)]) == 0
    assert (folder / "report.md").read_text() == want
    capsys.readouterr()
    assert main(["study", "render", str(RESULTS / "dq_digits.json"), "--out", "-"]) == 0
    assert capsys.readouterr().out == (RESULTS / "dq_digits" / "report.md").read_text()


def test_render_rejects_what_is_not_a_study(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"format": "something-else/1"}))
    assert main(["study", "render", str(tmp_path)]) == 1
    assert "no known study" in capsys.readouterr().err
    assert main(["study", "render", str(tmp_path / "nowhere")]) == 1
