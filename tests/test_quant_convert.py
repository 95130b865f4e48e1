"""quantize(), the quantized layers, state-dict compatibility, float surrogate, describe()."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import CheckpointError, ConfigError
from qrobust.quant import (
    ClipActQuantizer,
    LSQWeightQuantizer,
    PACTActQuantizer,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    describe,
    format_description,
    gradient_mode,
    is_quantized,
    load_float_state_dict,
    quant_modules,
    quantization_disabled,
    quantize,
    quantizer_state_keys,
    size_totals,
)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """ResNet-like: stem, two stages of blocks (one with a projection shortcut), pooling, fc."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = act()
        self.layer1 = nn.Sequential(Block(4, 4, 1, act))
        self.layer2 = nn.Sequential(Block(4, 8, 2, act), Block(8, 8, 1, act))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)
        self.qrobust_arch = {"name": "tiny_resnet", "kwargs": {}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.pool(x).flatten(1))


WEIGHT_NAMES = [
    "conv1",
    "layer1.0.conv1",
    "layer1.0.conv2",
    "layer2.0.conv1",
    "layer2.0.conv2",
    "layer2.0.shortcut.0",
    "layer2.1.conv1",
    "layer2.1.conv2",
    "fc",
]
ACT_NAMES = ["relu"] + [f"{b}.relu{i}" for b in ("layer1.0", "layer2.0", "layer2.1") for i in (1, 2)]


def make_model(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    model = TinyResNet(act)
    # non-trivial BatchNorm statistics so that eval-mode outputs are not all alike
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 8, 8))
    return model.eval()


def x_batch(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------------------
# which modules get replaced
# ---------------------------------------------------------------------------------------------------------
def test_quantize_sequential_replaces_exactly_the_expected_modules():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3),
        nn.ReLU6(),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    q = quantize(model, "w4a4")
    types = [type(m) for m in q]
    assert types == [QuantConv2d, nn.BatchNorm2d, QuantAct, QuantConv2d, QuantAct, nn.Flatten, QuantLinear]
    assert q[2].kind == "relu" and q[4].kind == "relu6"
    assert q(torch.rand(2, 1, 6, 6)).shape == (2, 3)


def test_quantize_nested_model_replaces_by_name():
    q = quantize(make_model(), "w4a4")
    weight = sorted(n for n, m in q.named_modules() if isinstance(m, (QuantConv2d, QuantLinear)))
    acts = sorted(n for n, m in q.named_modules() if isinstance(m, QuantAct))
    assert weight == sorted(WEIGHT_NAMES)
    assert acts == sorted(ACT_NAMES)
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU, nn.ReLU6) for m in q.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in q.modules()) == 8  # untouched
    assert isinstance(q.fc, QuantLinear) and isinstance(q.layer2[0].shortcut[0], QuantConv2d)


def test_first_last_and_override_bits():
    spec = QuantSpec.parse(
        "w4a4,first_layer_bits=8,last_layer_bits=32,layer2.0.conv1=w2,layer2.1=w3a3,layer1.0.relu1=a1"
    )
    q = quantize(make_model(), spec)
    bits = {n: m.weight_bits for n, m in q.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    assert bits == {
        "conv1": 8,
        "layer1.0.conv1": 4,
        "layer1.0.conv2": 4,
        "layer2.0.conv1": 2,
        "layer2.0.conv2": 4,
        "layer2.0.shortcut.0": 4,
        "layer2.1.conv1": 3,
        "layer2.1.conv2": 3,
        "fc": 32,
    }
    abits = {n: m.bits for n, m in q.named_modules() if isinstance(m, QuantAct)}
    assert abits["layer1.0.relu1"] == 1 and abits["layer2.1.relu1"] == 3 and abits["layer2.1.relu2"] == 3
    assert abits["relu"] == 4 and abits["layer2.0.relu2"] == 4
    assert q.fc.weight_quant is None  # 32 bits: no quantizer at all


def test_last_layer_is_the_last_linear_else_the_last_conv():
    class FcFirst(nn.Module):  # registers its classifier before its convolutions
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.a = nn.Conv2d(1, 4, 3)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.b(self.a(x)).mean((2, 3)))

    q = quantize(FcFirst(), "w4a4,first_layer_bits=8,last_layer_bits=6")
    assert (q.fc.weight_bits, q.a.weight_bits, q.b.weight_bits) == (6, 4, 4)  # first is module order's first
    conv_only = quantize(
        nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 1)), "w4a4,last_layer_bits=8"
    )
    assert (conv_only[0].weight_bits, conv_only[2].weight_bits) == (4, 8)


