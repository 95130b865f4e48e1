"""qrobust.export.to_onnx: the integer ONNX graph run by onnxruntime computes the fake-quant model's function.

Real data: the embedded digits (trained here in a few seconds) and MNIST from ../shared/data. Tolerances: the
two graphs differ only by rounding (division vs multiplication by the reciprocal, folded BatchNorm, the int32
bias of the integer kernels on the accumulator's grid), and the last layer runs in float with its float bias,
so most samples' logits are equal to float precision (measured on digits: 95 % of samples within 1e-5 at
w8a8 and w4a4, against a logit range of about 16) and a few move because one activation somewhere upstream
flipped by one level — hence "95 % of samples within 1e-5" plus a bound on the mean, not on the max.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx", reason="the deploy extra (onnx, onnxruntime) is not installed: pip install -e '.[deploy]'")
pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed: pip install -e '.[deploy]'")

import onnx  # noqa: E402

from qrobust.data import load_dataset  # noqa: E402
from qrobust.errors import ConfigError, ExportError  # noqa: E402
from qrobust.export import graph as export_graph  # noqa: E402
from qrobust.export import onnx_session, read_onnx_metadata, sidecar_path, to_onnx  # noqa: E402
from qrobust.models import build_model  # noqa: E402
from qrobust.quant import quantize  # noqa: E402
from qrobust.training import fit  # noqa: E402

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = build_model("digits_cnn", in_channels=1, input_size=8)
    fit(model, train, epochs=3, lr=0.05, batch_size=64, seed=0)
    return model, train.tensors(256)[0], test.tensors()


def _logit_gap(qmodel, path, x):
    with torch.no_grad():
        ref = qmodel(x)
    dep = torch.from_numpy(onnx_session(path).run(["logits"], {"input": x.numpy()})[0])
    return (ref - dep).abs().amax(1), ref, dep


@pytest.mark.parametrize("spec", ["w8a8", "w4a4"])
def test_digits_export_agrees_with_fake_quant(digits, tmp_path, spec):
    model, calib, (x, y) = digits
    q = quantize(model, spec, calibrate=calib).eval()
    res = to_onnx(q, tmp_path / "m.onnx", calib=x)
    agreement = res.info["agreement"]
    assert agreement["n"] == len(x) == 359
    assert agreement["agreement"] >= 0.995
    gap, ref, dep = _logit_gap(q, res.path, x)
    assert (gap <= 1e-5).float().mean() >= 0.95  # almost every sample: equal to float precision
    assert gap.mean() <= 0.02
    assert (ref.argmax(1) == dep.argmax(1)).float().mean() == pytest.approx(agreement["agreement"])
    # the figures travel with the file: in its metadata and in the JSON beside it
    meta = read_onnx_metadata(res.path)
    assert meta["agreement"]["agreement"] == agreement["agreement"]
    assert json.loads(sidecar_path(res.path).read_text())["agreement"] == meta["agreement"]
    assert (meta["low_bit_storage"] is None) == (spec == "w8a8")


def test_graph_holds_integer_weights_and_folds_nothing_into_float(digits, tmp_path):
    model, calib, (x, _) = digits
    q = quantize(model, "w4a4", calibrate=calib).eval()
    res = to_onnx(q, tmp_path / "m.onnx", calib=x)
    proto = onnx.load(str(res.path))
    inits = {i.name: i for i in proto.graph.initializer}
    # after 4-bit activations the weights are int8 (u8·s8 cannot saturate there); the first layer reads the
    # float image, so its weights are the float32 values of its levels
    weights = [i for n, i in inits.items() if ".weight_int8" in n]
    assert len(weights) == 3 and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    first = onnx.numpy_helper.to_array(inits[next(n for n in inits if n.startswith("conv1.weight_levels"))])
    assert torch.equal(torch.from_numpy(first.copy()), q.conv1.quantized_weight().detach())
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and "Clip" in ops  # 4-bit activations clipped on the integers
    # the 4-bit weights are the same 15 integers the fake-quant layer used, each channel stretched by an
    # integer M ≤ 18 (the one that holds its bias best on the integer kernel's grid)
    w = onnx.numpy_helper.to_array(inits[next(n for n in inits if n.startswith("conv2.weight_int8"))])
    k = torch.from_numpy(w.astype("int64"))
    k_sim = torch.round(q.conv2.quantized_weight().detach()
                        / (q.conv2.weight.detach().abs().amax((1, 2, 3), True) / 7)).long()
    assert set(k_sim.unique().tolist()) <= set(range(-7, 8))
    m = k.abs().amax((1, 2, 3)) // k_sim.abs().amax((1, 2, 3))
    assert bool(((m >= 1) & (m <= 18)).all())
    assert torch.equal(k, k_sim * m.view(-1, 1, 1, 1))
    scale = onnx.numpy_helper.to_array(inits[next(n for n in inits if n.startswith("conv2.weight_scale"))])
    assert torch.allclose(torch.from_numpy(scale.copy()).double() * m.double(),
                          q.conv2.weight.detach().double().abs().amax((1, 2, 3)) / 7, rtol=1e-6)


@pytest.mark.parametrize("spec, stretch", [("w4a4", 8), ("w4a2", 42), ("w8a8", 1)])
def test_activations_below_8_bits_reach_the_next_layer_stretched(digits, tmp_path, spec, stretch):
    """Below 8 bits an activation's integers 0…n are re-expressed as multiples of A = ⌊128/n⌋ (scale s/A) before
    the next layer, so the integer kernel's int32 bias grid s_x·s_w is A× finer — and u8·s8 still cannot
    saturate int16 (2·A·n·127 < 2^15), so the weights stay int8."""
    model, calib, (x, _) = digits
    q = quantize(model, spec, calibrate=calib).eval()
    res = to_onnx(q, tmp_path / "m.onnx", calib=x)
    acts = {r["name"]: r for r in res.info["layers"] if r.get("op") == "QuantizeLinear"}
    assert sorted(acts) == ["act1", "act2", "act3"] and {r["act_stretch"] for r in acts.values()} == {stretch}
    proto = onnx.load(str(res.path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    pairs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and ".stretch" in n.name]
    assert len(pairs) == (0 if stretch == 1 else 3)
    for node in pairs:
        act = node.name.split(".stretch")[0]
        scale = float(inits[node.input[1]])
        assert scale == pytest.approx(acts[act]["range"][1] / (2 ** int(spec[-1]) - 1) / stretch, rel=1e-6)
    if stretch > 1:  # (8-bit activations keep their uint8 weights, see the module docstring)
        assert 2 * stretch * (2 ** int(spec[-1]) - 1) * 127 < 2**15
        assert any(".weight_int8" in n for n in inits) and not any(".weight_uint8" in n for n in inits)
    assert res.info["agreement"]["agreement"] >= 0.995


def test_mnist_small_cnn_w8a8_agrees(tmp_path):
    if not MNIST.is_dir():
        pytest.skip("../shared/data/mnist not present")
    torch.manual_seed(0)
    train = load_dataset("mnist", "train", root=MNIST.parent).subset(3000, seed=0)
    test = load_dataset("mnist", "test", root=MNIST.parent)
    model = build_model("small_cnn", in_channels=1, input_size=28, mean=0.1307, std=0.3081)
    fit(model, train, epochs=1, lr=0.05, batch_size=128, seed=0)
    x, y = test.tensors(1000)
    figures = {}
    for spec in ("w8a8", "w4a4"):
        q = quantize(model, spec, calibrate=train.tensors(512)[0]).eval()
        figures[spec] = to_onnx(q, tmp_path / f"{spec}.onnx", calib=x).info["agreement"]
    assert figures["w8a8"]["agreement"] >= 0.995
    assert figures["w4a4"]["agreement"] >= 0.99
    assert figures["w8a8"]["mean_abs_logit_diff"] < 0.01


def test_resnet20_batchnorm_folded_and_shortcuts(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    x = torch.rand(64, 3, 32, 32)
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding is tested
        for _ in range(3):
            model(x)
    q = quantize(model, "w8a8", calibrate=x).eval()
    # an untrained network on noise has near-tied logits, so predictions may flip where logits barely move:
    # this test is about the graph (BatchNorm folded, option-A shortcuts), the logits carry the check
    res = to_onnx(q, tmp_path / "r.onnx", calib=x, min_agreement=0.0)
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert "BatchNormalization" not in ops and {"Pad", "Slice", "Add"} <= ops
    folded = [r["batchnorm_folded"] for r in res.info["layers"] if r.get("op") == "Conv"]
    assert len(folded) == 19 and all(folded)
    assert res.info["agreement"]["max_rel_logit_diff"] < 0.05 and res.info["agreement"]["agreement"] >= 0.95
    # the graph as written (no integer fusions: float convolutions, the int32 biases dequantized) is the
    # simulation to float rounding and the biases' int32 rounding, which moves a pre-activation by at most
    # TIE_WINDOW levels: logits within a level or two, near-tied predictions of this untrained net may flip
    ref = res.info["agreement"]["graph_reference"]
    assert ref["agreement"] >= 0.95 and ref["max_abs_logit_diff"] < 2e-2


def test_binary_sign_activations_are_exported_exactly(digits, tmp_path):
    model, calib, (x, _) = digits
    q = quantize(model, "w1a1,act_scheme=sign,first_layer_bits=8,last_layer_bits=8").eval()
    res = to_onnx(q, tmp_path / "b.onnx", calib=x)
    ops = [n.op_type for n in onnx.load(str(res.path)).graph.node]
    assert ops.count("GreaterOrEqual") == 3 and ops.count("Where") == 3
    assert res.info["agreement"]["agreement"] >= 0.995
    bits = {r["name"]: r.get("weight_bits") for r in res.info["layers"] if r.get("op") in ("Conv", "Gemm")}
    assert bits == {"conv1": 8, "conv2": 1, "fc1": 1, "fc2": 8}


def test_per_layer_overrides_are_honoured(digits, tmp_path):
    model, calib, (x, _) = digits
    q = quantize(model, "w4a4,first_layer_bits=8,conv2=w2,act3=a8", calibrate=calib).eval()
    res = to_onnx(q, tmp_path / "o.onnx", calib=x)
    rows = {r["name"]: r for r in res.info["layers"]}
    assert [rows[n]["weight_bits"] for n in ("conv1", "conv2", "fc1", "fc2")] == [8, 2, 4, 4]
    assert [rows[n]["act_bits"] for n in ("act1", "act2", "act3")] == [4, 4, 8]
    assert rows["conv2"]["stretch"] == 127 and rows["conv1"]["stretch"] == 1
    # the learned clip range is the one in the graph: α / (2^b − 1) is the act1 scale
    proto = onnx.load(str(res.path))
    scale = next(onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.startswith("act1.scale"))
    assert float(scale) * 15 == pytest.approx(q.act1.act_range()[1], rel=1e-6)


def test_refused_below_threshold_leaves_no_file(digits, tmp_path, monkeypatch):
    model, calib, (x, _) = digits
    q = quantize(model, "w8a8", calibrate=calib).eval()
    real = export_graph.measure_agreement

    def broken(*args, **kwargs):
        return {**real(*args, **kwargs), "agreement": 0.5}

    monkeypatch.setattr(export_graph, "measure_agreement", broken)
    with pytest.raises(ExportError, match="50.00%.*nothing was written"):
        to_onnx(q, tmp_path / "m.onnx", calib=x)
    assert list(tmp_path.iterdir()) == []


def test_unmappable_ops_are_errors_not_float(digits, tmp_path):
    model, calib, (x, _) = digits

    class WithSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = build_model("digits_cnn", in_channels=1, input_size=8)
            self.gate = nn.Sigmoid()

        def forward(self, x):
            return self.gate(self.body(x))

    with pytest.raises(ExportError, match="gate.*Sigmoid.*no mapping"):
        to_onnx(quantize(WithSigmoid(), "w8a8").eval(), tmp_path / "s.onnx", calib=x)
    with pytest.raises(ExportError, match="act1.*silu.*not supported"):
        silu = build_model("digits_cnn", in_channels=1, input_size=8)
        silu.act1 = nn.SiLU()
        to_onnx(quantize(silu, "w8a8").eval(), tmp_path / "g.onnx", calib=x)
    with pytest.raises(ExportError, match="outside int8.*DoReFa"):
        to_onnx(quantize(model, "w8a8,weight_scheme=dorefa").eval(), tmp_path / "d.onnx", calib=x)
    with pytest.raises(ConfigError, match="quantized model"):
        to_onnx(model, tmp_path / "f.onnx", calib=x)
    assert list(tmp_path.iterdir()) == []


def test_fit_bias_keeps_a_near_tie_on_its_side_of_the_boundary():
    """A channel whose pre-activations sit 1.5e-5 levels above a rounding boundary (and others 3e-5 below
    another) gets a stretch and an int32 rounding that move it by less than that; a channel without ties gets
    the smallest error and, among equal ones, the largest stretch."""
    torch.manual_seed(0)
    scale, bias = torch.rand(6).double() * 0.1 + 0.01, torch.randn(6).double()
    step, most = 0.4, 18
    d = torch.tensor([1.5e-5, -3e-5, 1.5e-5], dtype=torch.float32)
    chans = torch.tensor([0, 0, 1])
    m, codes, grid, err, flips = export_graph._fit_bias(scale, bias, 0.05, most, (step, chans, d))
    assert m.min() >= 1 and m.max() <= most
    # the int32 bias is the float one to within e, in output levels
    assert torch.allclose(codes.double() * grid - bias, err * step, atol=1e-12)
    # the pre-activations the fit could save stay on their side
    saved = flips[:2] == 0
    assert bool(saved.all()), (err, flips)
    assert bool((err[0] > -1.5e-5) & (err[0] < 3e-5)) and bool(err[1] > -1.5e-5)
    # no tie: the smallest |e| of all 36 candidates
    for c in range(2, 6):
        ms = torch.arange(1, most + 1, dtype=torch.float64)
        g = torch.from_numpy((np.float32(0.05) * (scale[c] / ms).float().numpy()).astype(np.float64))
        e = torch.stack([torch.floor(bias[c] / g) * g - bias[c], (torch.floor(bias[c] / g) + 1) * g - bias[c]])
        assert float(err[c].abs()) == pytest.approx(float(e.abs().min()) / step, rel=1e-9)


def test_a_trained_cifar_w4a4_resnet_exports_exactly(tmp_path, caplog):
    """The zoo's adversarially trained ResNet-20 w4a4 has a channel whose pre-activations sit 1.5e-5 levels from
    a boundary on many images (constant regions): with onnxruntime's int32 bias rounded the plain way, 1.7 % of
    test predictions differed (98.3 % agreement, refused). Fitted per-channel stretch and bias, and that layer
    as ConvInteger with a float bias, agree on every calibration and held-out prediction."""
    import qrobust
    from qrobust.export import measure_agreement

    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not root.is_dir():
        pytest.skip("needs ../shared/data (CIFAR-10)")
    model = qrobust.load("zoo:cifar10-resnet20-w4a4-fgsm-rs").eval()
    x, _ = load_dataset("cifar10", "test", root=root).tensors(1000)
    with caplog.at_level("INFO", logger="qrobust.export.graph"):
        res = to_onnx(model, tmp_path / "w4.onnx", calib=x[:500])
    assert res.info["agreement"]["disagreements"] == 0
    assert "layer1.0.conv1" in caplog.text and "ConvInteger" in caplog.text  # said, not silent
    held_out = measure_agreement(model, onnx_session(res.path), x[500:])
    assert held_out["disagreements"] <= 1, held_out
    kinds = {r["name"]: r["op"] for r in res.info["layers"] if r.get("op") in ("Conv", "ConvInteger")}
    assert kinds["layer1.0.conv1"] == "ConvInteger"
    assert list(kinds.values()).count("ConvInteger") <= 3  # the rest stays on the fast integer kernels
    fused = [r for r in res.info["layers"] if isinstance(r.get("bias"), dict) and r["bias"]["storage"] == "int32"]
    assert len(fused) >= 6 and all(r["bias"]["max_error_levels"] < export_graph.TIE_WINDOW for r in fused)
