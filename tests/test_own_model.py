"""A model of one's own, end to end: save, load(path, model=skeleton), fit's save check, register_model
across processes, and the bring-your-own-model example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qrobust
from qrobust import checkpoint
from qrobust.data import load_dataset
from qrobust.errors import CheckpointError
from qrobust.quant import QuantAct, is_quantized

ROOT = Path(__file__).resolve().parents[1]


class OwnNet(nn.Module):
    """Plain PyTorch: BN, an in-place ReLU module used twice, a residual add and a functional relu."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        y = F.relu(y + self.relu(self.conv2(y)))
        return self.fc(F.max_pool2d(y, 2).flatten(1))


def _own(width: int = 4) -> OwnNet:
    torch.manual_seed(0)
    return OwnNet(width)


def test_a_quantized_own_model_loads_into_its_skeleton(tmp_path):
    x = torch.rand(16, 1, 8, 8)
    q = qrobust.quantize(_own(), "w4a4", calibrate=x).eval()
    p = qrobust.save(q, tmp_path / "own.safetensors", dataset="digits")
    meta = checkpoint.read_metadata(p)
    assert meta["arch"] is None and meta["class"] == f"{__name__}.OwnNet"
    skeleton = OwnNet()
    loaded = qrobust.load(p, model=skeleton)
    assert type(loaded) is OwnNet and loaded is skeleton and not loaded.training
    assert is_quantized(loaded) and loaded.qrobust_spec == q.qrobust_spec  # calibrated ranges included
    assert loaded.qrobust_meta["metadata"] == {"dataset": "digits"}
    ranges = {n: m.act_range() for n, m in loaded.named_modules() if isinstance(m, QuantAct)}
    assert ranges == {n: m.act_range() for n, m in q.named_modules() if isinstance(m, QuantAct)}
    assert len(ranges) == 3  # relu, its second use, F.relu
    assert torch.equal(loaded(x), q(x))


def test_a_float_own_model_round_trips(tmp_path):
    m = _own().eval()
    p = qrobust.save(m, tmp_path / "f.safetensors")
    loaded = qrobust.load(p, model=OwnNet())
    x = torch.rand(4, 1, 8, 8)
    assert not is_quantized(loaded) and torch.equal(loaded(x), m(x))


def test_loading_without_a_skeleton_says_how(tmp_path):
    p = qrobust.save(_own(), tmp_path / "own.safetensors")
    with pytest.raises(CheckpointError, match=r"model of your own .*OwnNet.*model=OwnNet\(\.\.\.\).*register_model"):
        qrobust.load(p)


def test_a_skeleton_that_does_not_match_is_a_clear_error(tmp_path):
    p = qrobust.save(qrobust.quantize(_own(), "w4a4"), tmp_path / "own.safetensors")
    wrong_width = r"saved from .*OwnNet\) does not match the model: shape mismatch bn\.bias: \(4,\) vs \(8,\)"
    with pytest.raises(CheckpointError, match=wrong_width):
        qrobust.load(p, model=OwnNet(width=8))
    with pytest.raises(CheckpointError, match=r"does not match the model: missing .*unexpected"):
        qrobust.load(p, model=nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    with pytest.raises(CheckpointError, match="already quantized .*pass the float skeleton"):
        qrobust.load(p, model=qrobust.quantize(OwnNet(), "w2a2"))
    with pytest.raises(qrobust.ConfigError, match="model= must be an nn.Module"):
        qrobust.load(p, model="OwnNet")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train").subset(256, seed=0), load_dataset("digits", "test").subset(128, seed=0)


def test_fit_saves_an_own_model_and_load_takes_it_back(tmp_path, digits):
    train, test = digits
    q = qrobust.quantize(_own(), "w4a4")
    qrobust.fit(q, train, test=test, epochs=1, batch_size=64, out=tmp_path / "run", augment=False)
    loaded = qrobust.load(tmp_path / "run", model=OwnNet())
    x, _ = test.tensors()
    assert torch.equal(loaded(x), q.eval()(x))
    (tmp_path / "run" / checkpoint.FINAL_NAME).unlink()  # a run folder without final: its epoch checkpoint
    assert torch.equal(qrobust.load(tmp_path / "run", model=OwnNet())(x), q(x))
    with pytest.raises(CheckpointError, match="model of your own"):
        qrobust.load(tmp_path / "run")


def test_fit_checks_that_it_can_save_before_it_trains(tmp_path, digits, monkeypatch):
    train, _ = digits
    steps = []
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(1))
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        qrobust.fit(_own(), train, epochs=1, out=tmp_path / "run", metadata={"note": object()})
    assert steps == [] and not (tmp_path / "run").exists()  # no step taken, nothing written

    class Extra(OwnNet):
        def get_extra_state(self):
            return {"not": "a tensor"}

        def set_extra_state(self, state):
            pass

    with pytest.raises(CheckpointError, match="not tensors"):
        qrobust.fit(Extra(), train, epochs=1, out=tmp_path / "run2")
    assert steps == []


