"""The training loop: it learns, schedules are right, runs resume exactly after a kill, DDP runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import qrobust
from qrobust.data import load_dataset
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.quant import quantize
from qrobust.training import FitConfig, accuracy, fit, lr_at


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _digits_model(info, **kw):
    torch.manual_seed(0)
    return build_model(
        "digits_cnn", num_classes=10, in_channels=1, input_size=8, mean=list(info.mean), std=list(info.std), **kw
    )


def test_fit_learns_digits_float_and_w4a4(digits):
    train, test = digits
    model = _digits_model(train.info)
    before = accuracy(model, test)
    res = fit(model, train, test=test, epochs=4, batch_size=64, lr=0.05)
    assert before < 0.3
    assert res.history[-1]["test_acc"] > 0.85
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    q = quantize(model, "w4a4")
    qres = fit(q, train, test=test, epochs=2, batch_size=64, lr=0.01)
    assert qres.history[-1]["test_acc"] > 0.8


def test_objective_is_the_only_loss(digits):
    """A custom objective is what gets minimised: pushing logits of class 3 up makes everything class 3."""
    train, test = digits
    model = _digits_model(train.info)

    def always_three(m, x, y):
        return torch.nn.functional.cross_entropy(m(x), torch.full_like(y, 3))

    fit(model, train, objective=always_three, epochs=1, batch_size=64, lr=0.05)
    x, _ = test.tensors()
    with torch.no_grad():
        assert (model(x).argmax(1) == 3).float().mean() > 0.95


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step", "constant"])
def test_schedules(schedule):
    cfg = FitConfig(epochs=10, lr=0.1, schedule=schedule, warmup_epochs=0)
    vals = [lr_at(cfg, t / 100) for t in range(101)]
    assert max(vals) == pytest.approx(0.1, rel=1e-6)
    if schedule == "cosine":
        assert vals[0] == pytest.approx(0.1) and vals[-1] == pytest.approx(0.0, abs=1e-12)
        assert vals[50] == pytest.approx(0.05)
    if schedule == "step":
        assert vals[49] == pytest.approx(0.1) and vals[50] == pytest.approx(0.01) and vals[80] == pytest.approx(0.001)
    if schedule == "onecycle":
        assert vals[0] == pytest.approx(0.004) and vals[30] == pytest.approx(0.1) and vals[-1] == pytest.approx(0.0)
    if schedule == "constant":
        assert set(vals) == {0.1}


def test_warmup_is_linear_from_zero():
    cfg = FitConfig(epochs=10, lr=0.2, schedule="cosine", warmup_epochs=2)
    assert lr_at(cfg, 0.0) == 0.0
    assert lr_at(cfg, 0.1) == pytest.approx(0.1)
    assert lr_at(cfg, 0.2) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"lr": -1.0},
        {"optimizer": "lbfgs"},
        {"schedule": "poly"},
        {"batch_size": 0},
        {"weight_decay": -1},
    ],
)
def test_bad_config(bad, digits):
    with pytest.raises(ConfigError):
        fit(_digits_model(digits[0].info), digits[0], **bad)


def test_refuses_to_overwrite_a_run(tmp_path, digits):
    train, _ = digits
    fit(_digits_model(train.info), train, epochs=1, out=tmp_path / "run", max_batches=2)
    with pytest.raises(ConfigError, match="resume"):
        fit(_digits_model(train.info), train, epochs=1, out=tmp_path / "run")


def test_run_folder_contents(tmp_path, digits):
    train, test = digits
    fit(
        _digits_model(train.info),
        train,
        test=test,
        epochs=2,
        out=tmp_path / "run",
        max_batches=3,
        optimizer="adamw",
        lr=1e-3,
        metadata={"dataset": "digits"},
    )
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_001.safetensors", "epoch_002.safetensors"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all("test_acc" in r for r in lines)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["fit"]["optimizer"] == "adamw" and cfg["dataset"] == "digits"
    m = qrobust.load(run)
    assert m.qrobust_meta["metadata"]["history"][-1]["epoch"] == 2
    # an epoch checkpoint is loadable as a model too (its optimizer state is ignored)
    qrobust.load(run / "checkpoints" / "epoch_001.safetensors")


def test_resume_in_process_matches_uninterrupted(tmp_path, digits):
    train, test = digits
    full = fit(_digits_model(train.info), train, epochs=3, out=tmp_path / "full", max_batches=5)
    fit(_digits_model(train.info), train, epochs=3, out=tmp_path / "part", max_batches=5)
    # simulate a kill after epoch 1: drop the later checkpoints and the final file
    for name in ("epoch_002.safetensors", "epoch_003.safetensors"):
        (tmp_path / "part" / "checkpoints" / name).unlink()
    (tmp_path / "part" / "final.safetensors").unlink()
    resumed = fit(_digits_model(train.info), train, epochs=3, out=tmp_path / "part", max_batches=5, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_reuses_a_finished_run_without_epoch_checkpoints(tmp_path, digits):
    """A finished run kept as config.json + metrics.jsonl + final.safetensors (bench/_keep.py) is the run: a
    resume returns its weights and history and trains nothing; other settings are refused as for any resume."""
    train, _ = digits
    done = fit(_digits_model(train.info), train, epochs=2, out=tmp_path / "run", max_batches=3)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    trained = []
    again = fit(
        _digits_model(train.info),
        train,
        epochs=2,
        out=tmp_path / "run",
        max_batches=3,
        resume=True,
        callbacks=[lambda record, model: trained.append(record["epoch"])],
    )
    assert trained == [] and again.history == done.history
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]
    for (k, a), b in zip(done.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match=r"fit.epochs 2 → 3"):
        fit(_digits_model(train.info), train, epochs=3, out=tmp_path / "run", max_batches=3, resume=True)


def _qrobust_cmd(*args):
    return [sys.executable, "-m", "qrobust.cli", *args]


@pytest.mark.slow
def test_killed_cli_run_resumes_to_a_complete_run(tmp_path):
    """Kill `qrobust train` with SIGKILL mid-run; `--resume` ends with every epoch and a complete metrics file."""
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--epochs", "6", "--batch-size", "32", "--out", str(out)]
    env = {**os.environ, "QROBUST_NO_PROGRESS": "1"}
    proc = subprocess.Popen(_qrobust_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "epoch_002.safetensors").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "checkpoints").glob("epoch_*.safetensors"))
    assert done and "epoch_006.safetensors" not in done, "the run finished before it could be killed"
    assert not (out / "final.safetensors").exists()
    r = subprocess.run(_qrobust_cmd(*args, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in lines] == [1, 2, 3, 4, 5, 6]
    assert qrobust.load(out).qrobust_meta["metadata"]["history"][-1]["test_acc"] > 0.85
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, torchrun):
    out = tmp_path / "ddp"
    torchrun("-m", "qrobust.cli", "train", "--dataset", "digits", "--epochs", "2", "--batch-size", "32",
             "--out", str(out))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in lines] == [1, 2]
    # each of the 2 ranks saw half the data; the aggregated count is the whole (even-sized) training set
    assert lines[-1]["test_acc"] > 0.6
    assert qrobust.load(out) is not None


_LIBRARY_DDP = """
import atexit, os, pathlib
import torch, torch.distributed as dist
from torch import nn
from qrobust import fit
log = pathlib.Path(os.environ["LOG_DIR"]) / f"rank{os.environ['RANK']}.txt"


