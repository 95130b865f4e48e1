"""Defensive Quantization: the orthogonality penalty, its objective, and the study end to end (quick mode)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qrobust.defenses import OBJECTIVES, OrthogonalityPenalty, Sum, make_objective, orthogonality_error
from qrobust.defenses.orthogonality import _gram_residual_sq, penalized_layers
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.quant import quantize


def _orthonormal(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An m×n float64 matrix with orthonormal rows (m ≤ n) or orthonormal columns (m > n)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max(m, n), min(m, n), generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)  # max×min, orthonormal columns
    return q.T.contiguous() if m <= n else q


def _linear(w: torch.Tensor) -> nn.Sequential:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    return nn.Sequential(lin)


def _digits(act: str = "relu6") -> nn.Module:
    torch.manual_seed(0)
    return build_model("digits_cnn", in_channels=1, input_size=8, activation=act)


# ------------------------------------------------------------------------------------------ penalty value
@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5)])
def test_orthogonal_matrix_has_zero_penalty(shape):
    model = _linear(_orthonormal(*shape))
    assert OrthogonalityPenalty(1.0)(model).item() == pytest.approx(0.0, abs=1e-12)
    assert orthogonality_error(model)["total"] == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), c=st.floats(0.1, 3.0), beta=st.floats(1e-4, 10.0))
def test_scaled_orthogonal_penalty_is_exact(m, n, c, beta):
    # W = c·Q: the smaller Gram matrix is c²·I_k (k = min(m, n)), so the penalty is β/2 · k · (c² − 1)²
    model = _linear(c * _orthonormal(m, n, seed=m * 10 + n))
    k = min(m, n)
    expected = beta / 2 * k * (c * c - 1) ** 2
    assert OrthogonalityPenalty(beta)(model).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert orthogonality_error(model)["per_layer"]["0"] == pytest.approx(math.sqrt(k) * abs(c * c - 1), abs=1e-9)


def test_conv_weight_is_reshaped_to_cout_by_cin_k_k():
    conv = nn.Conv2d(2, 3, 2, bias=False).double()  # reshaped 3×8: wide, Gram 3×3
    w = 0.7 * _orthonormal(3, 8, seed=3)
    with torch.no_grad():
        conv.weight.copy_(w.reshape(3, 2, 2, 2))
    assert OrthogonalityPenalty(2.0)(nn.Sequential(conv)).item() == pytest.approx(3 * (0.49 - 1) ** 2)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_smaller_and_larger_gram_differ_by_n_minus_m(m, n, seed):
    # the documented identity ‖WᵀW − I_n‖² − ‖WWᵀ − I_m‖² = n − m holds for every W
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    big = (w.T @ w - torch.eye(n, dtype=torch.float64)).square().sum()
    small = (w @ w.T - torch.eye(m, dtype=torch.float64)).square().sum()
    assert float(big - small) == pytest.approx(n - m, abs=1e-8)
    assert float(_gram_residual_sq(w.unsqueeze(0))[0]) == pytest.approx(float(small if m <= n else big), rel=1e-12)


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("shape", [(3, 6), (6, 3), (4, 4), (1, 5)])
def test_penalty_gradient_gradcheck_and_closed_form(shape):
    beta = 0.3
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: 0.5 * beta * _gram_residual_sq(t.unsqueeze(0)).sum(), (w,))
    stacked = torch.stack([w0, 2 * w0]).requires_grad_(True)  # a batched group: per-matrix gradients
    assert torch.autograd.gradcheck(lambda t: _gram_residual_sq(t) @ torch.tensor([1.0, -0.5], dtype=t.dtype),
                                    (stacked,))
    model = _linear(w0)
    OrthogonalityPenalty(beta)(model).backward()
    n = shape[1]
    closed = 2 * beta * w0 @ (w0.T @ w0 - torch.eye(n, dtype=torch.float64))  # the WᵀW form, any shape
    torch.testing.assert_close(model[0].weight.grad, closed, rtol=1e-10, atol=1e-12)


def test_fused_penalty_gradcheck_over_mixed_layers():
    from qrobust.defenses.orthogonality import _PenaltySum

    g = torch.Generator().manual_seed(2)
    shapes = [(3, 2, 2, 2), (5, 4), (3, 8), (6, 3), (5, 4)]  # two layers share a shape: one batched group
    ws = tuple(torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes)
    assert torch.autograd.gradcheck(lambda *w: _PenaltySum.apply(0.7, *w), ws)


def test_batched_groups_match_per_layer_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(8, 4), nn.Conv2d(2, 4, 2), nn.Linear(4, 9)).double()
    pen = OrthogonalityPenalty(0.5)
    names, res = pen.residuals(model)
    assert names == ["0", "1", "2", "3"]
    for (_, m), r in zip(penalized_layers(model), res):
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        expected = float((g - torch.eye(g.shape[0], dtype=g.dtype)).square().sum())
        assert float(r.detach()) == pytest.approx(expected, rel=1e-12)
    assert pen(model).item() == pytest.approx(0.25 * float(res.detach().sum()), rel=1e-12)


def test_penalty_under_bf16_autocast_is_the_fp32_penalty():
    # regression: under autocast the Gram matmul ran in bf16 and the backward then mixed dtypes (a crash)
    torch.manual_seed(0)
    model = build_model("resnet20")
    pen = OrthogonalityPenalty(3e-2)
    ref = pen(model)
    ref.backward()
    g_ref = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = pen(model)
    val.backward()
    g = [p.grad for p in model.parameters() if p.grad is not None]
    assert val.dtype == torch.float32 and float(val.detach()) == float(ref.detach())
    assert len(g) == len(g_ref) and all(torch.equal(a, b) for a, b in zip(g, g_ref))


# ------------------------------------------------------------------------------------------ options
def test_hidden_layers_exclude_first_and_last():
    model = _digits()
    assert [n for n, _ in penalized_layers(model, "all")] == ["conv1", "conv2", "fc1", "fc2"]
    assert [n for n, _ in penalized_layers(model, "hidden")] == ["conv2", "fc1"]
    assert [n for n, _ in penalized_layers(model, ["fc1"])] == ["fc1"]
    OrthogonalityPenalty(1.0, layers="hidden")(model).backward()
    assert model.conv1.weight.grad is None and model.fc2.weight.grad is None
    assert model.conv2.weight.grad.abs().sum() > 0 and model.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="name no convolution"):
        penalized_layers(model, ["nope"])
    with pytest.raises(ConfigError):
        OrthogonalityPenalty(1.0, layers="first")
    with pytest.raises(ConfigError):
        OrthogonalityPenalty(-1.0)


def test_latent_and_quantized_weights_differ_on_quantized_model():
    q = quantize(_digits(), "w2a32")
    latent = OrthogonalityPenalty(1.0, weights="latent")(q)
    quant = OrthogonalityPenalty(1.0, weights="quantized")(q)
    assert abs(latent.item() - quant.item()) > 1e-3 * latent.item()
    w = q.fc1.quantized_weight().detach()
    g = w @ w.T
    expected = float((g - torch.eye(64)).square().sum())
    assert orthogonality_error(q, weights="quantized")["per_layer"]["fc1"] == pytest.approx(math.sqrt(expected),
                                                                                             rel=1e-5)
    quant.backward()  # straight-through: the quantized-weight penalty reaches the latent parameters
    assert q.fc1.weight.grad is not None and q.fc1.weight.grad.abs().sum() > 0
    # activation-only quantization computes with the latent weights: both choices coincide
    a = quantize(_digits(), "w32a4")
    assert OrthogonalityPenalty(1.0, weights="quantized")(a).item() == pytest.approx(
        OrthogonalityPenalty(1.0)(a).item(), rel=1e-6)


def test_layer_cache_follows_inplace_quantization():
    model = _digits()
    pen = OrthogonalityPenalty(1.0, weights="quantized")
    before = pen(model).item()
    quantize(model, "w2a32", inplace=True)  # swaps the layers under the cached penalty
    after = pen(model).item()
    assert after == pytest.approx(OrthogonalityPenalty(1.0, weights="quantized")(model).item(), rel=1e-6)
    assert after != pytest.approx(before, rel=1e-3)


# ------------------------------------------------------------------------------------------ objective
def test_dq_objective_is_registered_and_composes():
    assert "dq" in OBJECTIVES
    obj = make_objective("dq", beta=0.01, layers="hidden")
    assert isinstance(obj, Sum) and obj.name == "ce+dq"
    cfg = obj.config()
    assert cfg["regularizers"][0] == {"name": "dq", "beta": 0.01, "layers": "hidden", "weights": "latent",
                                      "bn": "ignore", "gram": "smaller"}
    model = _digits()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss, logits = obj(model, x, y)
    ce = nn.functional.cross_entropy(model(x), y)
    assert loss.item() == pytest.approx(ce.item() + OrthogonalityPenalty(0.01, layers="hidden")(model).item(),
                                        rel=1e-5)
    at = make_objective("dq", beta=0.01, base="pgd-at", eps=0.1, steps=1)
    assert at.config()["main"]["name"] == "pgd-at"
    with pytest.raises(ConfigError, match="base"):
        make_objective("dq", base="dq")


def test_dq_objective_lowers_orthogonality_error_in_training():
    from qrobust import fit
    from qrobust.data import load_dataset

    train = load_dataset("digits", "train")
    errors = {}
    for beta in (0.0, 0.2):
        model = _digits()
        fit(model, train, objective=make_objective("dq", beta=beta), epochs=1, batch_size=64, lr=0.05,
            max_batches=15, seed=0)
        errors[beta] = orthogonality_error(model)["total"]
    assert errors[0.2] < 0.75 * errors[0.0]


# ------------------------------------------------------------------------------------------ study
def test_verdict_and_mcnemar():
    from qrobust.studies.harness import paired_test, significant
    from qrobust.studies.harness import verdict as _verdict

    assert _verdict([(True, True), (True, False)]) == "reproduced"
    assert _verdict([(True, False), (True, False)]).startswith("partly")
    assert _verdict([(False, False), (True, True)]).startswith("partly reproduced (1/2")
    assert _verdict([(False, False)]) == "not reproduced"
    assert _verdict([]) == "not measured"
    a = torch.tensor([True] * 9 + [False])
    b = torch.tensor([False] * 9 + [True])
    t = paired_test(a, b)
    assert t["z"] == pytest.approx(8 / math.sqrt(10))
    assert (t["only_a"], t["only_b"]) == (9, 1)
    assert t["p"] == pytest.approx(2 * 11 / 2**10)  # exact two-sided binomial: 2·P(X ≤ 1), X ~ B(10, ½)
    assert significant(t) and not significant(paired_test(b, a))
    assert paired_test(a, a) == {"only_a": 0, "only_b": 0, "z": 0.0, "p": 1.0}


def test_quick_study_writes_report(tmp_path):
    from qrobust.studies.dq import run_dq_study

    res = run_dq_study(quick=True, bits=(2,), betas=(0.03,), float_epochs=1, epochs=1, n_eval=32, eps=(0.1,),
                       out=tmp_path)
    for name in ("report.md", "results.json", "robust_vs_bits.png", "clean_vs_bits.png", "amplification.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["bits"] == [2, 32]
    assert len(saved["models"]) == 4  # {w32a2, float} × {vanilla, dq}
    for r in saved["models"]:
        assert 0.0 <= r["robust_main"] <= r["pgd_main"] <= r["clean"] + 1e-9
        assert r["robust_main"] <= r["confirm"]["robust"] + 1e-9
        assert r["ortho"]["total"] > 0 and r["lipschitz"]["bound"] > 0
    assert saved["claims"]["4"]["verdict"] == "not measured"
    for k in ("1", "2", "3"):
        assert saved["claims"][k]["verdict"].split(" (")[0] in ("reproduced", "partly reproduced", "not reproduced")
    assert res["timing"]["ratio_of_medians"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "## Claims" in report and "Cost: a DQ epoch" in report
    from qrobust.studies.harness import render_results

    assert saved["format"] == "qrobust-dq-study/2" and render_results(tmp_path) == report
    c1 = saved["claims"]["1"]["comparisons"][0]
    assert 0 < c1["p"] <= 1 and c1["only_a"] >= 0 and f"p = {c1['p']:.2g}" in report


# ------------------------------------------------------------------------------------------ BatchNorm folding
def test_following_batchnorms_pairs_each_conv_with_its_bn():
    from qrobust.defenses.orthogonality import following_batchnorms

    model = build_model("resnet20")
    pairs = following_batchnorms(model)
    assert pairs["conv1"] is model.bn1 and pairs["layer2.1.conv2"] is model.layer2[1].bn2
    assert len(pairs) == 19 and "fc" not in pairs  # every conv, not the classifier
    q = quantize(build_model("resnet20"), "w4a4")  # quantized convs pair the same way
    assert set(following_batchnorms(q)) == set(pairs)


def test_folded_penalty_sees_the_bn_gain_and_ignores_rescaling_it_undoes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    bn = model[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, 1.5]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
    pen = OrthogonalityPenalty(0.5, bn="fold")
    w = model[0].weight.detach().reshape(3, -1) * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[:, None]
    g = w @ w.T
    w2 = model[4].weight.detach()
    g2 = w2 @ w2.T
    expected = 0.25 * float((g - torch.eye(3)).square().sum() + (g2 - torch.eye(4)).square().sum())
    value = pen(model)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0  # the gain is penalised too
    # scaling the conv by c and its BN statistics by c² changes nothing the network computes: the folded
    # penalty stays put, the paper's (bn="ignore") does not
    before = {k: float(OrthogonalityPenalty(0.5, bn=k)(model).detach()) for k in ("fold", "ignore")}
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        bn.running_var.mul_(9.0)
    after = {k: float(OrthogonalityPenalty(0.5, bn=k)(model).detach()) for k in ("fold", "ignore")}
    assert after["fold"] == pytest.approx(before["fold"], rel=1e-4) and after["ignore"] > 2 * before["ignore"]
    assert orthogonality_error(model, bn="fold")["sum_sq"] == pytest.approx(4 * expected, rel=1e-4)  # β/2 = 1/4
    with pytest.raises(ConfigError, match="bn must be one of"):
        OrthogonalityPenalty(0.5, bn="yes")
