"""``qrobust study layerwise``: the quick run through the CLI writes a report whose claims have the structure the
paper's three claims need, re-renders byte-identically from its JSON, and refuses bad settings before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qrobust.cli import main
from qrobust.studies.harness import available_studies, load_results, render_results, study_of

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
VERDICT_WORDS = ("reproduced", "partly reproduced", "not reproduced", "not measured")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layerwise") / "study"
    assert main(["study", "layerwise", "--quick", "--budgets", "3,4", "--bits", "8,2", "--out", str(out)]) == 0
    return out


def test_registered():
    assert "layerwise" in available_studies()


def test_quick_run_writes_report_figures_and_claims(quick_run):
    res = json.loads((quick_run / "results.json").read_text())
    assert res["format"] == "qrobust-layerwise-study/1" and res["settings"]["quick"]
    assert {"natural", "pgd-at"} == set(res["part1"]) == set(res["consistency"])
    for p in res["part1"].values():
        assert {(r["mode"], r["bits"]) for r in p["rows"]} == {("w", 8), ("w", 2), ("wa", 8), ("wa", 2)}
        for r in p["rows"]:
            assert r["robust_drop"] == pytest.approx(p["float_robust"] - r["robust"])
    layers = res["settings"]["layers"]
    cells = {(r["parent"], r["budget"], r["method"]) for r in res["part2"]}
    assert len(cells) == 2 * 2 * 6
    for r in res["part2"]:
        assert set(r["bits"]) == set(layers)
        avg = sum(layers[n] * b for n, b in r["bits"].items()) / sum(layers.values())
        assert avg == pytest.approx(r["average_bits"]) and avg <= r["budget"] + 1e-9
        assert 0 <= r["worst"] <= min(r["after"].values()) + 1e-9 and r["worst"] <= r["clean"]
    c = res["claims"]
    assert set(c) == {"1", "2", "3", "2+", "3+"}  # the paper's criterion, then our local-gain variant
    for k in c:
        assert c[k]["verdict"].startswith(VERDICT_WORDS), c[k]["verdict"]
    assert len(c["1"]["points"]) == 4 and all({"p", "only_a", "only_b"} <= set(q) for q in c["1"]["points"])
    for k, crit in (("2", "lipschitz"), ("2+", "lipschitz-local")):
        assert {(q["criterion"], q["parent"], q["budget"], q["baseline"]) for q in c[k]["points"]} == {
            (crit, p, b, m) for p in ("natural", "pgd-at") for b in (3.0, 4.0) for m in ("uniform", "hawq", "random")}
    n_settings = len(layers) * len(res["settings"]["candidates"])
    for p, cons in res["consistency"].items():
        assert len(cons["settings"]) == n_settings
        r = cons["spearman"]["lipschitz"]
        assert r["n"] == n_settings and (r["rho"] is None or -1 <= r["rho"] <= 1)
        assert c["3"]["spearman"][p] == r and c["3+"]["spearman"][p] == cons["spearman"]["lipschitz-local"]
    for png in ("part1.png", "bits.png", "consistency.png"):
        assert (quick_run / png).read_bytes()[:4] == b"\x89PNG"
    report = (quick_run / "report.md").read_text()
    assert "post-training" in report and "## Claims" in report


def test_render_is_byte_identical(quick_run, tmp_path, capsys):
    want = (quick_run / "report.md").read_text()
    assert render_results(quick_run) == want
    capsys.readouterr()
    assert main(["study", "render", str(quick_run / "results.json"), "--out", "-"]) == 0
    assert capsys.readouterr().out == want


@pytest.mark.parametrize("extra, needle", [
    (["--bits", "9"], "bits must be"),
    (["--budgets", "1"], "budgets must lie"),
    (["--methods", "magic"], "unknown allocation methods"),
    (["--n-calib", "100000"], "exceeds"),
    (["--candidates", "1,4"], "candidates must be"),
    (["--clips", "max,p40"], "unknown clipping rule"),
    (["--qat-epochs", "-1"], "qat_epochs must be"),
    (["--budget", '{"consistency_image": 3}'], "unknown budget fields"),
])
def test_bad_settings_are_one_line_errors(capsys, tmp_path, extra, needle):
    assert main(["study", "layerwise", "--quick", *extra, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err


@pytest.mark.parametrize("name", ["layerwise_digits", "layerwise_digits_qat"])
def test_committed_digits_report_re_renders(name):
    path = RESULTS / f"{name}.json"
    if not path.exists():
        pytest.skip(f"bench/results/{name}.json not committed yet")
    results = load_results(path)
    assert study_of(results).name == "layerwise"
    assert render_results(results) == (RESULTS / name / "report.md").read_text()


# ------------------------------------------------------------------ parents from checkpoints, clipping, the fine-tune
@pytest.fixture(scope="module")
def shared_parents_run(quick_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("layerwise-shared") / "study"
    assert main(["study", "layerwise", "--quick", "--budgets", "3", "--bits", "2", "--methods", "lipschitz,uniform",
                 "--clips", "max,mse", "--qat-epochs", "1", "--qat-objective", "natural",
                 "--budget", '{"consistency_images": 32}',
                 "--natural", str(quick_run / "runs" / "float-natural"),
                 "--adversarial", str(quick_run / "runs" / "float-pgd-at"), "--out", str(out)]) == 0
    return out


def test_parents_from_checkpoints_are_the_same_models_and_nothing_is_retrained(quick_run, shared_parents_run):
    first = json.loads((quick_run / "results.json").read_text())
    res = json.loads((shared_parents_run / "results.json").read_text())
    for p in ("natural", "pgd-at"):
        assert res["settings"]["parents"][p]["checkpoint"].endswith(f"float-{p}")
        assert res["settings"]["parents"][p]["objective"]["name"] == ("ce" if p == "natural" else "pgd-at")
        for key in ("float_clean", "float_robust"):  # the very same parents: the same float numbers
            assert res["part1"][p][key] == first["part1"][p][key]
        assert not (shared_parents_run / "runs" / f"float-{p}").exists()
    assert "Parents from checkpoints" in (shared_parents_run / "report.md").read_text()


def test_fine_tune_and_clips_are_reported_side_by_side(shared_parents_run):
    res = json.loads((shared_parents_run / "results.json").read_text())
    assert res["settings"]["clips"] == ["max", "mse"] and res["settings"]["qat"]["epochs"] == 1
    layers = res["settings"]["layers"]
    for r in res["part2"]:
        assert set(r["clip"]) == set(layers) and set(r["clip"].values()) <= {"max", "mse"}
        assert 0 <= r["qat"]["worst"] <= r["qat"]["clean"]
        assert (shared_parents_run / "runs" / f"qat-{r['parent']}-3-{r['method']}" / "final.safetensors").exists()
    # uniform at 3 bits: every layer 3 bits, each with its least-error clip; the fine-tune moved the numbers
    assert all(b == 3 for r in res["part2"] if r["method"] == "uniform" for b in r["bits"].values())
    assert any(r["qat"]["clean"] != r["clean"] for r in res["part2"])
    for p, v in res["float_standard"].items():  # the control: each float parent given the same fine-tune
        assert 0 <= v["qat"]["worst"] <= v["qat"]["clean"] and v["qat"]["clean"] != v["clean"]
        assert (shared_parents_run / "runs" / f"qat-{p}-float" / "final.safetensors").exists()
    assert "after the same fine-tune as the allocations, unquantized" in (shared_parents_run / "report.md").read_text()
    c2 = res["claims"]["2"]
    assert {(q["parent"], q["baseline"]) for q in c2["qat_points"]} == {("natural", "uniform"), ("pgd-at", "uniform")}
    assert c2["qat_verdict"].startswith(VERDICT_WORDS)
    for cons in res["consistency"].values():
        assert len(cons["settings"]) == len(layers) * 6 * 2  # every (bits, clip) setting of every layer
        assert {s["clip"] for s in cons["settings"]} == {"max", "mse"}
        agree = cons["clip_agreement"]["lipschitz"]
        assert agree["n"] == len(layers) * 6 and 0 <= agree["agree"] <= agree["n"] and agree["chance"] == 0.5
    report = (shared_parents_run / "report.md").read_text()
    assert "QAT worst case" in report and "After the fine-tune" in report and "Clip agreement" in report
    assert "PGD-3 on the first 32 test images" in report
    assert render_results(shared_parents_run) == report


def test_a_parent_checkpoint_that_does_not_fit_is_a_one_line_error(capsys, quick_run, tmp_path):
    from qrobust import checkpoint
    from qrobust.quant import quantize

    nat = quick_run / "runs" / "float-natural"
    other = tmp_path / "mnist.safetensors"
    checkpoint.save(checkpoint.load(nat), other, dataset="mnist")
    quantized = tmp_path / "w4.safetensors"
    checkpoint.save(quantize(checkpoint.load(nat), "w4a32"), quantized, dataset="digits")
    for extra, needle in ((["--natural", str(other)], "was trained on mnist, not digits"),
                          (["--adversarial", str(quantized)], "is a quantized checkpoint"),
                          (["--natural", str(nat), "--model", "small_cnn"], "not the --model small_cnn"),
                          (["--natural", str(tmp_path / "missing")], "checkpoint not found"),
                          (["--natural", "zoo:no-such-entry"], "no zoo entry 'no-such-entry'"),
                          # a zoo name is taken like a path (it resolves, loads, and is then judged)
                          (["--adversarial", "zoo:digits-digits_cnn-w4a4-pgd-at"], "is a quantized checkpoint")):
        assert main(["study", "layerwise", "--quick", *extra, "--out", str(tmp_path / "bad")]) in (1, 2)
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert main(["study", "threats", "--quick", "--parent", str(other), "--out", str(tmp_path / "bad2")]) in (1, 2)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--parent" in err and "mnist" in err, err
    assert main(["study", "threats", "--quick", "--parent", "zoo:no-such-entry", "--out", str(tmp_path / "bad3")]) \
        in (1, 2)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--parent zoo:no-such-entry" in err and "no zoo entry" in err, err


def test_a_parent_trained_otherwise_than_its_role_is_named_by_its_training(quick_run):
    """A loaded FGSM-RS parent in the robust role is called FGSM-RS in the tables and figures, not PGD-AT."""
    from qrobust.studies.layerwise import parent_names

    res = json.loads((quick_run / "results.json").read_text())
    assert parent_names(res) == {"natural": "natural", "pgd-at": "PGD-AT"}  # trained here, as their roles say
    res["settings"]["parents"] = {"natural": {"checkpoint": "a", "objective": {"name": "ce"}},
                                  "pgd-at": {"checkpoint": "b", "objective": {"name": "fgsm-rs"}}}
    assert parent_names(res) == {"natural": "natural", "pgd-at": "FGSM-RS (PGD-AT role)"}
    report = render_results(res)
    assert "| FGSM-RS (PGD-AT role) | float |" in report and "| PGD-AT |" not in report
    assert "trained with fgsm-rs, not pgd-at" in report
    figs = study_of(res).figures(res)
    titles = [ax.get_title() for fig in figs.values() for ax in fig.axes]
    assert any(t.startswith("FGSM-RS (PGD-AT role) parent") for t in titles)
    assert not any(t.startswith("PGD-AT parent") for t in titles)
