"""qrobust export / describe of an export / eval of an exported model, on the embedded digits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed: pip install -e '.[deploy]'")

from qrobust import checkpoint  # noqa: E402
from qrobust.cli import main  # noqa: E402
from qrobust.data import load_dataset  # noqa: E402
from qrobust.models import build_model  # noqa: E402
from qrobust.quant import quantize  # noqa: E402
from qrobust.training import fit  # noqa: E402


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    model = build_model("digits_cnn", in_channels=1, input_size=8)
    fit(model, train, epochs=3, lr=0.05, batch_size=64, seed=0)
    checkpoint.save(model, root / "float.safetensors", dataset="digits")
    q = quantize(model, "w4a4", calibrate=train.tensors(256)[0])
    checkpoint.save(q, root / "w4a4.safetensors", dataset="digits")
    return root


def test_export_onnx_and_describe(capsys, ckpts, tmp_path):
    code, out, err = _run(capsys, "export", ckpts / "w4a4.safetensors", "--out", tmp_path / "m.onnx", "--calib", 200)
    assert code == 0, err
    assert "agrees with the fake-quant model on" in out and "of 200 digits test images" in out
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["agreement"]["n"] == 200 and meta["agreement"]["agreement"] >= 0.99
    assert meta["source"]["checkpoint"].endswith("w4a4.safetensors")
    code, out, err = _run(capsys, "describe", tmp_path / "m.onnx")
    assert code == 0, err
    assert "size on disk" in out and "x smaller" in out and "agreement with the fake-quant model" in out
    assert out.count("uint8 (0…15 by Clip)") == 3 and "held in int8/uint8 tensors" in out


def test_export_packed_and_describe(capsys, ckpts, tmp_path):
    code, out, err = _run(capsys, "export", ckpts / "w4a4.safetensors", "--format", "packed",
                          "--out", tmp_path / "p.safetensors")
    assert code == 0, err
    size = (tmp_path / "p.safetensors").stat().st_size
    assert f"{size:,} bytes" in out and size < 0.2 * (ckpts / "w4a4.safetensors").stat().st_size
    code, out, err = _run(capsys, "describe", tmp_path / "p.safetensors")
    assert code == 0 and "packed low-bit checkpoint" in out


def test_export_refuses_float_models_and_folders(capsys, ckpts, tmp_path):
    code, _, err = _run(capsys, "export", ckpts / "float.safetensors", "--out", tmp_path / "f.onnx")
    assert code == 2 and "float model" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "export", ckpts / "w4a4.safetensors", "--out", tmp_path)
    assert code == 2 and "is a folder" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_of_an_onnx_export_reverifies_it(capsys, ckpts, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    assert _run(capsys, "export", ckpts / "w4a4.safetensors", "--out", onnx_path)[0] == 0
    code, out, err = _run(capsys, "eval", onnx_path, "--n", 30, "--n-queries", 30, "--parent",
                          ckpts / "float.safetensors", "--out", tmp_path / "rv")
    assert code == 0, err
    assert "deployed" in out and "simulated" in out and "report:" in out
    md = (tmp_path / "rv" / "deployed.md").read_text()
    assert all(a in md for a in ("square", "spsa", "transfer-pgd[twin,ste]", "diva[parent]", "worst case"))
    code, _, err = _run(capsys, "eval", onnx_path, "--twin", ckpts / "float.safetensors", "--out", tmp_path / "x")
    assert code == 1 and "not the checkpoint" in err
    code, _, err = _run(capsys, "eval", onnx_path, "--suite", "quick")
    assert code == 2 and "re-verification suite" in err


def test_an_export_of_a_zoo_model_finds_its_twin_in_the_zoo(capsys, tmp_path, monkeypatch):
    """`qrobust export zoo:NAME` records the zoo name as its source; re-verifying the export must resolve that
    name to the zoo's checkpoint (it used to look for a file called "zoo:NAME" and refuse)."""
    from qrobust import zoo
    from qrobust.export import DeployedModel, load_twin

    monkeypatch.delenv(zoo.ENV, raising=False)
    name = "zoo:digits-digits_cnn-w4a4-pgd-at"
    code, out, err = _run(capsys, "export", name, "--dataset", "digits", "--calib", 200, "--out", tmp_path / "z.onnx")
    assert code == 0, err
    deployed = DeployedModel(tmp_path / "z.onnx")
    assert deployed.qrobust_export["source"]["checkpoint"] == name
    twin = load_twin(deployed)
    assert twin.qrobust_meta["sha256"] == checkpoint.load(zoo.resolve(name)).qrobust_meta["sha256"]


def test_export_add_bits_saves_its_twin_and_says_the_function_changed(capsys, tmp_path, caplog):
    """--add-bits quantizes a ResNet's residual additions before exporting: a different function, so its
    fake-quant model is saved beside the export (the export's source, what eval re-verifies against) and the
    change in accuracy is said in a warning."""
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    model = build_model("resnet20", in_channels=1, input_size=8, num_classes=10)
    fit(model, train, epochs=1, lr=0.05, batch_size=64, seed=0)
    q = quantize(model, "w8a8", calibrate=train.tensors(256)[0])
    checkpoint.save(q, tmp_path / "r.safetensors", dataset="digits")
    with caplog.at_level("WARNING"):
        code, out, err = _run(capsys, "export", tmp_path / "r.safetensors", "--out", tmp_path / "m.onnx",
                              "--calib", 200, "--add-bits", 8)
    assert code == 0, err
    assert "a different function from" in caplog.text and "predictions changed" in caplog.text
    twin = tmp_path / "m.add8.safetensors"
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["source"]["checkpoint"] == str(twin) and "add_bits=8" in meta["spec"]["name"]
    loaded = checkpoint.load(twin)
    assert loaded.qrobust_meta["metadata"]["derived_from"] == str(tmp_path / "r.safetensors")
    assert sum(getattr(m, "kind", None) == "identity" for m in loaded.modules()) == 9
    code, out, err = _run(capsys, "export", twin, "--out", tmp_path / "n.onnx", "--add-bits", 8)
    assert code == 2 and "already quantized" in err and not (tmp_path / "n.onnx").exists()


def test_export_weight_dtype_chooses_the_weights_integer_type(capsys, ckpts, tmp_path):
    """After 8-bit activations `auto` stores uint8 weights (zero point 128); --weight-dtype int8 stores int8 ones
    (except where a layer falls back to ConvInteger, whose onnxruntime kernel takes uint8 weights)."""
    model = checkpoint.load(ckpts / "float.safetensors")
    q = quantize(model, "w8a8", calibrate=load_dataset("digits", "train").tensors(256)[0])
    checkpoint.save(q, tmp_path / "w8a8.safetensors", dataset="digits")
    storage = {}
    for dtype in ("auto", "int8"):
        code, _, err = _run(capsys, "export", tmp_path / "w8a8.safetensors", "--out", tmp_path / f"{dtype}.onnx",
                            "--calib", 200, "--weight-dtype", dtype)
        assert code == 0, err
        meta = json.loads((tmp_path / f"{dtype}.onnx.json").read_text())
        assert meta["weight_dtype"] == dtype
        storage[dtype] = {la["name"]: la["storage"].split()[0] for la in meta["layers"]
                          if "weight_bits" in la and la["op"] != "ConvInteger" and la["name"] != "conv1"}
    assert len(storage["auto"]) >= 2 and len(storage["int8"]) >= 2  # conv1 reads the float image
    assert set(storage["auto"].values()) == {"uint8"} and set(storage["int8"].values()) == {"int8"}