def test_override_with_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        quantize(make_model(), "w4a4,layer9.conv1=w2")
    assert "layer9.conv1" in str(e.value) and "layer1.0.conv1" in str(e.value)


def test_override_act_bits_on_a_conv_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="qrobust.quant.convert"):
        q = quantize(make_model(), "w4a4,layer1.0.conv1=w2a2")
    assert q.layer1[0].conv1.weight_bits == 2
    assert any("activation settings" in r.getMessage() for r in caplog.records)


def test_subclasses_are_left_alone_with_a_warning(caplog):
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(1, 1, 1), nn.ReLU())
    with caplog.at_level(logging.WARNING, logger="qrobust.quant.convert"):
        q = quantize(model, "w4a4")
    assert type(q[0]) is MyConv and isinstance(q[1], QuantAct)
    assert any("MyConv" in r.getMessage() for r in caplog.records)


def test_quantize_single_layer_root():
    lin = nn.Linear(3, 2)
    q = quantize(lin, "w2a2")
    assert isinstance(q, QuantLinear) and q.qrobust_spec["weight_bits"] == 2


def test_quantize_twice_is_an_error():
    q = quantize(make_model(), "w4a4")
    with pytest.raises(ConfigError, match="already"):
        quantize(q, "w2a2")


def test_bad_spec_is_a_config_error():
    with pytest.raises(ConfigError):
        quantize(make_model(), "w9a4")
    with pytest.raises(ConfigError):
        quantize(make_model(), {"weight_bits": 4, "colour": "red"})


# ---------------------------------------------------------------------------------------------------------
# copies, attributes, state dicts
# ---------------------------------------------------------------------------------------------------------
def test_deepcopy_by_default_and_inplace_on_request():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    q = quantize(model, "w4a4")
    assert q is not model and not is_quantized(model) and is_quantized(q)
    assert not hasattr(model, "qrobust_spec")
    with torch.no_grad():
        q.conv1.weight.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    params = {n: p for n, p in model.named_parameters()}
    q2 = quantize(model, "w4a4", inplace=True)
    assert q2 is model and is_quantized(model)
    assert all(p is params[n] for n, p in q2.named_parameters() if n in params)


def test_attributes_set_and_kept():
    spec = QuantSpec.parse("w4a4,weight_scheme=lsq")
    q = quantize(make_model(), spec)
    assert q.qrobust_spec == spec.to_dict()
    assert QuantSpec.from_dict(q.qrobust_spec) == spec
    assert q.qrobust_arch == {"name": "tiny_resnet", "kwargs": {}}


def test_trained_weights_are_kept():
    model = make_model(seed=3)
    q = quantize(model, "w4a4,weight_scheme=lsq")
    for name, p in model.named_parameters():
        assert torch.equal(dict(q.named_parameters())[name], p)
    # LSQ steps initialised from those weights
    w = model.layer1[0].conv1.weight
    assert q.layer1[0].conv1.weight_quant.step.item() == pytest.approx(
        2 * w.abs().mean().item() / math.sqrt(7)
    )


@pytest.mark.parametrize("spec", ["w4a4", "w1a1", "w4a4,weight_scheme=uniform_per_channel"])
def test_state_dict_keys_identical_for_schemes_without_learned_state(spec):
    model = make_model()
    assert set(quantize(model, spec).state_dict()) == set(model.state_dict())


def test_state_dict_keys_superset_with_lsq_and_pact():
    model = make_model()
    q = quantize(model, "w4a4,weight_scheme=lsq,act_scheme=pact")
    extra = set(q.state_dict()) - set(model.state_dict())
    assert set(model.state_dict()) <= set(q.state_dict())
    assert extra == set(quantizer_state_keys(q))
    assert "layer1.0.conv1.weight_quant.step" in extra and "layer1.0.relu1.act_quant.alpha" in extra
    assert "layer1.0.conv1.weight" in q.state_dict()


