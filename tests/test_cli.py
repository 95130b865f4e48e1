"""The `qrobust` command: usage errors are one line with exit 2; the demo and train/describe work end to end."""

from __future__ import annotations

import json
import logging

import pytest

from qrobust.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--dataset", "nonesuch"], "invalid choice"),
        (["train", "--epochs", "many"], "invalid int value"),
        (["frobnicate"], "invalid choice"),
        (["describe"], "required"),
        (["train", "--bits", "w9a4", "--epochs", "1"], "bits"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_missing_checkpoint_is_one_line_exit_1(capsys, tmp_path):
    code, _, err = _run(capsys, "describe", str(tmp_path / "none.safetensors"))
    assert code == 1
    assert err.strip().count("\n") == 0 and "not found" in err


def test_missing_dataset_is_one_line_exit_1(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--epochs", "1")
    assert code == 1
    assert err.strip().count("\n") == 0 and "mnist" in err.lower()


def test_train_then_finetune_then_describe(capsys, caplog, tmp_path):
    code, out, _ = _run(
        capsys, "train", "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--out", str(tmp_path / "float")
    )
    assert code == 0 and "test accuracy" in out
    code, out, _ = _run(
        capsys,
        "train",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--bits",
        "w4a4",
        "--lr",
        "0.01",
        "--init",
        str(tmp_path / "float"),
        "--out",
        str(tmp_path / "w4a4"),
    )
    assert code == 0
    acc = float(out.split("test accuracy")[1].split()[0])
    assert acc > 0.8  # fine-tuned from the float model, not from scratch
    # a float parent was trained without the clip: the quantized copy is warned about (next test: from scratch)
    assert "unbounded in float now clip" in caplog.text
    code, out, _ = _run(capsys, "describe", str(tmp_path / "w4a4"))
    assert code == 0
    assert "w4a4" in out and "digits_cnn" in out


def test_training_quantized_from_scratch_does_not_warn_about_float_ranges(capsys, caplog, tmp_path):
    """From scratch the model learns with the spec's clips, so the parent-range warning would be false."""
    caplog.set_level(logging.INFO, logger="qrobust")
    code, _, _ = _run(capsys, "train", "--dataset", "digits", "--bits", "w4a4", "--epochs", "1", "--max-batches",
                      "2", "--out", str(tmp_path / "q"))
    assert code == 0
    assert "quantized 4 weight layer(s) and 3 activation(s) to w4a4" in caplog.text  # captured, and quantized
    assert "unbounded in float" not in caplog.text


@pytest.mark.slow
def test_demo_quick_writes_a_report(capsys, tmp_path):
    code, out, _ = _run(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"))
    assert code == 0
    assert "| w4a4 vanilla |" in out and "| w4a4 dq-0.03 |" in out and "| float vanilla |" in out
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    main = str(res["settings"]["main_eps"])
    for m in res["models"]:
        assert m["clean"] > 0.5
        pgd = [m["pgd"][e] for e in sorted(m["pgd"], key=float)]
        assert all(a >= b - 1e-9 for a, b in zip(pgd, pgd[1:])), "robust accuracy must fall as ε grows"
        assert m["worst"][main] <= min(m["pgd"][main], m["fgsm"][main]) + 1e-9 <= m["clean"] + 1e-9
    assert (tmp_path / "demo" / "report.md").read_text().startswith("# Defensive Quantization study")
    assert (tmp_path / "demo" / "robust_vs_bits.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "float"
    assert main(["train", "--dataset", "digits", "--epochs", "4", "--batch-size", "64", "--out", str(out)]) == 0
    return out


def test_eval_writes_a_report_with_eps_on_the_255_scale(capsys, digits_run, tmp_path):
    code, out, _ = _run(capsys, "eval", str(digits_run), "--suite", "quick", "--eps", "10,25", "--n", "120",
                        "--out", str(tmp_path / "ev"))
    assert code == 0, out
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert [round(r["eps"] * 255, 6) for r in rep["results"]] == [10, 25]
    accs = [r["robust_accuracy"] for r in rep["results"]]
    assert accs[0] >= accs[1] and accs[1] < rep["clean_acc"]
    assert rep["dataset"] == "digits"  # taken from the checkpoint's metadata
    assert "Diagnostics" in (tmp_path / "ev" / "report.md").read_text()


@pytest.mark.parametrize("argv, needle", [(["--eps", "300"], "0–255"), (["--eps", "x"], "numbers"),
                                          (["--suite", "nonesuch"], "suite")])
def test_eval_bad_options_are_one_line(capsys, digits_run, argv, needle):
    code, _, err = _run(capsys, "eval", str(digits_run), "--n", "10", *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err


def test_attack_saves_examples_within_eps(capsys, digits_run, tmp_path):
    from safetensors.torch import load_file

    code, out, _ = _run(capsys, "attack", str(digits_run), "--attack", "pgd", "--eps", "25", "--n", "32",
                        "--out", str(tmp_path / "atk"))
    assert code == 0 and "fooled" in out
    t = load_file(str(next((tmp_path / "atk").glob("*.safetensors"))))
    keys = sorted(t)
    x, x_adv = t[[k for k in keys if k in ("x", "clean", "original", "x_clean")][0]], t["x_adv"]
    assert (x_adv - x).abs().max() <= 25 / 255 + 1e-6
    assert (tmp_path / "atk" / "adversarial_examples.png").stat().st_size > 1000


def test_train_dq_objective_and_analyze(capsys, tmp_path):
    from qrobust import checkpoint
    from qrobust.defenses import orthogonality_error

    runs = {}
    for beta in ("0", "0.03"):
        out = tmp_path / f"dq-{beta}"
        code, _, err = _run(capsys, "train", "--dataset", "digits", "--epochs", "2", "--objective", "dq",
                            "--beta", beta, "--activation", "relu6", "--out", str(out))
        assert code == 0, err
        runs[beta] = orthogonality_error(checkpoint.load(out))["total"]
    assert runs["0.03"] < runs["0"]  # --beta reached the penalty
    code, out, _ = _run(capsys, "analyze", "lipschitz", str(tmp_path / "dq-0.03"))
    assert code == 0 and "conv1" in out and "Lipschitz bound" in out
    code, out, _ = _run(capsys, "analyze", "amplification", str(tmp_path / "dq-0.03"), str(tmp_path / "dq-0"),
                        "--n", "32", "--eps", "8", "--out", str(tmp_path / "amp"))
    assert code == 0
    assert (tmp_path / "amp" / "amplification.png").exists()


@pytest.mark.slow
def test_study_dq_quick(capsys, tmp_path):
    code, out, err = _run(capsys, "study", "dq", "--quick", "--n-train", "600", "--source-epochs", "1", "--bf16",
                          "--penalty-bn", "fold", "--budget", '{"timing_batches": 3, "square_queries": 20}',
                          "--out", str(tmp_path / "dq"))
    assert code == 0, err
    res = json.loads((tmp_path / "dq" / "results.json").read_text())
    assert "claims" in json.dumps(res)
    st = res["settings"]
    assert st["n_train"] == 600 and st["source_epochs"] == 1 and st["fit"]["bf16"] is True
    assert st["budget"]["timing_batches"] == 3 and st["budget"]["square_queries"] == 20
    assert st["penalty_bn"] == "fold"
    dq = next(m for m in res["models"] if m["kind"] == "dq")
    assert dq["objective"]["regularizers"][0]["bn"] == "fold" and "ortho_bn_folded" in dq
    assert (tmp_path / "dq" / "report.md").exists()


@pytest.mark.parametrize("budget, words", [('{"square_querie": 3}', "unknown budget fields ['square_querie']"),
                                           ('{"pgd_steps": 0}', "pgd_steps must be a positive integer"),
                                           ("[1]", "--budget must be a JSON object")])
def test_study_rejects_a_bad_budget_before_training(capsys, tmp_path, budget, words):
    for study in ("dq", "odgq"):
        code, _, err = _run(capsys, "study", study, "--quick", "--budget", budget, "--out", str(tmp_path / study))
        assert code in (1, 2) and words in err and "Traceback" not in err
        assert not (tmp_path / study / "runs").exists()


def test_train_fgsm_rs_with_overfitting_guard(capsys, tmp_path):
    out = tmp_path / "fgsm"
    code, _, err = _run(capsys, "train", "--dataset", "digits", "--epochs", "2", "--objective", "fgsm-rs",
                        "--train-eps", "25", "--co-guard", "warn", "--out", str(out))
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fit"]["schedule"] == "onecycle"  # FGSM-RS's usual schedule
    assert abs(cfg["objective"]["eps"] - 25 / 255) < 1e-9
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("co_pgd_acc" in r and "co_fgsm_acc" in r for r in rec)


@pytest.mark.slow
def test_study_odgq_quick(capsys, tmp_path):
    from qrobust import build_model, checkpoint, quantize

    init = tmp_path / "float.safetensors"
    checkpoint.save(build_model("digits_cnn", in_channels=1, input_size=8, activation="relu6"), init)
    code, _, err = _run(capsys, "study", "odgq", "--quick", "--bits", "4", "--recipes", "fgsm-rs,odgq", "--epochs", "1",
                        "--n-eval", "32", "--init", str(init), "--lr", "0.02", "--bf16", "--budget",
                        '{"at_steps": 2, "timing_batches": 3}', "--out", str(tmp_path / "odgq"))
    assert code == 0, err
    assert (tmp_path / "odgq" / "report.md").exists()
    res = json.loads((tmp_path / "odgq" / "results.json").read_text())
    st = res["settings"]
    assert st["init"] == str(init) and st["fit"]["lr"] == 0.02 and st["fit"]["bf16"] is True
    assert st["budget"]["at_steps"] == 2 and res["cost"]["4"]["batches_per_epoch"] == 3
    assert "float checkpoint" in (tmp_path / "odgq" / "report.md").read_text()
    # a quantized checkpoint cannot be the starting point
    q = tmp_path / "q.safetensors"
    checkpoint.save(quantize(build_model("digits_cnn", in_channels=1, input_size=8), "w4a4"), q)
    code, _, err = _run(capsys, "study", "odgq", "--quick", "--init", str(q), "--out", str(tmp_path / "bad"))
    assert code == 2 and "quantized checkpoint" in err