def _python(code: str, tmp_path: Path, extra_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(extra_path)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


MODULE = '''
from torch import nn

class PlugNet(nn.Module):
    def __init__(self, num_classes, in_channels, width):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width * 64, num_classes)

    def forward(self, x):
        return self.fc(nn.functional.relu(self.conv(x)).flatten(1))

def build_plugnet(*, num_classes, in_channels, width=4):
    return PlugNet(num_classes, in_channels, width)

from qrobust.models import register_model
register_model("plugnet", build_plugnet, options={"width": 4}, summary="a test plug-in")
'''


def test_a_registered_model_loads_from_the_path_alone_in_another_process(tmp_path):
    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "plugnets.py").write_text(MODULE)
    saved = _python(
        """
        import torch, qrobust, plugnets
        m = qrobust.build_model("plugnet", num_classes=3, in_channels=1, width=2)
        assert m.qrobust_arch["module"] == "plugnets", m.qrobust_arch
        q = qrobust.quantize(m, "w4a4")
        qrobust.save(q, "plug.safetensors")
        torch.save(q.eval()(torch.ones(1, 1, 8, 8)), "out.pt")
        """,
        tmp_path, plug,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    loaded = _python(
        """
        import sys, torch, qrobust
        assert "plugnets" not in sys.modules
        m = qrobust.load("plug.safetensors")  # imports plugnets, which registers 'plugnet'
        assert type(m).__name__ == "PlugNet" and m.qrobust_spec["name"] == "w4a4"
        assert torch.equal(m(torch.ones(1, 1, 8, 8)), torch.load("out.pt"))
        print("ok")
        """,
        tmp_path, plug,
    )  # fmt: skip
    assert loaded.returncode == 0 and "ok" in loaded.stdout, loaded.stderr
    gone = _python('import qrobust; qrobust.load("plug.safetensors")', tmp_path, tmp_path / "nowhere")
    assert gone.returncode != 0 and "registered by module 'plugnets', which does not import here" in gone.stderr


def test_an_entry_point_registers_a_model(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "plugnets.py").write_text(MODULE.split("register_model(")[0])  # the entry point is the builder itself
    dist = site / "plugnets-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugnets\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qrobust.models]\nepnet = plugnets:build_plugnet\n")
    r = _python(
        """
        import qrobust
        from qrobust.models import available_models
        assert "epnet" not in available_models()
        m = qrobust.build_model("epnet", num_classes=2, in_channels=1, width=3)
        print(type(m).__name__, m.qrobust_arch["name"], m.qrobust_arch["kwargs"]["width"])
        """,
        tmp_path, site,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["PlugNet", "epnet", "3"]


def test_the_own_model_example_runs(tmp_path):
    """examples/your_own_model.py: train, quantize (calibrated), fit, save, load into a skeleton, evaluate."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "QROBUST_NO_PROGRESS": "1"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "your_own_model.py"), "--out", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "relu_use2" in r.stdout and "relu_fn1" in r.stdout  # the shared ReLU and F.relu are quantized
    assert "stay float" not in r.stderr and "clip at act_clip" not in r.stderr
    line = r.stdout.strip().splitlines()[-1]
    accs = [float(w) for w in line.replace("|", " ").split() if w.replace(".", "", 1).isdigit()]
    assert accs[0] > 0.8 and accs[1] > 0.8, line  # float and w4a4 both learned digits
    assert (tmp_path / "out" / "w4a4" / "final.safetensors").is_file()
    json.loads((tmp_path / "out" / "w4a4" / "config.json").read_text())