def test_load_float_state_dict_into_quantized_model():
    trained = make_model(seed=5)
    fresh = quantize(make_model(seed=6), "w4a4,weight_scheme=lsq,act_scheme=pact,act_clip=3")
    missing = load_float_state_dict(fresh, trained.state_dict())
    assert set(missing) == set(quantizer_state_keys(fresh))
    reference = quantize(trained, "w4a4,weight_scheme=lsq,act_scheme=pact,act_clip=3")
    x = x_batch()
    assert torch.equal(fresh(x), reference(x))  # LSQ steps re-initialised from the loaded weights
    assert fresh.relu.act_quant.alpha.item() == 3.0


def test_load_float_state_dict_strictness():
    q = quantize(make_model(), "w4a4")
    sd = make_model().state_dict()
    with pytest.raises(CheckpointError, match="unexpected"):
        load_float_state_dict(q, {**sd, "extra.weight": torch.zeros(1)})
    partial = {k: v for k, v in sd.items() if k != "fc.bias"}
    with pytest.raises(CheckpointError, match="fc.bias"):
        load_float_state_dict(q, partial)
    with pytest.raises(CheckpointError):
        load_float_state_dict(q, {**sd, "fc.weight": torch.zeros(3, 3)})
    assert load_float_state_dict(q, partial, strict=False) == []


def test_quantized_state_dict_round_trip():
    spec = "w4a4,weight_scheme=lsq,act_scheme=pact"
    q = quantize(make_model(seed=1), spec)
    with torch.no_grad():
        q.layer1[0].conv1.weight_quant.step.mul_(1.7)
        q.relu.act_quant.alpha.fill_(2.5)
    other = quantize(make_model(seed=2), spec)
    other.load_state_dict(q.state_dict())
    x = x_batch()
    assert torch.equal(other(x), q(x))
    assert load_float_state_dict(other, q.state_dict()) == []  # quantizer state present: kept as is
    assert other.layer1[0].conv1.weight_quant.step.item() == q.layer1[0].conv1.weight_quant.step.item()


# ---------------------------------------------------------------------------------------------------------
# outputs: float equivalence, surrogate, modes
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_w32a32_is_identical_to_float(act):
    model = make_model(act)
    x = x_batch()
    assert torch.equal(quantize(model, "w32a32")(x), model(x))


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
@pytest.mark.parametrize(
    "spec",
    [
        "w4a4",
        "w2a2,act_clip=0.5",
        "w4a4,weight_scheme=lsq,act_scheme=pact,act_clip=1",
        "w1a1,act_scheme=sign",
    ],
)
def test_quantization_disabled_is_exactly_the_float_model(act, spec):
    model = make_model(act)
    q = quantize(model, spec)
    x = x_batch() * 4  # large enough that a clip at α would change a ReLU model's output
    quantized_out = q(x)
    assert not torch.equal(quantized_out, model(x))
    with quantization_disabled(q):
        assert torch.equal(q(x), model(x))
    assert torch.equal(q(x), quantized_out)  # restored afterwards


def test_quant_act_disabled_keeps_the_original_activation_kind():
    x = torch.tensor([-1.0, 0.5, 3.0, 7.0, 100.0])
    relu_act = QuantAct(4, clip=2.0, kind="relu")
    relu6_act = QuantAct(4, clip=2.0, kind="relu6")
    relu_act.quant_enabled = relu6_act.quant_enabled = False
    assert torch.equal(relu_act(x), F.relu(x)) and torch.equal(relu6_act(x), F.relu6(x))
    assert QuantAct(4, clip=8.0, kind="relu6").act_quant.alpha == 6.0  # never wider than ReLU6
    assert QuantAct(4, clip=8.0, kind="relu").act_quant.alpha == 8.0


def test_quant_modules_carry_the_flag():
    q = quantize(make_model(), "w4a4,weight_scheme=lsq")
    mods = quant_modules(q)
    assert sum(isinstance(m, QuantConv2d) for m in mods) == 8
    assert sum(isinstance(m, LSQWeightQuantizer) for m in mods) == 9
    assert sum(isinstance(m, ClipActQuantizer) for m in mods) == 7
    assert all(m.quant_enabled for m in mods)


def test_quant_conv_forward_uses_the_quantized_weight():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    q = QuantConv2d.from_float(conv, weight_bits=3, weight_scheme="uniform")
    x = x_batch()
    assert q.weight is conv.weight and q.bias is conv.bias
    assert torch.equal(q(x), F.conv2d(x, q.weight_quant(conv.weight), conv.bias, padding=1))
    assert not torch.equal(q(x), conv(x))
    assert torch.equal(QuantConv2d.from_float(conv, weight_bits=32)(x), conv(x))


