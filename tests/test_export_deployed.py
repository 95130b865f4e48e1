"""Re-verification: the ONNX graph as a module, DIVA, and deployed-vs-simulated reports on the same points."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed: pip install -e '.[deploy]'")

from qrobust import checkpoint  # noqa: E402
from qrobust.attacks import DIVA, PGD, Square  # noqa: E402
from qrobust.data import load_dataset  # noqa: E402
from qrobust.errors import CheckpointError, InputError  # noqa: E402
from qrobust.evaluation import reverify  # noqa: E402
from qrobust.evaluation.deployed import compare_reports  # noqa: E402
from qrobust.evaluation.results import mask_str, str_mask  # noqa: E402
from qrobust.export import DeployedModel, load_twin, to_onnx  # noqa: E402
from qrobust.models import build_model  # noqa: E402
from qrobust.quant import quantize  # noqa: E402
from qrobust.training import fit  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployed")
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    parent = build_model("digits_cnn", in_channels=1, input_size=8)
    fit(parent, train, epochs=3, lr=0.05, batch_size=64, seed=0)
    q = quantize(parent, "w4a4", calibrate=train.tensors(256)[0]).eval()
    checkpoint.save(q, root / "w4a4.safetensors", dataset="digits")
    twin = checkpoint.load(root / "w4a4.safetensors")
    x, y = test.tensors(80)
    to_onnx(twin, root / "m.onnx", calib=test.tensors()[0],
            source={"checkpoint": str(root / "w4a4.safetensors"), "sha256": twin.qrobust_meta["sha256"],
                    "header_sha256": twin.qrobust_meta["header_sha256"], "dataset": "digits"})
    checkpoint.save(parent, root / "float.safetensors", dataset="digits")
    return root, DeployedModel(root / "m.onnx"), twin, parent.eval(), (x, y)


def test_deployed_model_is_the_graph_and_has_no_gradients(setup):
    root, deployed, twin, _, (x, y) = setup
    with torch.no_grad():
        assert (deployed(x).argmax(1) == twin(x).argmax(1)).all()
    with pytest.raises(InputError, match="no gradients.*black-box"):
        PGD(deployed, eps=0.1, steps=2)(x, y)
    x_adv = Square(deployed, eps=0.1, n_queries=20, seed=0)(x, y)  # a black-box attack runs on it
    assert (x_adv - x).abs().max() <= 0.1 + 1e-7
    assert load_twin(deployed).qrobust_meta["sha256"] == twin.qrobust_meta["sha256"]
    with pytest.raises(CheckpointError, match="not the checkpoint"):
        load_twin(deployed, root / "float.safetensors")


def test_diva_widens_the_float_vs_deployed_gap(setup):
    _, deployed, twin, parent, (x, y) = setup
    atk = DIVA(deployed, twin=twin, reference=parent, eps=0.1, steps=20, early_stop=False, seed=0)
    x_adv = atk(x, y)
    with torch.no_grad():
        def disagree(z):  # the parent right, the deployed graph wrong
            return int(((parent(z).argmax(1) == y) & (deployed(z).argmax(1) != y)).sum())
        assert disagree(x_adv) >= disagree(x) + 5
        assert (deployed(x_adv).argmax(1) == y).float().mean() < (deployed(x).argmax(1) == y).float().mean()


def test_reverify_puts_deployed_and_simulated_side_by_side(setup, tmp_path):
    _, deployed, twin, parent, (x, y) = setup
    comp = reverify(deployed, twin, (x[:40], y[:40]), eps=0.1, parent=parent, n_queries=50, spsa_steps=3,
                    spsa_samples=16, steps=5)
    attacks = [r["attack"] for r in comp.rows]
    assert attacks == ["clean", "square", "spsa", "transfer-pgd[twin,ste]", "diva[parent]", "worst case"]
    assert comp.rows[0]["deployed"] == comp.rows[0]["simulated"]  # the export agrees on these points
    assert all(r["n"] == 40 for r in comp.rows)
    assert [f.split(":")[0] for f in comp.flags] == [f"ε=0.1 {r['attack']}" for r in comp.rows if abs(r["gap"]) > 0.01]
    out = comp.save(tmp_path)
    md = (out / "deployed.md").read_text()
    assert "| 0.1 | worst case |" in md and "McNemar" in md
    assert "![deployed vs simulated](deployed_vs_simulated.png)" in md
    assert (out / "deployed_vs_simulated.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gap_above_one_point_is_flagged(setup):
    _, deployed, twin, parent, (x, y) = setup
    comp = reverify(deployed, twin, (x[:20], y[:20]), eps=0.1, n_queries=20, spsa_steps=2, spsa_samples=8, steps=2)
    sim = comp.simulated
    robust = str_mask(sim.results[0].robust)
    assert int(robust.sum()) >= 2
    worse = robust.clone()
    worse[robust.nonzero()[:2, 0]] = False  # the same report with two robust points broken: 10 points on 20
    broken = dataclasses.replace(sim, results=[dataclasses.replace(sim.results[0], robust=mask_str(worse))])
    rows, flags = compare_reports(broken, sim)
    worst = next(r for r in rows if r["attack"] == "worst case")
    assert worst["gap"] == pytest.approx(-0.1) and worst["flagged"]
    assert worst["only_deployed_broken"] == 2 and worst["only_simulated_broken"] == 0
    assert [f for f in flags if "worst case" in f]
    assert not any(r["flagged"] for r in rows if r["attack"] != "worst case")
    rows, flags = compare_reports(sim, sim)
    assert flags == [] and all(r["gap"] == 0 for r in rows)
