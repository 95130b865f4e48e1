"""Lipschitz estimates: conv operator norms against exact SVD, per-layer rules, the network bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.analysis.allocation import local_gain
from qrobust.analysis.lipschitz import (
    conv_spectral_norm,
    downstream_lipschitz,
    format_lipschitz_table,
    infer_input_shape,
    lipschitz_table,
    matrix_spectral_norm,
    operator_norm,
)
from qrobust.errors import ConfigError
from qrobust.models import Normalize, build_model
from qrobust.quant import quantize


def _dense_norm(fn, shape) -> float:
    """Exact operator norm: the dense matrix of a linear map, built from its action on the identity basis."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        mat = fn(basis).reshape(n, -1)  # row i = A e_i, i.e. Aᵀ
    return float(torch.linalg.matrix_norm(mat, ord=2))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("extra", [{}, {"dilation": 2}, {"groups": 2}, {"padding_mode": "circular"}])
def test_conv_spectral_norm_matches_dense_svd(stride, padding, extra):
    if extra.get("padding_mode") == "circular" and padding == 0:
        pytest.skip("circular padding of width 0 is plain zero padding")
    torch.manual_seed(stride * 10 + padding)
    conv = nn.Conv2d(2, 4, 3, stride=stride, padding=padding, bias=True, **extra).double()
    shape = (2, 7, 7)
    exact = _dense_norm(lambda t: conv(t) - conv.bias.view(1, -1, 1, 1), shape)
    est = conv_spectral_norm(conv, shape, iters=2000, tol=1e-12)
    assert est <= exact * (1 + 1e-9)  # power iteration approaches σ_max from below
    assert est == pytest.approx(exact, rel=1e-4)
    # and it is not the norm of the reshaped 4×(c_in·k·k) weight matrix
    assert abs(matrix_spectral_norm(conv.weight) - exact) > 1e-3


def test_conv_norm_uses_the_quantized_weight():
    torch.manual_seed(0)
    q = quantize(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)), "w2a32")[0]
    w = q.quantized_weight().detach()
    exact = _dense_norm(lambda t: F.conv2d(t.float(), w, None, 1, 1).double(), (1, 5, 5))
    assert conv_spectral_norm(q, (1, 5, 5), iters=500, tol=1e-10) == pytest.approx(exact, rel=1e-3)
    assert matrix_spectral_norm(q.weight) != pytest.approx(matrix_spectral_norm(w), rel=1e-3)


def test_matrix_norm_and_operator_norm_of_pooling():
    w = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    assert matrix_spectral_norm(w) == pytest.approx(float(torch.linalg.svdvals(w.reshape(5, -1))[0]), rel=1e-6)
    assert operator_norm(nn.AvgPool2d(2), (1, 4, 4), iters=100) == pytest.approx(0.5, rel=1e-5)
    assert operator_norm(nn.AdaptiveAvgPool2d(1), (3, 4, 4), iters=100) == pytest.approx(0.25, rel=1e-5)
    with pytest.raises(ConfigError):
        conv_spectral_norm(nn.Linear(2, 2), (1, 2, 2))


def test_table_rows_for_each_layer_kind():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -3.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    model = nn.Sequential(Normalize([0.5], [0.25, 0.5, 0.4]), nn.Conv2d(3, 3, 3, padding=1), bn, nn.ReLU6(),
                          nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1), nn.Flatten(), nn.Linear(3, 2))
    rows = lipschitz_table(model, (3, 6, 6), iters=300)
    by = {r["name"]: r for r in rows}
    assert by["0"]["lipschitz"] == pytest.approx(4.0)  # 1 / min std
    assert by["2"]["lipschitz"] == pytest.approx(3.0 / math.sqrt(1.0 + bn.eps), rel=1e-6)  # max |γ|/σ
    assert by["3"]["lipschitz"] == 1.0 and by["3"]["kind"] == "act"
    assert by["4"]["lipschitz"] == 1.0  # non-overlapping max pool
    assert by["5"]["lipschitz"] == pytest.approx(3.0)  # 3×3 windows at stride 1: each input in ≤ 9 windows
    assert by["7"]["lipschitz"] == pytest.approx(matrix_spectral_norm(model[7].weight), rel=1e-9)
    assert by["1"]["input_shape"] == [3, 6, 6] and by["7"]["input_shape"] == [3]
    net = rows[-1]
    assert net["kind"] == "network" and not net["residual"]
    per = [r["lipschitz"] for r in rows[:-1]]
    assert net["lipschitz"] == pytest.approx(math.prod(per)) and net["product"] == pytest.approx(math.prod(per))
    text = format_lipschitz_table(rows)
    assert "bound (feed-forward chain)" in text and "BatchNorm2d" in text


