"""The `qrobust` command never silently does something other than asked: reproducible seeds, conflicting flags
refused, the ε of a run stated (and customary per dataset), empty work refused, one-line errors before any work,
resumable evaluations, bounded and numerically ordered epoch checkpoints, one default suite."""

from __future__ import annotations

import inspect
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from qrobust import checkpoint
from qrobust.cli import DEFAULT_EPS, main, make_parser, parse_eps
from qrobust.errors import ConfigError, InputError
from qrobust.evaluation import evaluate
from qrobust.models import build_model
from qrobust.training import FitConfig, TrainingDiverged, fit

TINY = ["--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--max-batches", "3"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(capsys, argv, code, *needles):
    got, _, err = _run(capsys, *argv)
    assert got == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "float"
    assert main(["train", "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------- --seed
def test_the_same_seed_gives_bit_identical_weights(tmp_path):
    def train(name, seed):
        torch.rand(1000)  # whatever ran before in the process must not matter
        assert main(["train", *TINY, "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
        return load_file(str(tmp_path / name / "final.safetensors"))

    a, b, c = train("a", 7), train("b", 7), train("c", 8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------------------- conflicts
def test_resume_with_other_settings_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    base = ["train", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--max-batches", "2",
            "--out", out]
    assert _run(capsys, *base)[0] == 0
    (out / "final.safetensors").unlink()  # as if killed after epoch 1
    (out / "checkpoints" / "epoch_002.safetensors").unlink()
    config = (out / "config.json").read_text()
    _one_line_error(capsys, [*base, "--resume", "--lr", "0.1"], 2, "fit.lr 0.05 → 0.1", "config.json")
    _one_line_error(capsys, [*base, "--resume", "--bits", "w4a4"], 2, "spec None →")
    _one_line_error(capsys, [*base, "--resume", "--epochs", "3"], 2, "fit.epochs 2 → 3")
    assert (out / "config.json").read_text() == config  # not rewritten with the refused settings
    code, _, err = _run(capsys, *base, "--resume", "--keep-checkpoints", "5")  # does not change what is trained
    assert code == 0, err
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_init_sets_the_architecture(capsys, digits_run, tmp_path):
    _one_line_error(capsys, ["train", *TINY, "--init", digits_run, "--model", "small_cnn", "--out", tmp_path / "x"],
                    2, "digits_cnn checkpoint", "drop --model small_cnn")
    _one_line_error(capsys, ["train", *TINY, "--init", digits_run, "--activation", "relu6", "--out", tmp_path / "x"],
                    2, "drop --activation relu6")
    assert not (tmp_path / "x").exists()
    # naming the checkpoint's own architecture is no conflict
    assert _run(capsys, "train", *TINY, "--init", digits_run, "--model", "digits_cnn", "--out", tmp_path / "y")[0] == 0


def test_calib_sets_a_fine_tunes_activation_clips_from_the_init_model(capsys, digits_run, tmp_path):
    """`--calib N` with --init: each activation's clip comes from the float model's outputs (as `quantize` does),
    recorded in the checkpoint's spec; without it the spec's act_clip (6) stays. Misuse is a one-line error."""
    base = ["train", *TINY, "--init", digits_run, "--bits", "w4a4"]
    assert _run(capsys, *base, "--out", tmp_path / "plain")[0] == 0
    code, _, err = _run(capsys, *base, "--calib", "64", "--out", tmp_path / "cal")
    assert code == 0, err

    def clips(run):
        spec = checkpoint.load(run).qrobust_spec
        return {n: ov["act_clip"] for n, ov in (spec.get("overrides") or {}).items() if "act_clip" in ov}

    got = clips(tmp_path / "cal")
    assert clips(tmp_path / "plain") == {} and got and all(v > 0 for v in got.values())
    assert any(abs(v - 6.0) > 1e-3 for v in got.values())  # the float model's own ranges, not the default clip
    assert json.loads((tmp_path / "cal" / "config.json").read_text())["calib"] == 64
    _one_line_error(capsys, ["train", *TINY, "--bits", "w4a4", "--calib", "64", "--out", tmp_path / "x"], 2,
                    "--calib", "--init")
    _one_line_error(capsys, [*base[:-2], "--bits", "w4a32", "--calib", "64", "--out", tmp_path / "x"], 2,
                    "leaves the activations float")
    _one_line_error(capsys, [*base, "--calib", "100000", "--out", tmp_path / "x"], 2, "exceeds")
    assert not (tmp_path / "x").exists()


def test_objective_flags_and_json_must_agree(capsys, tmp_path):
    _one_line_error(capsys, ["train", *TINY, "--objective", "pgd-at", "--train-eps", "25", "--objective-options",
                             '{"eps": 0.2}', "--out", tmp_path / "x"], 2, "--train-eps and --objective-options")
    _one_line_error(capsys, ["train", *TINY, "--objective-options", "[1]", "--out", tmp_path / "x"], 2,
                    "JSON object")


def test_attack_options_may_not_override_flags(capsys, digits_run, tmp_path):
    _one_line_error(capsys, ["attack", digits_run, "--eps", "25", "--n", "8", "--attack-options", '{"eps": 0.5}',
                             "--out", tmp_path / "a"], 2, "sets eps, which --eps sets")
    _one_line_error(capsys, ["attack", digits_run, "--n", "8", "--attack-options", '{"gradients": "native"}',
                             "--out", tmp_path / "a"], 2, "--gradients")
    _one_line_error(capsys, ["eval", digits_run, "--n", "8", "--attack-options", '{"apgd-ce": {"eps": 0.5}}',
                             "--out", tmp_path / "e"], 2, "sets eps, which --eps sets")


def test_the_help_texts_attack_options_examples_work(capsys, digits_run, tmp_path):
    # eval's options are per attack of the suite: a flat object gets a one-line usage error with the right form
    _one_line_error(capsys, ["eval", digits_run, "--n", "8", "--attack-options", '{"steps": 50}',
                             "--out", tmp_path / "e"], 2, "maps attacks of the suite", '"apgd-ce"')
    code, _, err = _run(capsys, "eval", digits_run, "--suite", "quick", "--n", "16", "--no-diagnostics",
                        "--attack-options", '{"pgd-20": {"steps": 3}}', "--out", tmp_path / "ok")
    assert code == 0, err
    code, _, err = _run(capsys, "attack", digits_run, "--n", "8", "--attack-options", '{"steps": 5}',
                        "--out", tmp_path / "a")
    assert code == 0, err
    # an attack that does not take the setting: one line, not a TypeError traceback
    _one_line_error(capsys, ["attack", digits_run, "--attack", "fgsm", "--n", "8", "--attack-options",
                             '{"steps": 5}', "--out", tmp_path / "a2"], 2, "fgsm does not take")


# ------------------------------------------------------------------------------------------- ε
def test_eps_scale_rule():
    assert parse_eps("8", "Linf") == [8 / 255]
    assert parse_eps("8/255", "Linf") == [8 / 255]
    assert parse_eps("0.3/1,0", "Linf") == [0.3, 0.0]
    assert parse_eps("0.5", "L2") == [0.5]
    help_text = " ".join(make_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert "8/255" in help_text and "refused as ambiguous" in help_text


@pytest.mark.parametrize("eps, needle", [("0.1", "ambiguous"), ("2/1", "exceeds 1"), ("8/0", "numbers"),
                                         ("-1", "≥ 0"), ("inf", "finite")])
def test_ambiguous_or_bad_eps_is_refused(capsys, digits_run, tmp_path, eps, needle):
    _one_line_error(capsys, ["eval", digits_run, "--n", "8", "--eps", eps, "--out", tmp_path / "e"], 2, needle)
    assert not (tmp_path / "e").exists()


def test_eps_as_a_fraction_is_accepted(capsys, digits_run, tmp_path):
    code, _, err = _run(capsys, "eval", digits_run, "--suite", "quick", "--n", "16", "--no-diagnostics",
                        "--eps", "8/255", "--out", tmp_path / "e")
    assert code == 0, err
    rep = json.loads((tmp_path / "e" / "report.json").read_text())
    assert [r["eps"] for r in rep["results"]] == [pytest.approx(8 / 255)]


def test_eval_and_attack_default_to_the_datasets_customary_eps(capsys, digits_run, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="qrobust"):
        code, _, err = _run(capsys, "eval", digits_run, "--suite", "quick", "--n", "16", "--no-diagnostics",
                            "--out", tmp_path / "e")
    assert code == 0, err
    rep = json.loads((tmp_path / "e" / "report.json").read_text())
    assert [r["eps"] for r in rep["results"]] == [pytest.approx(DEFAULT_EPS["Linf"]["digits"])] == [0.1]
    assert "customary Linf ε of digits" in caplog.text
    code, out, err = _run(capsys, "attack", digits_run, "--n", "8", "--out", tmp_path / "a")
    assert code == 0, err
    assert "25.5/255 (0.1)" in out
    # no customary L2 ε for the digits: say so instead of guessing
    _one_line_error(capsys, ["eval", digits_run, "--n", "8", "--norm", "L2", "--out", tmp_path / "l2"], 2,
                    "no customary L2 ε", "--eps")


def test_adversarial_training_states_its_eps(capsys, tmp_path, caplog):
    out = tmp_path / "at"
    with caplog.at_level(logging.INFO, logger="qrobust"):
        code, _, err = _run(capsys, "train", *TINY, "--objective", "pgd-at", "--train-steps", "1", "--out", out)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_eps"] == cfg["objective"]["eps"] == 0.1  # the digits' customary ε, not CIFAR's 8/255
    assert "customary" in cfg["train_eps_source"]
    assert "training at ε = 25.5/255 (0.1)" in caplog.text
    # dq on an adversarial base reaches the base's ε too
    out = tmp_path / "dq"
    code, _, err = _run(capsys, "train", *TINY, "--objective", "dq", "--base", "pgd-at", "--train-steps", "1",
                        "--train-eps", "8/255", "--out", out)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_eps"] == cfg["objective"]["main"]["eps"] == pytest.approx(8 / 255)
    assert cfg["train_eps_source"] == "--train-eps"
    # natural training has no ε to state
    code, _, _ = _run(capsys, "train", *TINY, "--out", tmp_path / "ce")
    assert code == 0 and "train_eps" not in json.loads((tmp_path / "ce" / "config.json").read_text())


def test_mnist_adversarial_training_defaults_to_mnists_eps(capsys, tmp_path):
    out = tmp_path / "mnist"
    code, _, err = _run(capsys, "train", "--dataset", "mnist", "--objective", "pgd-at", "--train-steps", "1",
                        "--epochs", "1", "--n-train", "64", "--n-test", "64", "--max-batches", "1", "--out", out)
    if code == 1 and "mnist" in err.lower():
        pytest.skip(f"MNIST is not available here: {err.strip()}")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"]["eps"] == cfg["train_eps"] == 0.3


# ------------------------------------------------------------------------------------------- empty work
@pytest.mark.parametrize("argv, needle", [
    (["train", "--n-train", "0"], "--n-train: must be a positive integer, got 0"),
    (["train", "--max-batches", "0"], "--max-batches: must be a positive integer, got 0"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--keep-checkpoints", "-1"], "--keep-checkpoints"),
    (["attack", "run", "--n", "0"], "--n: must be a positive integer"),
    (["eval", "run", "--n", "-3"], "--n: must be a positive integer"),
])
def test_empty_work_is_a_usage_error(capsys, tmp_path, argv, needle):
    _one_line_error(capsys, [*argv, "--out", tmp_path / "x"], 2, needle)
    assert not (tmp_path / "x").exists()


def test_fit_refuses_empty_data_and_max_batches_0(tmp_path):
    model = build_model("digits_cnn", in_channels=1, input_size=8)
    with pytest.raises(InputError, match="no training samples"):
        fit(model, [], epochs=1, out=tmp_path / "run")
    assert not (tmp_path / "run" / "final.safetensors").exists()
    assert not list((tmp_path / "run").rglob("epoch_*"))
    with pytest.raises(ConfigError, match="max_batches"):
        FitConfig(max_batches=0).validate()


# ------------------------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("command", ["eval", "attack"])
def test_out_is_checked_before_any_work(capsys, digits_run, tmp_path, monkeypatch, command):
    import qrobust.cli as cli

    def no_work(*a, **k):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(cli.checkpoint, "load", no_work)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(capsys, [command, digits_run, "--n", "8", "--out", a_file], 2, "is a file")
    _one_line_error(capsys, [command, digits_run, "--n", "8", "--out", a_file / "sub"], 2, "cannot be created")


def test_train_out_is_checked_before_training(capsys, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(capsys, ["train", *TINY, "--out", a_file], 2, "is a file")
    _one_line_error(capsys, ["train", *TINY, "--out", a_file / "run"], 2, "cannot be created")


def test_unwritable_out_is_one_line(capsys, digits_run, tmp_path, monkeypatch):
    import qrobust.cli as cli

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    _one_line_error(capsys, ["eval", digits_run, "--n", "8", "--out", tmp_path / "ro"], 2, "not writable",
                    "Permission denied")


def test_a_checkpoint_of_another_input_shape_is_one_line(capsys, tmp_path):
    ckpt = tmp_path / "mnist-shaped.safetensors"
    checkpoint.save(build_model("digits_cnn", in_channels=1, input_size=28), ckpt, dataset="mnist")
    for command in ("eval", "attack"):
        _one_line_error(capsys, [command, ckpt, "--dataset", "digits", "--n", "8", "--out", tmp_path / command], 1,
                        "takes 1×28×28 images but digits images are 1×8×8", "--dataset mnist")
    few = tmp_path / "five.safetensors"
    checkpoint.save(build_model("digits_cnn", in_channels=1, input_size=8, num_classes=5), few)
    _one_line_error(capsys, ["train", *TINY, "--init", few, "--out", tmp_path / "t"], 1, "5 outputs", "10 classes")


def test_fit_checks_labels_before_the_loss_fails(tmp_path):
    x = torch.rand(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    y[5] = 12
    model = build_model("digits_cnn", in_channels=1, input_size=8, num_classes=10)
    with pytest.raises(InputError, match="label 12 is out of range for a model with 10 outputs"):
        fit(model, (x, y), epochs=1, batch_size=8)
    assert not model._forward_hooks  # the label check leaves no hook behind
    with pytest.raises(InputError, match="out of range"):  # a later batch is checked too
        fit(model, [(x[:8], y[:8] % 10), (x[:8], y[:8] * 0 + 11)], epochs=1)


def test_absurd_learning_rates_and_divergence_are_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["train", *TINY, "--lr", "1e30", "--out", tmp_path / "x"], 2, "lr=1e+30 is absurd")
    assert not (tmp_path / "x" / "checkpoints").exists()
    model = build_model("digits_cnn", in_channels=1, input_size=8)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with pytest.raises(TrainingDiverged, match="lower the learning rate") as e:
        fit(model, (x, y), objective=lambda m, xb, yb: m(xb).sum() * float("nan"), epochs=1)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, FloatingPointError)


# ------------------------------------------------------------------------------------------- eval --resume
def test_killed_eval_resumes_to_the_same_report(capsys, digits_run, tmp_path, monkeypatch):
    from qrobust.attacks import PGD

    argv = ["eval", digits_run, "--suite", "quick", "--n", "64", "--batch-size", "16", "--eps", "10,25",
            "--no-diagnostics"]
    assert _run(capsys, *argv, "--out", tmp_path / "ref")[0] == 0
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert not (tmp_path / "ref" / "eval-state.json").exists()  # a finished evaluation leaves no state

    real, calls = PGD.perturb, {"n": 0}

    def killed(self, x, y):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of PGD at the second ε
        return real(self, x, y)

    monkeypatch.setattr(PGD, "perturb", killed)
    out = tmp_path / "part"
    code, _, err = _run(capsys, *argv, "--out", out)
    assert code == 130 and "interrupted" in err
    state = json.loads((out / "eval-state.json").read_text())
    assert state["done"] and state["partial"]
    monkeypatch.setattr(PGD, "perturb", real)
    _one_line_error(capsys, [*argv, "--out", out], 2, "interrupted evaluation", "--resume")
    code, _, err = _run(capsys, *argv, "--out", out, "--resume")
    assert code == 0, err
    again = json.loads((out / "report.json").read_text())
    for a, b in zip(ref["results"], again["results"]):
        assert a["eps"] == b["eps"] and a["robust_accuracy"] == b["robust_accuracy"]
        assert [(x["label"], x["robust_accuracy"]) for x in a["attacks"]] == \
            [(x["label"], x["robust_accuracy"]) for x in b["attacks"]]
    assert not (out / "eval-state.json").exists()
    # a state file of other settings is refused, not mixed in
    (out / "eval-state.json").write_text(json.dumps(state))
    _one_line_error(capsys, [*argv[:-3], "--eps", "12", "--no-diagnostics", "--out", out, "--resume"], 2,
                    "belongs to another evaluation")


# ------------------------------------------------------------------------------------------- checkpoints
def test_train_keeps_the_last_few_epoch_checkpoints(capsys, tmp_path):
    def names(run):
        return [p.name for p in checkpoint.epoch_checkpoints(run)]

    base = ["train", "--dataset", "digits", "--epochs", "5", "--batch-size", "64", "--max-batches", "1"]
    assert _run(capsys, *base, "--out", tmp_path / "default")[0] == 0
    assert names(tmp_path / "default") == ["epoch_003.safetensors", "epoch_004.safetensors", "epoch_005.safetensors"]
    assert _run(capsys, *base, "--keep-checkpoints", "1", "--out", tmp_path / "one")[0] == 0
    assert names(tmp_path / "one") == ["epoch_005.safetensors"]
    assert _run(capsys, *base, "--keep-checkpoints", "0", "--out", tmp_path / "all")[0] == 0
    assert len(names(tmp_path / "all")) == 5


def test_epoch_checkpoints_are_ordered_by_number(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for epoch in (998, 999, 1000, 1001):
        (run / "checkpoints" / f"epoch_{epoch:03d}.safetensors").write_bytes(b"")
    (run / "checkpoints" / "epoch_x.safetensors").write_bytes(b"")  # not an epoch checkpoint
    assert [p.name for p in checkpoint.epoch_checkpoints(run)] == [
        "epoch_998.safetensors", "epoch_999.safetensors", "epoch_1000.safetensors", "epoch_1001.safetensors"]
    assert checkpoint.resolve_checkpoint(run).name == "epoch_1001.safetensors"


def test_pruning_and_resume_past_epoch_999(tmp_path):
    """keep_checkpoints prunes the oldest by number and resume picks the newest by number (a text sort put
    epoch_1000 before epoch_999)."""
    from qrobust import training

    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    model = build_model("digits_cnn", in_channels=1, input_size=8)
    run = tmp_path / "run"
    fit(model, (x, y), epochs=1, out=run)
    first = run / "checkpoints" / "epoch_001.safetensors"
    tensors, meta = checkpoint.read_tensors(first)
    for epoch in (998, 999):
        meta["training_state"]["epoch"] = epoch
        checkpoint.save_tensors(run / "checkpoints" / f"epoch_{epoch:03d}.safetensors", tensors, meta)
    first.unlink()
    opt = training.make_optimizer(model, FitConfig())
    objective = training.make_objective("ce")
    training._save_epoch(run, model, opt, 1000, [], {}, 2, objective)
    assert [p.name for p in checkpoint.epoch_checkpoints(run)] == ["epoch_999.safetensors", "epoch_1000.safetensors"]
    assert training._latest_state(run)[1]["training_state"]["epoch"] == 1000


# ------------------------------------------------------------------------------------------- one default suite
def test_one_default_suite_for_the_cli_and_python():
    eval_parser = make_parser()._subparsers._group_actions[0].choices["eval"]
    assert eval_parser.get_default("suite") == inspect.signature(evaluate).parameters["suite"].default == "standard"
    assert "standard" in (evaluate.__doc__ or "")

