"""Model registry and architectures: shapes, parameter counts, activation sites, Normalize, rebuilds."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qrobust.errors import ConfigError, InputError
from qrobust.models import (
    Normalize,
    activation_modules,
    available_models,
    build_from_arch,
    build_model,
    count_parameters,
    first_and_last_layers,
    weight_layers,
)

# (name, in_channels, input_size) combinations that must all work. The big models are also run at 8×8
# (global average pooling makes any size work) to keep the tests fast.
SHAPE_CASES = [
    ("small_cnn", 1, 28),
    ("small_cnn", 3, 32),
    ("small_cnn", 1, 8),
    ("digits_cnn", 1, 8),
    ("digits_cnn", 3, 28),
    ("resnet20", 1, 28),
    ("resnet20", 3, 32),
    ("resnet20", 1, 8),
    ("resnet56", 3, 32),
    ("preact_resnet18", 3, 32),
    ("preact_resnet18", 1, 8),
    ("wrn-16-4", 3, 32),
    ("wrn-10-2", 1, 28),
    ("vgg16", 3, 32),
    ("vgg16", 1, 32),
]
# One cheap configuration per architecture, for the tests that run every activation site.
SITE_CASES = [
    ("small_cnn", 1, 28),
    ("digits_cnn", 1, 8),
    ("resnet20", 3, 8),
    ("resnet56", 1, 8),
    ("preact_resnet18", 3, 8),
    ("wrn-16-4", 3, 8),
    ("wrn-10-2", 1, 8),
    ("vgg16", 3, 32),
]
ACT_SITES = {
    "small_cnn": 3,  # conv1, conv2, fc1
    "digits_cnn": 3,
    "resnet20": 1 + 2 * 9,  # stem + (inner + post-add) per block
    "resnet56": 1 + 2 * 27,
    "preact_resnet18": 2 * 8 + 1,  # two pre-activations per block + the final one
    "wrn-16-4": 2 * 6 + 1,
    "wrn-10-2": 2 * 3 + 1,
    "vgg16": 13,
}


def _build(name: str, c: int, s: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=c, input_size=s, **kw)


def test_available_models_lists_the_documented_names():
    names = available_models()
    for n in ["small_cnn", "digits_cnn", "resnet20", "resnet56", "preact_resnet18", "wrn-D-K", "vgg16"]:
        assert n in names


@pytest.mark.parametrize("name,c,s", SHAPE_CASES)
def test_output_shape_and_input_gradient(name, c, s):
    model = _build(name, c, s, num_classes=7)
    x = torch.rand(2, c, s, s, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name,kw,expected,published",
    [
        ("resnet20", {}, 269_722, 0.27e6),  # He et al. 2016, Table 6
        ("resnet56", {}, 853_018, 0.85e6),
        ("resnet20", {"shortcut": "B"}, 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64), 0.27e6),
        ("wrn-16-4", {}, 2_748_890, 2.75e6),  # Zagoruyko & Komodakis 2016, Table 1
        ("wrn-28-10", {}, 36_479_194, 36.5e6),
        ("preact_resnet18", {}, 11_172_170, 11.17e6),
        ("vgg16", {}, 14_724_042, 14.72e6),
    ],
)
def test_parameter_counts_match_published(name, kw, expected, published):
    model = build_model(name, **kw)  # construction only: no forward pass
    n = count_parameters(model)
    assert n == expected
    assert abs(n - published) / published < 0.02


def _count_activation_calls(model: nn.Module, x: torch.Tensor) -> Counter:
    calls: Counter = Counter()
    hook = lambda mod, _i, _o: calls.update([id(mod)])  # noqa: E731
    handles = [m.register_forward_hook(hook) for _, m in activation_modules(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("name,c,s", SITE_CASES)
def test_every_activation_is_its_own_module_called_once(name, c, s, activation, monkeypatch):
    model = _build(name, c, s, activation=activation)
    acts = activation_modules(model)
    mods = [m for _, m in acts]
    assert len(mods) == ACT_SITES[name]
    assert len({id(m) for m in mods}) == len(mods)  # no instance registered twice
    want = nn.ReLU6 if activation == "relu6" else nn.ReLU
    assert all(type(m) is want and not m.inplace for m in mods)

    # Count every functional activation call: each must come from one of the modules (no bare F.relu).
    functional = Counter()
    depth = [0]

    def counting(key, fn):
        def wrapper(*a, **k):
            if depth[0] == 0:  # count outermost calls only (F.relu itself calls torch.relu)
                functional[key] += 1
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1

        return wrapper

    for mod, attr in [(F, "relu"), (F, "relu6"), (F, "hardtanh"), (torch, "relu"), (torch.Tensor, "relu")]:
        monkeypatch.setattr(mod, attr, counting(attr, getattr(mod, attr)))
    calls = _count_activation_calls(model, torch.rand(2, c, s, s))
    assert set(calls) == {id(m) for m in mods}
    assert all(v == 1 for v in calls.values())  # one call per instance per forward
    assert sum(functional.values()) == len(mods)


def test_relu6_really_clips_at_six():
    torch.manual_seed(0)
    relu = build_model("small_cnn", in_channels=1, input_size=28, std=0.02)  # large pre-activations
    relu6 = build_model("small_cnn", in_channels=1, input_size=28, std=0.02, activation="relu6")
    relu6.load_state_dict(relu.state_dict())
    x = torch.rand(4, 1, 28, 28)
    outs = []
    relu6.act1.register_forward_hook(lambda _m, i, o: outs.append((i[0].max().item(), o.max().item())))
    with torch.no_grad():
        y6, y = relu6(x), relu(x)
    pre_max, post_max = outs[0]
    assert pre_max > 6.0 and post_max == pytest.approx(6.0)
    assert not torch.allclose(y6, y)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("small_cnn", {"in_channels": 1, "input_size": 28, "dropout": 0.25, "activation": "relu6"}),
        ("digits_cnn", {"in_channels": 1, "input_size": 8, "num_classes": 4}),
        ("resnet20", {"shortcut": "B", "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}),
        ("resnet56", {"in_channels": 1, "input_size": 28, "mean": 0.1307, "std": 0.3081}),
        ("preact_resnet18", {"num_classes": 100, "input_size": 8}),
        ("wrn-10-3", {"dropout": 0.3}),
        ("vgg16", {"activation": "relu6"}),
    ],
)
def test_qrobust_arch_round_trips(name, kw):
    torch.manual_seed(0)
    model = build_model(name, **kw)
    arch = json.loads(json.dumps(model.qrobust_arch))  # JSON-serialisable, as a checkpoint stores it
    assert arch == model.qrobust_arch
    assert arch["name"] == name
    c = arch["kwargs"]["in_channels"]
    assert len(arch["kwargs"]["mean"]) == len(arch["kwargs"]["std"]) == c
    for twin in (
        build_model(arch["name"], **arch["kwargs"]),
        build_model(**arch),
        build_from_arch(arch),
    ):
        assert twin.qrobust_arch == arch
        sd, sd2 = model.state_dict(), twin.state_dict()
        assert list(sd) == list(sd2)
        assert all(sd[k].shape == sd2[k].shape for k in sd)
        assert torch.equal(sd["normalize.mean"], sd2["normalize.mean"])
        assert torch.equal(sd["normalize.std"], sd2["normalize.std"])
        assert [type(m) for m in model.modules()] == [type(m) for m in twin.modules()]
    twin.load_state_dict(sd, strict=True)
    s = arch["kwargs"]["input_size"]
    x = torch.rand(2, c, s, s)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), twin.eval()(x))


def test_default_mean_std_is_half_and_names_are_canonical():
    m = build_model("WRN-016-2 ")
    assert m.qrobust_arch["name"] == "wrn-16-2"
    assert m.qrobust_arch["kwargs"]["mean"] == [0.5, 0.5, 0.5]
    assert m.qrobust_arch["kwargs"]["std"] == [0.5, 0.5, 0.5]
    assert torch.equal(m.normalize.mean.flatten(), torch.full((3,), 0.5))


@pytest.mark.parametrize(
    "name,c,s", [("small_cnn", 1, 28), ("resnet20", 3, 32), ("wrn-10-1", 3, 32), ("vgg16", 3, 32)]
)
def test_normalize_is_first_and_applied(name, c, s):
    mean, std = [0.2, 0.4, 0.6][:c], [0.3, 0.1, 0.25][:c]
    model = _build(name, c, s, mean=mean, std=std).eval()
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize" and isinstance(first, Normalize)
    assert model.state_dict()["normalize.mean"].shape == (1, c, 1, 1)

    order = []
    for n, m in model.named_modules():
        if n and not list(m.children()):
            m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n))
    x = torch.rand(3, c, s, s)
    with torch.no_grad():
        y = model(x)
    assert order[0] == "normalize"

    model.normalize = nn.Identity()  # the rest of the network, fed by hand-normalized input
    m_t = torch.tensor(mean).view(1, c, 1, 1)
    s_t = torch.tensor(std).view(1, c, 1, 1)
    with torch.no_grad():
        y_rest = model((x - m_t) / s_t)
    torch.testing.assert_close(y, y_rest, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    c=st.integers(1, 4),
    mean=st.floats(-2, 2, allow_nan=False),
    std=st.floats(0.01, 5, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_normalize_inverts_exactly(c, mean, std, seed):
    means = [mean + 0.1 * i for i in range(c)]
    norm = Normalize(means, std, num_channels=c)
    x = torch.rand(2, c, 3, 3, generator=torch.Generator().manual_seed(seed))
    z = norm(x)
    torch.testing.assert_close(z * norm.std + norm.mean, x, rtol=1e-5, atol=1e-5)
    assert torch.allclose(z[:, -1], (x[:, -1] - means[-1]) / std, atol=1e-5)


def test_normalize_rejects_bad_settings_and_inputs():
    with pytest.raises(ConfigError, match="std"):
        Normalize([0.5], [0.0])
    with pytest.raises(ConfigError, match="3 input channels"):
        Normalize([0.1, 0.2], [1.0, 1.0], num_channels=3)
    norm = Normalize([0.5] * 3, [0.5] * 3)
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        norm(torch.rand(3, 8, 8))
    with pytest.raises(InputError):
        norm(torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: build_model("resnet2O"), r"did you mean .*'resnet20'.*available models"),
        (lambda: build_model("alexnet"), r"available models: \[.*'vgg16'"),
        (lambda: build_model(None), "must be a string"),
        (lambda: build_model("resnet18"), "preact_resnet18"),
        (lambda: build_model("wrn-D-K"), "e.g. 'wrn-28-10'"),
        (lambda: build_model("resnet21"), "6n\\+2"),
        (lambda: build_model("wrn-27-10"), "6n\\+4"),
        (lambda: build_model("wrn-28-0"), "width"),
        (lambda: build_model("resnet20", activation="gelu"), r"\['relu', 'relu6'\]"),
        (lambda: build_model("vgg16", input_size=28), "at least 32×32"),
        (lambda: build_model("small_cnn", input_size=2), "at least 4×4"),
        (lambda: build_model("resnet20", dropout=0.1), r"unknown option.*'shortcut'"),
        (lambda: build_model("resnet20", shortcut="C"), r"\['A', 'B'\]"),
        (lambda: build_model("wrn-16-4", dropout=1.5), r"\[0, 1\)"),
        (lambda: build_model("resnet20", num_classes=0), "num_classes"),
        (lambda: build_model("resnet20", in_channels=2.5), "in_channels"),
        (lambda: build_model("resnet20", in_channels=1, mean=[0.1, 0.2, 0.3]), "1 input channels"),
        (lambda: build_from_arch({"kwargs": {}}), "architecture record"),
    ],
)
def test_bad_configurations_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize(
    "name,c,s,expected",
    [
        ("small_cnn", 1, 28, ("conv1", "fc2")),
        ("digits_cnn", 1, 8, ("conv1", "fc2")),
        ("resnet20", 3, 32, ("conv1", "fc")),
        ("preact_resnet18", 3, 8, ("conv1", "fc")),
        ("wrn-10-1", 3, 32, ("conv1", "fc")),
        ("vgg16", 3, 32, ("features.conv1_1", "fc")),
    ],
)
def test_first_and_last_layers_and_module_order_is_forward_order(name, c, s, expected):
    model = _build(name, c, s, shortcut="B") if name == "resnet20" else _build(name, c, s)
    x = torch.rand(2, c, s, s)
    assert first_and_last_layers(model) == expected
    assert first_and_last_layers(model, example_input=x) == expected
    assert model.training  # the forward pass used for ordering restores the mode

    called = []
    layers = weight_layers(model)
    for n, m in layers:
        m.register_forward_pre_hook(lambda _m, _a, n=n: called.append(n))
    model(x)
    assert called == [n for n, _ in layers]  # module order is forward order for every conv/linear


def test_first_and_last_layers_on_foreign_and_wrapped_models():
    class Backwards(nn.Module):  # registers its head before its body
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    model = Backwards()
    assert first_and_last_layers(model) == ("head", "head")
    assert first_and_last_layers(model, example_input=torch.rand(1, 1, 5, 5)) == ("body", "head")

    class QuantLinear(nn.Module):  # a wrapper holding a float layer, as a quantizer might
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

    wrapped = nn.Sequential(nn.Conv2d(1, 1, 1), QuantLinear())
    assert first_and_last_layers(wrapped) == ("0", "1")

    with pytest.raises(ConfigError, match="no linear layer"):
        first_and_last_layers(nn.Sequential(nn.Conv2d(1, 1, 1)))


@pytest.mark.parametrize("name,c,s", [("resnet20", 3, 32), ("small_cnn", 1, 28), ("wrn-10-2", 3, 32)])
def test_channels_last_gives_the_same_output(name, c, s):
    model = _build(name, c, s).eval()
    x = torch.rand(2, c, s, s)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 9), (5, 2, 2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_max_pool_matches_nn_max_pool_values_gradients_and_second_order(shape, channels_last):
    """qrobust's 2×2 max pool: the outputs of nn.MaxPool2d without a gradient (its fast path) and with one, the
    gradient routed to the same element of every window — ties included, which quantized activations make
    common (values on 5 levels here; torch.maximum would split them) — and the same second-order terms
    (layer-wise allocation differentiates gradients)."""
    from qrobust.models.layers import MaxPool2d

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(0, 5, shape, generator=g).double() / 4  # many ties in each window
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g, dtype=torch.double)
    u = torch.randn(shape, generator=g, dtype=torch.double)
    outs = []
    for pool in (nn.MaxPool2d(2), MaxPool2d(2)):
        xi, vi = x.clone().requires_grad_(), v.clone().requires_grad_()
        y = pool(xi)
        (gx,) = torch.autograd.grad((y * vi).sum(), xi, create_graph=True)
        (gv,) = torch.autograd.grad((gx * u).sum(), vi)
        outs.append((y.detach(), gx.detach(), gv))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert (outs[0][1] != 0).sum() == v.numel()  # one element per window gets the gradient
    with torch.no_grad():
        assert torch.equal(MaxPool2d(2)(x), nn.MaxPool2d(2)(x))
    assert torch.equal(MaxPool2d(2)(x), nn.MaxPool2d(2)(x))  # no input gradient wanted: the fast path too


def test_fast_max_pool_falls_back_for_other_settings_and_exports_as_max_pool():
    from qrobust.models.layers import MaxPool2d

    x = torch.rand(2, 3, 9, 9)
    for kw in ({"kernel_size": 3}, {"kernel_size": 2, "stride": 1}, {"kernel_size": 2, "ceil_mode": True},
               {"kernel_size": 2, "padding": 1}):
        assert not MaxPool2d(**kw)._fast()
        assert torch.equal(MaxPool2d(**kw)(x), nn.MaxPool2d(**kw)(x))
    assert MaxPool2d(2)._fast() and MaxPool2d(2, 2)._fast() and MaxPool2d((2, 2))._fast()
    assert torch.equal(MaxPool2d(2)(x[0]), nn.MaxPool2d(2)(x[0]))  # 3-D input: nn's own path
    assert isinstance(build_model("small_cnn", in_channels=1, input_size=28).pool1, MaxPool2d)
