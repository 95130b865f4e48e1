"""``add_bits``: the operands of residual additions quantized, so that an integer runtime adds integers.

The simulation side (which operands, their grid, calibration, checkpoints, a quantized model's additions
quantized afterwards) and the export side: with the additions quantized, onnxruntime runs every convolution
but the first and every addition on integers (QLinearConv, QLinearAdd) — the graph docs/deploy.md measures.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust import checkpoint
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.quant import QuantAct, QuantSpec, quantize, quantize_additions
from qrobust.quant.layers import AddOperand


def _resnet(shortcut: str = "A") -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, shortcut=shortcut)
    x = torch.rand(32, 3, 32, 32)
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(2):
            model(x)
    return model.eval()


def _operands(model: nn.Module) -> dict[str, QuantAct]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantAct) and m.kind == "identity"}


def test_spec_add_bits_parses_round_trips_and_refuses_nonsense():
    spec = QuantSpec.parse("w4a4,add_bits=8")
    assert spec.add_bits == 8 and QuantSpec.parse(str(spec)) == spec == QuantSpec.from_dict(spec.to_dict())
    assert "add_bits" not in QuantSpec.parse("w4a4").to_dict()  # records written before it existed stay equal
    with pytest.raises(ConfigError, match="add_bits must be 2–8"):
        QuantSpec.parse("w4a4,add_bits=1")
    with pytest.raises(ConfigError, match="float activations"):
        QuantSpec.parse("w4a32,add_bits=8")


def test_resnet_branches_are_quantized_and_shortcuts_from_activations_are_not():
    x = torch.rand(16, 3, 32, 32)
    q = quantize(_resnet("A"), "w4a4,add_bits=8", calibrate=x).eval()
    ops = _operands(q)
    # one per block: the branch after bn2; the option-A shortcut is a slice and zero padding of the previous
    # block's quantized activation, already on its grid
    assert sorted(ops) == sorted(f"layer{s}.{b}.add_in1" for s in (1, 2, 3) for b in range(3))
    assert not any(isinstance(m, AddOperand) for m in q.modules())  # every marker became a quantizer
    qb = quantize(_resnet("B"), "w4a4,add_bits=8", calibrate=x).eval()
    # a projection shortcut (1×1 conv + BN) is float, so the two downsampling blocks quantize both operands
    assert len(_operands(qb)) == 9 + 2 and "layer2.0.add_in2" in _operands(qb)
    assert not _operands(quantize(_resnet("A"), "w4a4", calibrate=x))


def test_an_operand_sits_on_symmetric_levels_calibrated_to_its_largest_magnitude():
    x = torch.rand(16, 3, 32, 32)
    model = _resnet()
    q = quantize(model, "w8a8,add_bits=8", calibrate=x).eval()
    seen: dict[str, torch.Tensor] = {}
    m = q.get_submodule("layer2.1.add_in1")
    h = m.register_forward_hook(lambda _m, i, o: seen.update(inp=i[0].detach(), out=o.detach()))
    with torch.no_grad():
        q(x)
    h.remove()
    lo, hi = m.act_range()
    step = m.act_quant.scale
    assert hi == pytest.approx(seen["inp"].abs().max().item(), rel=0.05)  # calibrated: the float model's peak
    assert lo == pytest.approx(-128 * step) and hi == pytest.approx(127 * step)
    k = seen["out"] / step
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert k.round().min() >= -128 and k.round().max() == 127  # the peak itself is the top level
    assert len(torch.unique(k.round())) > 100  # 8 bits: many levels used, not a collapsed grid
    m.quant_enabled = False  # float: exactly the identity
    with torch.no_grad():
        assert torch.equal(m(seen["inp"]), seen["inp"])


def test_a_users_functional_addition_is_found():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = F.relu(self.a(x)) + self.b(x)  # one operand already quantized, one float
            return self.head(torch.relu(h))

    q = quantize(Net(), "w8a8,add_bits=8", calibrate=torch.randn(64, 4)).eval()
    assert list(_operands(q)) == ["add_in1"]
    assert q(torch.randn(3, 4)).shape == (3, 2)


def test_checkpoint_round_trip_and_quantizing_a_quantized_models_additions(tmp_path):
    x = torch.rand(16, 3, 32, 32)
    q = quantize(_resnet(), "w4a4", calibrate=x).eval()
    q8 = quantize_additions(q, 8, calibrate=x).eval()
    assert len(_operands(q8)) == 9 and QuantSpec.coerce(q8.qrobust_spec).add_bits == 8
    assert not _operands(q)  # the original is untouched
    with torch.no_grad():
        y, y8 = q(x), q8(x)
    assert 0 < (y - y8).abs().max() < 0.5 * y.abs().max()  # a different function, by one rounding per branch
    path = checkpoint.save(q8, tmp_path / "m.safetensors")
    back = checkpoint.load(path).eval()
    with torch.no_grad():
        assert torch.equal(back(x), y8)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_additions(q8, 8)
    with pytest.raises(ConfigError, match="for a float model"):
        quantize_additions(_resnet(), 8)


def test_with_quantized_additions_onnxruntime_runs_every_conv_and_add_on_integers(tmp_path):
    pytest.importorskip("onnxruntime", reason="the deploy extra is not installed: pip install -e '.[deploy]'")
    import onnx
    import onnxruntime as ort

    from qrobust.export import to_onnx

    x = torch.rand(64, 3, 32, 32)
    fused = {}
    for spec in ("w8a8", "w8a8,add_bits=8"):
        q = quantize(_resnet(), spec, calibrate=x).eval()
        # an untrained network on noise has near-tied logits: the logits carry the check (as in test_export)
        res = to_onnx(q, tmp_path / "r.onnx", calib=x, min_agreement=0.0)
        assert res.info["agreement"]["max_rel_logit_diff"] < 0.05
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(res.path), sess_options=opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        fused[spec] = {op: ops.count(op) for op in set(ops)}
    plain, added = fused["w8a8"], fused["w8a8,add_bits=8"]
    assert plain.get("QLinearAdd", 0) == 0  # float additions: the branch convolutions stay float
    assert added.get("QLinearAdd") == 9
    integer_convs = added.get("QLinearConv", 0) + added.get("ConvInteger", 0)
    assert integer_convs == 18 > plain.get("QLinearConv", 0) + plain.get("ConvInteger", 0)  # all but the first