@atexit.register  # registered first, so it runs after the exit hook fit registers
def report():
    with log.open("a") as f:
        f.write(f"CLOSED {not dist.is_initialized()}\\n")


g = torch.Generator().manual_seed(0)
data = (torch.rand(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))
fit(nn.Linear(4, 3), data, epochs=1, batch_size=16, lr=0.1, device="cpu")
log.write_text(f"OPEN {dist.is_initialized()} {dist.get_world_size()}\\n")
fit(nn.Linear(4, 3), data, epochs=1, batch_size=16, lr=0.1, device="cpu")  # the same group again
"""


@pytest.mark.slow
def test_a_library_fit_under_torchrun_closes_the_process_group_it_opened(tmp_path, torchrun):
    script = tmp_path / "lib_ddp.py"
    script.write_text(_LIBRARY_DDP)
    torchrun(str(script), env={"LOG_DIR": str(tmp_path)})
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().splitlines() == ["OPEN True 2", "CLOSED True"]


def test_fit_leaves_a_process_group_it_did_not_open_to_its_owner(monkeypatch):
    import torch.distributed as dist

    from qrobust import training

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("must not open a second group"))
    monkeypatch.setitem(training._opened, "group", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    training._dist_open()
    assert training._opened["group"] is False


def test_odgq_resume_restores_carried_perturbations(tmp_path, digits):
    """ODG-Q keeps per-sample perturbations across epochs: a resumed run must continue them (and its
    metrics carry the objective's own odgq_* numbers)."""
    from qrobust.defenses import make_objective

    train, _ = digits

    def run(out, **kw):
        return fit(_digits_model(train.info), train, objective=make_objective("odgq", eps=0.1), epochs=3,
                   out=out, max_batches=6, batch_size=64, **kw)

    full = run(tmp_path / "full")
    assert any(k.startswith("odgq_") for k in full.history[-1])
    run(tmp_path / "part")
    for name in ("epoch_002.safetensors", "epoch_003.safetensors"):
        (tmp_path / "part" / "checkpoints" / name).unlink()
    (tmp_path / "part" / "final.safetensors").unlink()
    resumed = run(tmp_path / "part", resume=True)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_on_a_device_without_native_bf16_warns(digits, monkeypatch, caplog, fast):
    # on an AVX2-only CPU bf16 autocast is emulated and a ResNet-20 step ran 10× slower than fp32 (measured):
    # asking for it there is honoured, with a warning that says so; where bf16 is native, no warning
    import qrobust.training as training

    monkeypatch.setattr(training, "bf16_is_fast", lambda device: fast)
    train, _ = digits
    with caplog.at_level("WARNING", logger="qrobust.training"):
        fit(_digits_model(train.info), train, epochs=1, batch_size=128, lr=0.05, bf16=True, max_batches=2)
    warned = [r for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert bool(warned) is (not fast)


def test_bf16_is_fast_reads_the_device():
    from qrobust.utils import bf16_is_fast

    assert bf16_is_fast("cpu") is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert bf16_is_fast("cuda") is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