def test_native_mode_zeroes_the_input_gradient_of_a_quantized_model():
    q = quantize(make_model(), "w4a4")
    x = x_batch().requires_grad_(True)
    with gradient_mode("native"):
        q(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None
    q(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_ste_training_step_reduces_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    q = quantize(model, "w4a4,weight_scheme=lsq,act_scheme=pact,act_clip=2")
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(q.parameters(), lr=0.02)
    first = F.cross_entropy(q(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(q(x), y).backward()
        opt.step()
    assert F.cross_entropy(q(x), y).item() < 0.7 * first
    assert q[1].act_quant.alpha.item() != 2.0  # PACT α learned


def test_quantizer_parameters_follow_the_model_dtype():
    model = make_model().double()
    q = quantize(model, "w4a4,weight_scheme=lsq,act_scheme=pact")
    assert q.relu.act_quant.alpha.dtype == torch.float64
    assert q.conv1.weight_quant.step.dtype == torch.float64
    assert q(x_batch().double()).dtype == torch.float64
    assert isinstance(q.relu.act_quant, PACTActQuantizer)


# ---------------------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------------------
def bn_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def test_describe_sizes_by_definition():
    rows = describe(quantize(mlp(), "w4a4,weight_scheme=uniform"))
    assert [(r["name"], r["kind"], r["weight_bits"], r["act_bits"]) for r in rows] == [
        ("0", "weight", 4, None),
        ("1", "act", None, 4),
        ("2", "weight", 4, None),
    ]
    # weights at 4 bits; biases and the one per-tensor scale at 32; the act's clip level α at 32
    assert [r["size_bits"] for r in rows] == [200 * 4 + 32 * (20 + 1), 32, 100 * 4 + 32 * (5 + 1)]
    t = size_totals(rows)
    assert t["float_bits"] == 32 * (220 + 105)
    assert t["size_bits"] == 2096
    assert t["compression"] == pytest.approx(10400 / 2096)


def test_describe_schemes_count_their_scales():
    per_ch = describe(quantize(mlp(), "w4a32,weight_scheme=uniform_per_channel"))
    assert per_ch[0]["size_bits"] == 200 * 4 + 32 * (20 + 20) and per_ch[1]["size_bits"] == 0
    dorefa = describe(quantize(mlp(), "w4a32,weight_scheme=dorefa"))
    assert dorefa[0]["size_bits"] == 200 * 4 + 32 * 20  # DoReFa levels need no scale
    binary = describe(quantize(mlp(), "w1a1,act_scheme=sign"))
    assert binary[0]["scheme"] == "binary" and binary[0]["size_bits"] == 200 + 32 * (20 + 20)
    assert binary[1]["scheme"] == "sign" and binary[1]["size_bits"] == 0
    lsq = describe(quantize(mlp(), "w4a4,weight_scheme=lsq,act_scheme=pact"))
    assert lsq[0]["params"] == 221 and lsq[1]["params"] == 1


def test_describe_float_model_and_other_parameters():
    model = make_model()
    rows = describe(model)
    other = [r for r in rows if r["kind"] == "other"]
    assert len(other) == 1 and other[0]["params"] == bn_params(model) and other[0]["type"] == "BatchNorm2d"
    t = size_totals(rows)
    assert t["params"] == sum(p.numel() for p in model.parameters())
    assert t["size_bits"] == t["float_bits"] == 32 * t["params"] and t["compression"] == 1.0
    assert {r["scheme"] for r in rows} == {"float"}


def test_describe_quantized_resnet_totals_and_table():
    model = make_model()
    q = quantize(model, "w4a4,weight_scheme=dorefa,first_layer_bits=8,last_layer_bits=8")  # DoReFa: no scales
    rows = describe(q)
    by_name = {r["name"]: r for r in rows}
    assert by_name["conv1"]["weight_bits"] == 8 and by_name["layer1.0.conv1"]["weight_bits"] == 4
    t = size_totals(rows)
    assert t["float_bits"] == size_totals(describe(model))["float_bits"]
    conv_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    first, fc = model.conv1.weight.numel(), model.fc
    expected = (
        4 * (conv_w - first) + 8 * first + 8 * fc.weight.numel() + 32 * fc.bias.numel()  # weights and fc bias
        + 32 * len(ACT_NAMES)  # one clip level per activation
        + 32 * bn_params(model)
    )  # fmt: skip
    assert t["size_bits"] == expected
    text = format_description(rows)
    assert "layer2.0.shortcut.0" in text and "QuantConv2d" in text and "(other)" in text
    assert f"{t['compression']:.2f}x smaller" in text


# ---- a model of one's own: functional and shared activations, signed activations, ranges ------------------
class FunctionalNet(nn.Module):
    """Every way an activation can hide: F.relu, torch.relu, x.relu(), one nn.ReLU used twice, in-place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        y = F.relu(self.body(y) + y)  # a residual add, then a functional relu
        y = torch.relu(self.act(y)).relu()  # the shared module's second use, torch.relu, a method
        return self.fc(F.max_pool2d(y, 2).flatten(1))


def _site_calls(model: nn.Module) -> dict[str, int]:
    calls: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantAct):
            m.register_forward_hook(lambda _m, _i, _o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    return calls


def test_functional_and_shared_activations_each_get_a_quantizer():
    torch.manual_seed(0)
    net = FunctionalNet().eval()
    q = quantize(net, "w4a4").eval()
    assert type(q) is FunctionalNet  # the model keeps its class
    sites = {n: m.kind for n, m in q.named_modules() if isinstance(m, QuantAct)}
    assert sites == {"act": "relu", "act_use2": "relu", "relu_fn1": "relu", "relu_fn2": "relu", "relu_fn3": "relu"}
    calls = _site_calls(q)
    x = torch.rand(3, 1, 8, 8)
    y = q(x)
    assert calls == dict.fromkeys(sites, 1)  # each site runs once per forward: nothing bypasses its quantizer
    with quantization_disabled(q):
        torch.testing.assert_close(q(x), net(x), rtol=0, atol=0)  # the rewritten forward is the same function
    assert not torch.equal(y, net(x))
    assert isinstance(net.act, nn.ReLU) and "forward" not in vars(net)  # the original is untouched
    assert [r["kind"] for r in describe(q)].count("float-op") == 0


def test_signed_activations_quantize_on_an_affine_grid_that_matches_torch():
    torch.manual_seed(0)
    for act, low in [(nn.SiLU(), -0.2785), (nn.GELU(), -0.170), (nn.LeakyReLU(0.1), -0.6), (nn.Hardswish(), -0.375)]:
        q = quantize(nn.Sequential(nn.Linear(3, 3), act), "w32a8")
        qa = q[1]
        assert isinstance(qa, QuantAct) and qa.kind != "relu"
        lo, hi = qa.act_range()
        assert hi == pytest.approx(6.0) and lo < 0 and lo == pytest.approx(low, abs=6.0 / 255)
        x = torch.linspace(-8, 8, 401)
        f = act(x)
        qa_ = qa.act_quant
        expected = torch.fake_quantize_per_tensor_affine(f, qa_.scale, -qa_.qmin, 0, 255)
        torch.testing.assert_close(qa(x), expected, rtol=0, atol=0)
        assert qa(x).min() < 0  # negative outputs keep a sign
        with quantization_disabled(qa):
            torch.testing.assert_close(qa(x), f, rtol=0, atol=0)


def test_signed_activation_refuses_pact():
    with pytest.raises(ConfigError, match=r"activation '1' \(SiLU\).*pact"):
        quantize(nn.Sequential(nn.Linear(3, 3), nn.SiLU()), "w4a4,act_scheme=pact")


def test_float_ops_are_warned_about_and_described(caplog):
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.t, self.fc2 = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.t(self.fc1(x)) * torch.sigmoid(x))

    with caplog.at_level(logging.WARNING, logger="qrobust.quant.convert"):
        q = quantize(Gate(), "w4a4")
    text = caplog.text
    assert "2 activation(s) stay float" in text and "not fully w4a4" in text
    assert "t: Tanh module" in text and "torch.sigmoid in forward" in text
    rows = [r for r in describe(q) if r["kind"] == "float-op"]
    assert [r["name"] for r in rows] == ["t", "sigmoid"]
    assert "float on the data path: 2 activation(s) (t, sigmoid)" in format_description(describe(q))


def test_a_forward_that_does_not_trace_says_what_it_may_miss(caplog):
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = F.relu(x)
            return self.act(self.fc(x))

    with caplog.at_level(logging.WARNING, logger="qrobust.quant.convert"):
        q = quantize(Branchy(), "w4a4")
    assert isinstance(q.act, QuantAct)  # the module is still quantized
    assert "not traced" in caplog.text and "functional activations and shared modules cannot be seen" in caplog.text


def test_a_forward_that_branches_on_training_is_not_rewritten(caplog):
    class ModeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x)) if self.training else F.relu6(self.fc(x))

    with caplog.at_level(logging.WARNING, logger="qrobust.quant.convert"):
        q = quantize(ModeNet(), "w4a4")
    assert "forward" not in vars(q)
    assert "train and eval mode" in caplog.text


def test_relu_ranges_are_said_and_calibration_sets_them(caplog):
    torch.manual_seed(0)
    net = FunctionalNet().eval()
    with caplog.at_level(logging.WARNING, logger="qrobust.quant.convert"):
        quantize(net, "w4a4")
    assert "clip at act_clip" in caplog.text and "calibrate=data" in caplog.text
    x = torch.rand(64, 1, 8, 8)
    peaks: dict[str, float] = {}
    probe = quantize(net, "w32a32")  # float weights and activations: measure each site's largest output
    for name, m in probe.named_modules():
        if isinstance(m, QuantAct):
            m.register_forward_hook(lambda _m, _i, out, name=name: peaks.__setitem__(name, float(out.detach().max())))
    probe.eval()(x)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qrobust.quant.convert"):
        q = quantize(net, "w4a4", calibrate=(x, torch.zeros(64, dtype=torch.long)))
    assert "clip at act_clip" not in caplog.text
    for name, m in q.named_modules():
        if isinstance(m, QuantAct):
            assert m.act_range() == (0.0, pytest.approx(peaks[name], rel=1e-5))
            assert q.qrobust_spec["overrides"][name]["act_clip"] == pytest.approx(peaks[name], rel=1e-5)
    ranges = {r["name"]: r["range"] for r in describe(q) if r["kind"] == "act"}
    assert ranges["act"][1] == pytest.approx(peaks["act"], rel=1e-5)
    assert "range" in format_description(describe(q)).splitlines()[0]
    # an act_clip the user set for a site wins over calibration
    q2 = quantize(net, QuantSpec.parse("w4a4", overrides={"act": {"act_clip": 2.0}}), calibrate=x)
    assert q2.act.act_range() == (0.0, 2.0)
    with pytest.raises(ConfigError, match="calibrate= holds no"):
        quantize(net, "w4a4", calibrate=torch.zeros(0, 1, 8, 8))


def test_weight_clip_override_clips_the_grid_round_trips_and_refuses_other_schemes(tmp_path):
    from qrobust import checkpoint
    from qrobust.quant.functional import symmetric_weight_quantize

    def skeleton() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    torch.manual_seed(0)
    net = skeleton()
    spec = QuantSpec(weight_bits=4, overrides={"0": {"weight_bits": 3, "weight_clip": 0.5}})
    assert QuantSpec.from_dict(spec.to_dict()) == spec and spec.weight_config("3")["clip"] == 1.0
    q = quantize(net, spec)
    w = net[0].weight.detach()
    got = q[0].quantized_weight().detach()
    assert torch.equal(got, symmetric_weight_quantize(w, 3, per_channel=True, clip=0.5))
    peak = w.abs().amax(dim=(1, 2, 3))
    assert torch.allclose(got.abs().amax(dim=(1, 2, 3)), 0.5 * peak)  # saturates at half of each channel's max
    assert got.unique().numel() > 2 and "weight_clip=0.5" in repr(q[0])
    assert torch.equal(q[3].quantized_weight(), symmetric_weight_quantize(net[3].weight, 4, per_channel=True))
    # the clip travels in the checkpoint's spec and comes back on load
    path = tmp_path / "c.safetensors"
    checkpoint.save(q, path)
    back = checkpoint.load(path, model=skeleton())
    x = torch.rand(2, 1, 8, 8)
    assert back[0].weight_quant.clip == 0.5 and torch.allclose(back(x), q.eval()(x))
    for bad, needle in (({"weight_bits": 3, "weight_clip": 1.5}, r"in \(0, 1\]"),
                        ({"weight_bits": 3, "weight_clip": 0.5, "weight_scheme": "lsq"}, "needs a 2–8-bit"),
                        ({"weight_bits": 1, "weight_clip": 0.5}, "needs a 2–8-bit")):
        with pytest.raises(ConfigError, match=needle):
            QuantSpec(weight_bits=4, overrides={"0": bad})