class _Block(nn.Module):
    """x ↦ main(x) + shortcut(x) with known constants (2 and 3): the residual bound is 2 + 3."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(2, 2, bias=False)
        self.shortcut = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.main.weight.copy_(2 * torch.eye(2))
            self.shortcut.weight.copy_(3 * torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


def test_residual_blocks_add_their_paths():
    model = nn.Sequential(nn.Flatten(), _Block(), nn.ReLU(), _Block())
    rows = lipschitz_table(model, (2, 1, 1))
    assert rows[-1]["lipschitz"] == pytest.approx(25.0)  # (2 + 3)²
    assert rows[-1]["product"] == pytest.approx(36.0)  # the plain product is not the bound here
    assert rows[-1]["residual"]


def test_downstream_bound_follows_the_path_a_layer_is_on():
    model = nn.Sequential(nn.Flatten(), _Block(), nn.ReLU(), _Block())
    tails = downstream_lipschitz(model, (2, 1, 1))
    # a layer in the first block passes only the rest of its own path (nothing), then the second block (2 + 3);
    # the plain product of every later row would be 3·2·3 = 18 for 1.main
    assert tails == pytest.approx({"1.main": 5.0, "1.shortcut": 5.0, "3.main": 1.0, "3.shortcut": 1.0})
    chain = build_model("digits_cnn", in_channels=1, input_size=8).eval()
    rows = lipschitz_table(chain)
    body = [r for r in rows if r["kind"] != "network"]
    for name, t in downstream_lipschitz(chain, rows=rows).items():  # a feed-forward chain: the product after it
        i = [r["name"] for r in body].index(name)
        assert t == pytest.approx(math.prod(r["lipschitz"] for r in body[i + 1:]))


def test_local_gain_is_exact_for_a_linear_tail_and_never_above_the_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).eval()
    x = torch.randn(5, 4)
    assert local_gain(model, model[0], x, iters=50) == pytest.approx(matrix_spectral_norm(model[1].weight), rel=1e-4)
    net = build_model("resnet8", num_classes=3, in_channels=1, input_size=8).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.2, 2.0)
            m.weight.data.uniform_(-2, 2)
    tails = downstream_lipschitz(net, iters=100)
    xs = torch.rand(4, 1, 8, 8)
    gains = {n: local_gain(net, m, xs, iters=20) for n, m in net.named_modules() if n in tails}
    assert set(gains) == set(tails) and all(0 < gains[n] <= tails[n] * 1.001 for n in tails), (gains, tails)


@pytest.mark.parametrize("name,kw", [("resnet8", {}), ("resnet8", {"shortcut": "B"}), ("wrn-10-1", {})])
def test_network_bound_exceeds_local_gradient_norms(name, kw):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, in_channels=1, input_size=8, **kw).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.2, 2.0)
            m.weight.data.uniform_(-2, 2)
    bound = lipschitz_table(model, iters=100)[-1]["lipschitz"]
    x = torch.rand(8, 1, 8, 8, requires_grad=True)
    v = torch.randn(8, 3)
    v = v / v.norm(dim=1, keepdim=True)
    (g,) = torch.autograd.grad((model(x) * v).sum(), x)
    assert float(g.flatten(1).norm(dim=1).max()) <= bound


def test_infer_input_shape_and_quantized_table():
    model = build_model("digits_cnn", in_channels=1, input_size=8)
    assert infer_input_shape(model) == (1, 8, 8)
    q = quantize(model, "w2a2")
    rows = lipschitz_table(q)
    conv1 = next(r for r in rows if r["name"] == "conv1")
    assert conv1["type"] == "QuantConv2d" and conv1["latent_matrix_norm"] == pytest.approx(
        matrix_spectral_norm(model.conv1.weight), rel=1e-6)
    assert [r["name"] for r in rows if r["kind"] == "act"] == ["act1", "act2", "act3"]
    with pytest.raises(ConfigError, match="input_shape"):
        lipschitz_table(nn.Sequential(nn.Linear(2, 2)))
