"""Quantizers, straight-through gradients and QuantSpec: exact levels, agreement with torch's fake_quantize,
gradients against their definitions, ConfigError on bad settings."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant import (
    GRADIENT_MODES,
    BinaryWeightQuantizer,
    ClipActQuantizer,
    DoReFaWeightQuantizer,
    LSQWeightQuantizer,
    PACTActQuantizer,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    SignActQuantizer,
    UniformWeightQuantizer,
    fake_quant_q,
    gradient_mode,
    make_act_quantizer,
    make_weight_quantizer,
    round_ste,
    sign_ste,
)
from qrobust.quant import functional as QF

BITS = list(range(1, 9))
MULTI_BITS = list(range(2, 9))


def f32(value: float) -> float:
    """``value`` rounded to float32, as the quantizers and fake_quantize store scales."""
    return float(torch.tensor(value, dtype=torch.float32))


def dense(lo: float, hi: float, n: int = 20001) -> torch.Tensor:
    return torch.linspace(lo, hi, n)


# ---------------------------------------------------------------------------------------------------------
# exact levels and counts
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_clip_act_levels_are_exactly_k_alpha_over_2b_minus_1(bits):
    alpha = 6.0
    n = 2**bits - 1
    q = ClipActQuantizer(bits, alpha=alpha)(dense(-2.0, 8.0))
    levels = torch.unique(q)
    assert levels.numel() == 2**bits  # not 2^b - 1, not 2^b + 1
    s = f32(alpha / n)
    assert torch.equal(levels, torch.arange(n + 1, dtype=torch.float32) * s)
    assert levels[0].item() == 0.0
    assert levels[1].item() == pytest.approx(alpha / (2**bits - 1), rel=1e-6)  # step α/(2^b−1), not α/2^b
    assert levels[-1].item() == pytest.approx(alpha, rel=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_clip_act_thresholds_sit_at_half_steps(bits):
    alpha = 0.25 * (2**bits - 1)  # step exactly 0.25, so half steps are exact ties
    s = 0.25
    q = ClipActQuantizer(bits, alpha=alpha)
    below, above = s / 2 * (1 - 1e-4), s / 2 * (1 + 1e-4)
    assert q(torch.tensor([below, above])).tolist() == [0.0, s]
    assert q(torch.tensor([s * 0.5])).item() == 0.0  # exact tie rounds half to even → 0
    if bits > 1:
        assert q(torch.tensor([s * 1.5])).item() == 2 * s  # tie → 2
    assert q(torch.tensor([1e6, -1e6, alpha])).tolist() == [alpha, 0.0, alpha]


def test_one_bit_clip_activation_is_a_step_to_alpha():
    q = ClipActQuantizer(1, alpha=2.0)
    out = q(torch.tensor([-1.0, 0.0, 0.99, 1.0, 1.01, 5.0]))
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0, 2.0, 2.0]  # α/2 is a tie → 0


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_symmetric_uniform_weight_levels(bits):
    qmax = 2 ** (bits - 1) - 1
    w = dense(-1.0, 1.0)
    q = UniformWeightQuantizer(bits)(w)
    levels = torch.unique(q)
    assert levels.numel() == 2**bits - 1
    s = f32(1.0 / qmax)
    assert torch.equal(levels, torch.arange(-qmax, qmax + 1, dtype=torch.float32) * s)
    assert torch.equal(levels, -levels.flip(0))  # symmetric, zero included


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_per_channel_uniform_levels_per_row(bits):
    qmax = 2 ** (bits - 1) - 1
    w = torch.stack([dense(-1.0, 1.0, 4001), dense(-0.1, 0.1, 4001) ** 3])
    q = UniformWeightQuantizer(bits, per_channel=True)(w)
    for row_w, row_q in zip(w, q):
        levels = torch.unique(row_q)
        assert levels.numel() == 2**bits - 1
        s = row_w.abs().max() / qmax
        assert torch.equal(row_q, torch.round(row_w * s.reciprocal()) * s)


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_dorefa_levels(bits):
    n = 2**bits - 1
    q = DoReFaWeightQuantizer(bits)(dense(-3.0, 3.0))
    levels = torch.unique(q)
    assert levels.numel() == 2**bits
    assert torch.equal(levels, torch.arange(n + 1, dtype=torch.float32) * (2.0 / n) - 1.0)
    assert levels.min().item() == -1.0 and levels.max().item() == 1.0
    assert 0.0 not in levels.tolist()


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_lsq_levels(bits):
    step = 0.125
    q = QF.lsq_quantize(dense(-100.0, 100.0), torch.tensor(step), bits=bits)
    levels = torch.unique(q)
    assert levels.numel() == 2**bits
    k = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float32)
    assert torch.equal(levels, k * step)


def test_binary_weight_levels_per_channel():
    w = torch.tensor([[0.5, -1.5, 1.0, 0.0], [0.1, 0.2, -0.3, -0.2]])
    q = BinaryWeightQuantizer()(w)
    alpha = w.abs().mean(dim=1, keepdim=True)
    assert torch.equal(q, alpha * torch.tensor([[1.0, -1, 1, 1], [1, 1, -1, -1]]))
    assert all(torch.unique(row).numel() == 2 for row in q)


@pytest.mark.parametrize("scheme", ["dorefa", "uniform", "uniform_per_channel", "lsq", "binary"])
def test_every_weight_scheme_is_binary_at_one_bit(scheme):
    q = make_weight_quantizer(scheme, 1, weight=torch.ones(2, 2))
    assert isinstance(q, BinaryWeightQuantizer) and q.bits == 1 and q.scheme == "binary"
    assert make_weight_quantizer(scheme, 32) is None


def test_pact_levels_follow_learned_alpha():
    alpha = torch.tensor(1.5)
    q = QF.pact_quantize(dense(-1.0, 3.0), alpha, 2)
    assert torch.unique(q).tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_sign_activation_levels():
    out = SignActQuantizer()(torch.tensor([-2.0, -1e-9, 0.0, 1e-9, 3.0]))
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------------
# agreement with torch.fake_quantize_* (same grid, same half-to-even rounding)
# ---------------------------------------------------------------------------------------------------------
def _with_ties(scale: float, kmin: int, kmax: int) -> torch.Tensor:
    """Random values plus values at, just below and just above every half step of the grid."""
    k = torch.arange(kmin - 1, kmax + 1, dtype=torch.float32) + 0.5
    t = k * scale
    return torch.cat(
        [
            torch.randn(2000, generator=torch.Generator().manual_seed(0)) * scale * (kmax - kmin),
            t,
            torch.nextafter(t, t + 1),
            torch.nextafter(t, t - 1),
        ]
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("alpha", [6.0, 1.0, 0.75, 2.3])
def test_clip_act_equals_fake_quantize_per_tensor(bits, alpha):
    n = 2**bits - 1
    x = _with_ties(alpha / n, 0, n)
    expected = torch.fake_quantize_per_tensor_affine(x, alpha / n, 0, 0, n)
    assert torch.equal(ClipActQuantizer(bits, alpha=alpha)(x), expected)
    assert torch.equal(fake_quant_q(x, alpha / n, 0, n), expected)


def test_half_to_even_on_exact_ties():
    # scale 0.25 is exact, so these are exact ties; both sides must round to even
    x = torch.tensor([0.125, 0.375, 0.625, -0.125, -0.375])
    expected = torch.tensor([0.0, 0.5, 0.5, -0.0, -0.5])
    ours = QF.uniform_quantize(x, 0.25, qmin=-3, qmax=3)
    theirs = torch.fake_quantize_per_tensor_affine(x, 0.25, 0, -3, 3)
    assert torch.equal(ours, expected) and torch.equal(theirs, expected)


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_symmetric_weight_equals_fake_quantize_per_tensor(bits):
    qmax = 2 ** (bits - 1) - 1
    w = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    scale = (w.abs().max() / qmax).item()
    w = torch.cat([w.flatten(), _with_ties(scale, -qmax, qmax)]).clamp(-w.abs().max(), w.abs().max())
    expected = torch.fake_quantize_per_tensor_affine(w, scale, 0, -qmax, qmax)
    assert torch.equal(UniformWeightQuantizer(bits)(w), expected)


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_per_channel_weight_equals_fake_quantize_per_channel(bits):
    qmax = 2 ** (bits - 1) - 1
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(10 + bits))
    w = w * torch.linspace(0.1, 3, 8).view(-1, 1, 1, 1)
    scale = w.abs().amax(dim=(1, 2, 3)) / qmax
    zero = torch.zeros(8, dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax, qmax)
    assert torch.equal(UniformWeightQuantizer(bits, per_channel=True)(w), expected)


@pytest.mark.parametrize("bits", MULTI_BITS)
def test_lsq_equals_fake_quantize_per_tensor(bits):
    w = torch.randn(500, generator=torch.Generator().manual_seed(bits))
    q = LSQWeightQuantizer(bits, weight=w)
    step = q.step.item()
    w = torch.cat([w, _with_ties(step, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)])
    expected = torch.fake_quantize_per_tensor_affine(w, step, 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(q(w), expected)


# ---------------------------------------------------------------------------------------------------------
# gradients vs their definitions
# ---------------------------------------------------------------------------------------------------------
def _grad(fn, x: torch.Tensor, upstream: torch.Tensor | None = None) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.backward(torch.ones_like(out) if upstream is None else upstream)
    return x.grad


def test_round_ste_and_sign_ste_are_straight_through_even_in_native_mode():
    x = torch.tensor([-1.7, -0.5, 0.2, 0.5, 2.5])
    with gradient_mode("native"):
        assert torch.equal(_grad(round_ste, x), torch.ones(5))
        assert torch.equal(_grad(sign_ste, x), torch.ones(5))
    assert torch.equal(round_ste(x), torch.round(x))
    assert sign_ste(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]


def test_sign_q_is_exactly_plus_minus_one_for_large_inputs():
    from qrobust.quant import sign_q

    x = torch.tensor([-3e9, -1e8, 1e8, 3e9])
    for mode in ("estimator", "native"):
        with gradient_mode(mode):
            assert sign_q(x).tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert _grad(sign_q, x).tolist() == [1.0] * 4


def test_clip_act_ste_gradient_is_relu6_gradient():
    x = torch.cat([dense(-2.0, 8.0, 1001), torch.tensor([0.0, 6.0])])
    g = torch.randn_like(x)
    ours = _grad(lambda t: QF.clip_act_quantize(t, 6.0, 4), x, g)
    assert torch.equal(ours, _grad(F.relu6, x, g))


def test_clip_act_ste_gradient_masks_outside_alpha():
    x = torch.tensor([-1.0, -0.01, 0.01, 1.0, 1.99, 2.01, 5.0])
    assert _grad(lambda t: QF.clip_act_quantize(t, 2.0, 3), x).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_uniform_quantize_identity_vs_clipped_ste():
    x = torch.tensor([-2.0, -0.74, -0.3, 0.0, 0.3, 0.74, 2.0])  # range is [-0.75, 0.75]
    clipped = _grad(lambda t: QF.uniform_quantize(t, 0.25, qmin=-3, qmax=3, ste="clipped"), x)
    identity = _grad(lambda t: QF.uniform_quantize(t, 0.25, qmin=-3, qmax=3, ste="identity"), x)
    assert clipped.tolist() == [0, 1, 1, 1, 1, 1, 0]
    assert identity.tolist() == [1, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("per_channel", [False, True])
def test_symmetric_weight_gradient_is_identity(per_channel):
    w = torch.randn(64, 10, generator=torch.Generator().manual_seed(3))
    grad = _grad(lambda t: UniformWeightQuantizer(4, per_channel=per_channel)(t), w)
    torch.testing.assert_close(grad, torch.ones_like(w), rtol=1e-6, atol=0)  # scale detached, nothing clipped


def test_binary_weight_gradient_identity_and_clipped():
    w = torch.tensor([[0.5, -1.5, 0.25, 2.0], [0.1, -0.2, 0.3, 0.4]])
    alpha = w.abs().mean(dim=1, keepdim=True).expand_as(w)
    assert torch.equal(_grad(lambda t: QF.binary_weight_quantize(t, sign_grad="identity"), w), alpha)
    mask = (w.abs() <= 1).float()
    assert torch.equal(_grad(lambda t: QF.binary_weight_quantize(t, sign_grad="clipped"), w), alpha * mask)


def test_sign_activation_gradient_identity_and_hardtanh():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    assert _grad(lambda t: QF.sign_activation(t, sign_grad="identity"), x).tolist() == [1] * 7
    assert _grad(lambda t: QF.sign_activation(t, sign_grad="clipped"), x).tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_dorefa_gradient_is_that_of_its_continuous_surrogate():
    w = torch.randn(6, 5)
    g = torch.randn(6, 5)
    ours = _grad(lambda t: QF.dorefa_weight_quantize(t, 3), w, g)
    surrogate = _grad(lambda t: torch.tanh(t) / torch.tanh(t).abs().max(), w, g)  # = 2·t_normalised − 1
    torch.testing.assert_close(ours, surrogate, rtol=1e-5, atol=1e-6)


def test_lsq_gradients_match_hand_computation():
    bits, qn, qp = 3, 4, 3
    w = torch.tensor([-2.0, -0.61, -0.2, 0.0, 0.33, 0.52, 0.95, 3.0])
    c = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.7, 1.1, 0.9, -0.4])  # upstream gradient
    step = torch.tensor(0.25, requires_grad=True)
    wv = w.clone().requires_grad_(True)
    (QF.lsq_quantize(wv, step, bits=bits) * c).sum().backward()

    v = w / 0.25
    g = 1.0 / math.sqrt(w.numel() * qp)
    inside = (v >= -qn) & (v <= qp)
    outside = torch.where(v < -qn, torch.tensor(-float(qn)), torch.tensor(float(qp)))
    ds = torch.where(inside, torch.round(v) - v, outside)
    assert step.grad.item() == pytest.approx(g * (c * ds).sum().item(), rel=1e-5)
    torch.testing.assert_close(wv.grad, c * inside.float(), rtol=1e-6, atol=0)


def test_lsq_step_initialisation_and_scale_factor():
    w = torch.randn(3, 4, 3, 3)
    q = LSQWeightQuantizer(4, weight=w)
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7), rel=1e-6)
    assert QF.lsq_grad_scale(w.numel(), 7) == pytest.approx(1 / math.sqrt(w.numel() * 7))


def test_pact_gradients_match_definition():
    x = torch.tensor([-1.0, 0.2, 0.9, 1.4, 1.5, 1.6, 4.0])
    c = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 0.25])
    q = PACTActQuantizer(3, alpha=1.5)
    xv = x.clone().requires_grad_(True)
    (q(xv) * c).sum().backward()
    assert q.alpha.grad.item() == pytest.approx((c * (x >= 1.5)).sum().item())  # ∂y/∂α = 1{x ≥ α}
    torch.testing.assert_close(xv.grad, c * ((x > 0) & (x < 1.5)).float(), rtol=1e-6, atol=0)


ALL_QUANTIZERS = {
    "dorefa": lambda: DoReFaWeightQuantizer(3),
    "uniform": lambda: UniformWeightQuantizer(3),
    "uniform_per_channel": lambda: UniformWeightQuantizer(3, per_channel=True),
    "lsq": lambda: LSQWeightQuantizer(3, weight=torch.ones(4, 5)),
    "binary": lambda: BinaryWeightQuantizer(),
    "binary_clipped": lambda: BinaryWeightQuantizer(sign_grad="clipped"),
    "clip": lambda: ClipActQuantizer(3, alpha=1.0),
    "pact": lambda: PACTActQuantizer(3, alpha=1.0),
    "sign": lambda: SignActQuantizer(),
}


@pytest.mark.parametrize("name", sorted(ALL_QUANTIZERS))
def test_native_mode_gives_zero_input_gradient_and_ste_does_not(name):
    q = ALL_QUANTIZERS[name]()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)) * 0.6
    with gradient_mode("native"):
        out_native = q(x)
        assert torch.equal(_grad(q, x), torch.zeros_like(x))
    assert torch.equal(out_native, q(x))  # the mode changes gradients only, never values
    assert _grad(q, x).abs().sum() > 0


@pytest.mark.parametrize("name", sorted(ALL_QUANTIZERS))
def test_disabled_quantizer_is_identity(name):
    q = ALL_QUANTIZERS[name]()
    x = torch.randn(4, 5)
    q.quant_enabled = False
    assert torch.equal(q(x), x)


def test_fake_quant_q_backward_modes():
    x = torch.tensor([-1.0, 0.0, 0.3, 1.0, 1.5, 2.0])
    assert _grad(lambda t: fake_quant_q(t, 0.5, 0, 3), x).tolist() == [0, 0, 1, 1, 0, 0]
    with gradient_mode("native"):
        assert _grad(lambda t: fake_quant_q(t, 0.5, 0, 3), x).tolist() == [0] * 6


# ---------------------------------------------------------------------------------------------------------
# properties (hypothesis): outputs on the grid, idempotence
# ---------------------------------------------------------------------------------------------------------
finite = st.floats(-20, 20, allow_nan=False, allow_infinity=False, width=32)
values = st.lists(finite, min_size=1, max_size=48).map(lambda v: torch.tensor(v, dtype=torch.float32))


@settings(max_examples=60, deadline=None)
@given(x=values, bits=st.integers(1, 8), alpha=st.floats(0.125, 10.0, width=32))
def test_property_clip_act_on_grid_and_idempotent(x, bits, alpha):
    n = 2**bits - 1
    q = ClipActQuantizer(bits, alpha=alpha)
    y = q(x)
    s = f32(alpha / n)
    k = torch.round(y * (1 / torch.tensor(s)))
    assert torch.equal(y, k * s) and k.min() >= 0 and k.max() <= n
    assert torch.equal(q(y), y)


@settings(max_examples=60, deadline=None)
@given(x=values, bits=st.integers(2, 8), step=st.floats(0.015625, 2.0, width=32))
def test_property_fixed_scale_uniform_and_lsq_idempotent(x, bits, step):
    qmax = 2 ** (bits - 1) - 1
    y = QF.uniform_quantize(x, step, qmin=-qmax, qmax=qmax)
    assert torch.equal(QF.uniform_quantize(y, step, qmin=-qmax, qmax=qmax), y)
    z = QF.lsq_quantize(x, torch.tensor(step), bits=bits)
    assert torch.equal(QF.lsq_quantize(z, torch.tensor(step), bits=bits), z)
    k = torch.round(z / step)
    assert k.min() >= -(2 ** (bits - 1)) and k.max() <= qmax


@settings(max_examples=60, deadline=None)
@given(x=values, bits=st.integers(2, 8), per_channel=st.booleans())
def test_property_symmetric_weight_codes_and_idempotence(x, bits, per_channel):
    qmax = 2 ** (bits - 1) - 1
    w = x.view(1, -1)
    q = UniformWeightQuantizer(bits, per_channel=per_channel)
    y = q(w)
    m = w.abs().max()
    if m / qmax >= torch.finfo(torch.float32).tiny:  # a subnormal reference step is itself inexact
        codes = y / (m / qmax)
        torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-4)
        assert codes.abs().max() <= qmax + 1e-4
    torch.testing.assert_close(q(y), y, rtol=1e-6, atol=0)


@settings(max_examples=60, deadline=None)
@given(x=values, bits=st.integers(2, 8))
def test_property_dorefa_on_grid(x, bits):
    n = 2**bits - 1
    y = DoReFaWeightQuantizer(bits)(x)
    grid = torch.arange(n + 1, dtype=torch.float32) * (2.0 / n) - 1.0
    assert torch.isin(y, grid).all()


@settings(max_examples=60, deadline=None)
@given(x=values)
def test_property_binary_and_sign(x):
    w = x.view(1, -1)
    y = BinaryWeightQuantizer()(w)
    alpha = w.abs().mean()
    assert torch.isin(y, torch.stack([alpha, -alpha])).all()
    torch.testing.assert_close(BinaryWeightQuantizer()(y), y, rtol=1e-6, atol=0)
    s = SignActQuantizer()(x)
    assert torch.isin(s, torch.tensor([-1.0, 1.0])).all() and torch.equal(SignActQuantizer()(s), s)


# ---------------------------------------------------------------------------------------------------------
# QuantSpec
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, wb, ab",
    [("w4a4", 4, 4), ("W1A1", 1, 1), ("w4a32", 4, 32), ("w2a2", 2, 2), ("w32a4", 32, 4), ("w8", 8, 32),
     ("a4", 32, 4), ("float", 32, 32)],
)  # fmt: skip
def test_spec_parse_bits(text, wb, ab):
    spec = QuantSpec.parse(text)
    assert (spec.weight_bits, spec.act_bits) == (wb, ab)


def test_spec_parse_settings_overrides_and_round_trips():
    text = "w4a4,weight_scheme=LSQ,act_scheme=pact,act_clip=2,first_layer_bits=8,layer3.0.conv1=w2"
    spec = QuantSpec.parse(text)
    assert spec.weight_scheme == "lsq" and spec.act_scheme == "pact" and spec.act_clip == 2.0
    assert spec.first_layer_bits == 8 and spec.last_layer_bits is None
    assert spec.overrides == {"layer3.0.conv1": {"weight_bits": 2}}
    assert QuantSpec.parse(str(spec)) == spec
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert QuantSpec.coerce(str(spec)) == spec and QuantSpec.coerce(spec.to_dict()) == spec
    assert QuantSpec.coerce(spec) is spec and QuantSpec.coerce(None) == QuantSpec()
    assert str(QuantSpec.parse("w4a4")) == "w4a4"
    assert hash(spec) == hash(QuantSpec.from_dict(spec.to_dict()))


def test_spec_dict_carries_a_display_name_and_with_options():
    spec = QuantSpec.parse("w4a4,weight_scheme=lsq")
    d = spec.to_dict()
    assert d["name"] == "w4a4,weight_scheme=lsq"
    assert QuantSpec.from_dict({"name": "w2a2"}) == QuantSpec.parse("w2a2")
    assert QuantSpec.from_dict({**d, "name": "ignored when fields are present"}) == spec
    assert spec.with_options(first_layer_bits=8) == QuantSpec.parse(
        "w4a4,weight_scheme=lsq,first_layer_bits=8"
    )
    with pytest.raises(ConfigError, match="first_layer_bits"):
        spec.with_options(first_layer_bits=3.5)


def test_spec_override_forms_are_equivalent():
    a = QuantSpec(weight_bits=4, act_bits=4, overrides={"layer3.0.conv1": {"weight_bits": 2, "act_bits": 4}})
    b = QuantSpec(weight_bits=4, act_bits=4, overrides={"layer3.0.conv1": "w2a4"})
    c = QuantSpec(weight_bits=4, act_bits=4, overrides=["layer3.0.conv1=w2a4"])
    assert a == b == c


def test_spec_resolution_order():
    text = "w4a4,first_layer_bits=8,last_layer_bits=32,layer1=w3a3,layer1.0.conv1=w2,layer1.0.relu=a1"
    spec = QuantSpec.parse(text, ste="clipped")
    assert spec.weight_config("conv1", first=True)["bits"] == 8
    assert spec.weight_config("fc", last=True)["bits"] == 32
    assert spec.weight_config("layer2.0.conv1")["bits"] == 4
    assert spec.weight_config("layer1.1.conv1")["bits"] == 3  # prefix override
    assert spec.weight_config("layer1.0.conv1")["bits"] == 2  # more specific override wins
    assert spec.weight_config("layer10.conv")["bits"] == 4  # "layer1" is not a prefix of "layer10"
    assert spec.act_config("layer1.0.relu") == {"bits": 1, "scheme": "clip", "clip": 6.0, "sign_grad": "clipped"}
    assert spec.act_config("layer1.1.relu")["bits"] == 3
    only = QuantSpec.parse("w4a4,first_layer_bits=8")
    assert only.weight_config("fc", first=False, last=True)["bits"] == 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"weight_bits": 9}, "9"),
        ({"weight_bits": 0}, "0"),
        ({"act_bits": 16}, "16"),
        ({"act_bits": -1}, "-1"),
        ({"weight_bits": 4.0}, "4.0"),
        ({"weight_bits": True}, "True"),
        ({"first_layer_bits": 12}, "12"),
        ({"weight_scheme": "ternary"}, "ternary"),
        ({"act_scheme": "relu"}, "relu"),
        ({"ste": "smooth"}, "smooth"),
        ({"act_clip": -1.0}, "-1.0"),
        ({"act_clip": float("inf")}, "inf"),
        ({"overrides": {"layer1": {"bits": 2}}}, "bits"),
        ({"overrides": {"layer1": "w9"}}, "9"),
        ({"overrides": {"layer1": 3}}, "3"),
    ],
)
def test_spec_config_errors_name_the_bad_value_and_the_valid_ones(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        QuantSpec(**kwargs)
    msg = str(e.value)
    assert needle in msg
    valid_hints = ("1–8 or 32", "dorefa", "clip,", "identity", "positive", "valid settings", "w2a4")
    assert any(word in msg for word in valid_hints)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_bits": 4, "weight_scheme": "binary"},
        {"weight_bits": 1, "weight_scheme": "binary", "first_layer_bits": 8},
        {"act_bits": 4, "act_scheme": "sign"},
        {"weight_bits": 1, "weight_scheme": "binary", "overrides": {"fc": "w4"}},
    ],
)
def test_spec_one_bit_only_schemes_reject_more_bits(kwargs):
    with pytest.raises(ConfigError, match="1-bit only"):
        QuantSpec(**kwargs)
    ok = QuantSpec(weight_bits=1, act_bits=1, weight_scheme="binary", act_scheme="sign", last_layer_bits=32)
    assert ok.weight_config("fc", last=True)["bits"] == 32


@pytest.mark.parametrize("text", ["", "x4a4", "w4a4b", "4a4", "w4a4,nonsense", "w4a4,ste=", "w4a4,fc=w2x"])
def test_spec_parse_errors(text):
    with pytest.raises(ConfigError):
        QuantSpec.parse(text)


def test_spec_from_dict_rejects_unknown_fields_and_coerce_rejects_other_types():
    with pytest.raises(ConfigError, match="weight_bitz"):
        QuantSpec.from_dict({"weight_bitz": 4})
    with pytest.raises(ConfigError):
        QuantSpec.coerce(4)


def test_factories_validate():
    with pytest.raises(ConfigError, match="ternary"):
        make_weight_quantizer("ternary", 4)
    with pytest.raises(ConfigError, match="9"):
        make_act_quantizer("clip", 9)
    with pytest.raises(ConfigError):
        DoReFaWeightQuantizer(1)
    assert make_act_quantizer("pact", 32) is None
    assert isinstance(make_act_quantizer("sign", 1), SignActQuantizer)


# ---------------------------------------------------------------------------------------------------------
# doctests: every quantizer class documents itself with a runnable example
# ---------------------------------------------------------------------------------------------------------
QUANT_MODULES = ["modes", "functional", "quantizers", "layers", "spec", "convert", "sites", "__init__"]


@pytest.mark.parametrize("module", QUANT_MODULES)
def test_doctests(module):
    import importlib

    name = "qrobust.quant" if module == "__init__" else f"qrobust.quant.{module}"
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_quantizer_class_has_a_doctest():
    import qrobust.quant.quantizers as qz

    classes = [qz.DoReFaWeightQuantizer, qz.UniformWeightQuantizer, qz.LSQWeightQuantizer]
    classes += [qz.BinaryWeightQuantizer, qz.ClipActQuantizer, qz.PACTActQuantizer, qz.SignActQuantizer]
    for cls in classes:
        assert ">>>" in (cls.__doc__ or ""), cls.__name__


def test_bpda_mode_backpropagates_like_the_float_activation():
    """BPDA: above the clip level α a ReLU-kind QuantAct passes gradient 1 (ReLU's), where the training
    estimator (an attack's "ste", with BPDA only for samples it leaves all zero) passes 0 and native autograd
    passes 0 everywhere."""
    from qrobust.quant import QuantAct, attack_mode, gradient_mode

    act = QuantAct(2, clip=1.0, kind="relu")
    x = torch.tensor([-0.5, 0.2, 0.6, 3.0], requires_grad=True)
    grads = {}
    for mode in ("estimator", "native", "bpda"):
        x.grad = None
        with gradient_mode(mode):
            out = act(x)
            out.sum().backward()
        grads[mode] = x.grad.tolist()
        assert torch.equal(out.detach(), act(x).detach())  # the forward value never changes with the mode
    assert grads["estimator"] == [0.0, 1.0, 1.0, 0.0]
    assert grads["native"] == [0.0, 0.0, 0.0, 0.0]
    assert grads["bpda"] == [0.0, 1.0, 1.0, 1.0]
    assert attack_mode("ste") == "attack" and attack_mode("bpda") == "bpda" and attack_mode("native") == "native"
    six = QuantAct(2, kind="relu6")
    x6 = torch.tensor([3.0, 7.0], requires_grad=True)
    with gradient_mode("bpda"):
        six(x6).sum().backward()
    assert x6.grad.tolist() == [1.0, 0.0]  # ReLU6's own saturation is part of the float model: kept


def test_sign_grad_reads_its_old_name_ste_wherever_a_spec_was_persisted():
    new = QuantSpec(weight_bits=1, act_bits=1, act_scheme="sign", sign_grad="clipped")
    assert QuantSpec.parse("w1a1,act_scheme=sign,ste=clipped") == new
    assert QuantSpec.parse("w1a1,act_scheme=sign", ste="clipped") == new
    assert QuantSpec(weight_bits=1, act_bits=1, act_scheme="sign", ste="clipped") == new
    old_dict = {k: v for k, v in new.to_dict().items() if k != "sign_grad"} | {"ste": "clipped"}
    assert QuantSpec.from_dict(old_dict) == new
    assert QuantSpec.parse("w1a1,fc=w1").replace(overrides={"fc": {"ste": "clipped"}}).overrides == {
        "fc": {"sign_grad": "clipped"}
    }
    assert str(new) == "w1a1,act_scheme=sign,sign_grad=clipped"
    with pytest.raises(ConfigError, match="old name"):
        QuantSpec(sign_grad="clipped", ste="identity")


def test_layers_check_their_settings_with_the_specs_own_checks():
    for make in (lambda **kw: QuantConv2d(1, 1, 1, **kw), lambda **kw: QuantLinear(2, 1, **kw)):
        with pytest.raises(ConfigError, match="weight_scheme must be one of"):
            make(weight_scheme="ternary")
        with pytest.raises(ConfigError, match="1-bit only"):
            make(weight_bits=4, weight_scheme="binary")
        with pytest.raises(ConfigError, match="sign_grad must be one of"):
            make(weight_bits=1, sign_grad="smooth")
        assert make(weight_scheme=" LSQ ").weight_scheme == "lsq"
    with pytest.raises(ConfigError, match="act_scheme must be one of"):
        QuantAct(4, scheme="relu")
    with pytest.raises(ConfigError, match="1-bit only"):
        QuantAct(4, scheme="sign")
    with pytest.raises(ConfigError, match="act_bits must be one of"):
        QuantAct(9)


def test_the_training_gradient_mode_is_called_estimator_not_ste():
    assert GRADIENT_MODES == ("estimator", "native", "bpda", "attack")
    with pytest.raises(ConfigError, match="attack_mode"):
        with gradient_mode("ste"):
            pass


def test_attack_mode_keeps_multibit_estimators_and_passes_sign_activations():
    """An attack's "ste" ("attack" mode): a 2-bit clip activation back-propagates its clip's derivative (as in
    training), a sign activation with the clipped training estimator passes the gradient everywhere."""
    from qrobust.quant import QuantAct, gradient_mode

    clip = QuantAct(2, clip=1.0, kind="relu")
    sign = QuantAct(1, scheme="sign", sign_grad="clipped")
    for act, expect_est, expect_att in ((clip, [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]),
                                        (sign, [0.0, 1.0, 0.0], [1.0, 1.0, 1.0])):
        grads = {}
        for mode in ("estimator", "attack"):
            x = torch.tensor([-3.0, 0.5, 3.0], requires_grad=True)
            with gradient_mode(mode):
                act(x).sum().backward()
            grads[mode] = x.grad.tolist()
        assert grads["estimator"] == expect_est and grads["attack"] == expect_att


def test_frozen_weights_are_quantized_once_and_refreshed_when_they_change():
    from qrobust.attacks import PGD
    from qrobust.quant import quantize as quantize_model

    torch.manual_seed(0)
    net = quantize_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)), "w4a4")
    conv = net[0]
    calls = {"n": 0}
    inner = conv.weight_quant.forward

    def counting(w):
        calls["n"] += 1
        return inner(w)

    conv.weight_quant.forward = counting
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    PGD(net, eps=0.1, steps=5)(x, y)  # the attack freezes the weights: one quantization for all its passes
    assert calls["n"] == 1
    fresh = inner(conv.weight).detach()
    assert torch.equal(conv.quantized_weight(), fresh)
    # a training step (grad enabled, weights requiring grad) quantizes on every forward, with the gradient
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    opt.step()  # the weight changed in place: the cache must not serve the old value
    with torch.no_grad():
        after = conv.quantized_weight()
    assert not torch.equal(after, fresh) and torch.equal(after, inner(conv.weight).detach())
    # load_state_dict writes in place too
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["0.weight"].mul_(-1)
    net.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(conv.quantized_weight(), inner(conv.weight).detach())
    # a value cached under inference_mode is not handed to autograd later
    with torch.inference_mode():
        net(x)
    for p in net.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    net(xg).sum().backward()
    assert xg.grad is not None
