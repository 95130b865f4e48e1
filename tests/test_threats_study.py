"""``qrobust study threats`` end to end (quick mode, through the CLI): the report's sections, the claims and
their verdicts, the figures, re-rendering from the JSON alone, and the settings it refuses before training."""

from __future__ import annotations

import json

import pytest

from qrobust.cli import main
from qrobust.errors import ConfigError
from qrobust.studies.harness import get_study, render_results, study_of
from qrobust.studies.threats import MASKING_LABELS, run_threats_study

VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "not measured")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("threats")
    assert main(["study", "threats", "--quick", "--n-eval", "40", "--bits", "32,4,2,1", "--out", str(out)]) == 0
    return out


def test_quick_study_writes_report_claims_and_figures(quick_run):
    res = json.loads((quick_run / "results.json").read_text())
    assert study_of(res) is get_study("threats") and res["format"] == "qrobust-threats-study/1"
    assert res["settings"]["bits"] == [32, 4, 2, 1] and res["settings"]["n_eval"] == 40
    names = ["float", "w4a4", "w2a2", "w1a1"]
    assert res["transfer"]["names"] == names and len(res["transfer"]["robust"]) == 4
    assert list(res["masking"]) == names and list(res["value_shift"]) == names[1:]
    for row in res["masking"].values():
        assert set(row["attacks"]) == set(MASKING_LABELS)
        # the worst case is per sample over every attack: never above any of them
        assert all(row["worst"] <= v + 1e-9 for v in row["attacks"].values())
        assert len(row["worst_mask"]) == 40
    assert 0 < res["alignment"]["w4a4"]["median"] <= 1
    # the ensemble is float + the two lowest non-binary bit-widths; random precision leaves binary out too
    assert res["defenses"]["ensemble"]["members"] == ["float", "w4a4", "w2a2"]
    assert res["defenses"]["random_precision"]["members"] == ["w4a4", "w2a2"]
    assert res["defenses"]["random_precision"]["adaptive"]["repeats"] == 2
    for k in "abcd":
        assert res["claims"][k]["verdict"].startswith(VERDICTS), res["claims"][k]
    assert [r["bits"] for r in res["claims"]["b"]["rows"] if r["low"]] == [2, 1]
    report = (quick_run / "report.md").read_text()
    for part in ("## 1. Transfer matrix", "## 2. Value shift", "## 3. Masking table", "## 4. Precision-diverse",
                 "**(a)**", "**(b)**", "**(c)**", "**(d)**"):
        assert part in report
    for png in ("transfer_matrix.png", "gradient_alignment.png", "masking.png"):
        assert (quick_run / png).stat().st_size > 5000


def test_study_render_reproduces_the_report(quick_run, tmp_path, capsys):
    want = (quick_run / "report.md").read_text()
    assert render_results(quick_run) == want
    assert main(["study", "render", str(quick_run / "results.json"), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == want


@pytest.mark.parametrize("bits, message", [((8, 4), "must include 32"), ((32,), "at least one quantized"),
                                          ((32, 4, 4), "distinct")])
def test_bad_bits_fail_before_training(bits, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_threats_study(quick=True, bits=bits, out=tmp_path / "x")
    assert not (tmp_path / "x" / "runs").exists()


def test_unknown_budget_field_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown budget fields"):
        run_threats_study(quick=True, budget={"square_querie": 10}, out=tmp_path / "x")


def test_committed_digits_report_re_renders_identically():
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    assert study_of(json.loads((results / "threats_digits.json").read_text())) is get_study("threats")
    assert render_results(results / "threats_digits.json") == (results / "threats_digits" / "report.md").read_text()


def test_one_quantized_bit_width_says_what_is_not_measured(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="qrobust.studies.threats"):
        res = run_threats_study(quick=True, bits=(32, 4), n_eval=16, out=tmp_path / "one")
    assert res["defenses"] == {} and res["claims"]["d"]["verdict"] == "not measured"
    assert res["claims"]["b"]["verdict"] == "not measured"  # no bit-width ≤ 2 to judge masking at
    assert res["claims"]["c"]["value_shift_grows"] is None
    assert sum("not measured" in r.getMessage() for r in caplog.records) == 2
    report = (tmp_path / "one" / "report.md").read_text()
    assert "Not measured (needs two quantized bit-widths)" in report and "not measured (one quantized" in report


def test_the_float_parent_from_a_checkpoint_is_used_as_is(quick_run, tmp_path):
    first = json.loads((quick_run / "results.json").read_text())
    res = run_threats_study(quick=True, bits=(32, 4), n_eval=40, parent=str(quick_run / "runs" / "float"),
                            out=tmp_path / "shared")
    assert res["settings"]["parent"]["checkpoint"].endswith("float")
    assert res["settings"]["parent"]["objective"]["name"] == "ce"
    assert not (tmp_path / "shared" / "runs" / "float").exists()  # not retrained
    same = {k: v for k, v in res["masking"]["float"].items() if k != "time_s"}
    assert same == {k: v for k, v in first["masking"]["float"].items() if k != "time_s"}  # the same parent
    assert "from the checkpoint" in (tmp_path / "shared" / "report.md").read_text()
