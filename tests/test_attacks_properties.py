"""Hypothesis properties every attack must keep, whatever ε, budget, seed and input (tiny linear model)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from qrobust.attacks import (
    APGD,
    APGDT,
    BIM,
    CW,
    FGSM,
    MIFGSM,
    PGD,
    PGDL2,
    RFGSM,
    SPSA,
    CWLinf,
    Square,
    lp_norm,
    project,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        m[1].weight.mul_(8.0)  # steep enough that small ε flips some predictions
    return m.eval()


MODEL = _model()


def _inputs(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    u = torch.rand(n, 1, 4, 4, generator=g)
    x = torch.where(u < 0.15, torch.zeros_like(x), torch.where(u > 0.85, torch.ones_like(x), x))  # box edges
    return x, torch.randint(0, 4, (n,), generator=g)


def _linf(name: str, eps: float, steps: int, **kw) -> object:
    alpha = max(eps / 4, 1e-3)
    return {
        "fgsm": lambda: FGSM(MODEL, eps=eps, **kw),
        "rfgsm": lambda: RFGSM(MODEL, eps=max(eps, 2e-3), alpha=max(eps, 2e-3) / 2, **kw),
        "bim": lambda: BIM(MODEL, eps=eps, alpha=alpha, steps=steps, **kw),
        "pgd": lambda: PGD(MODEL, eps=eps, alpha=alpha, steps=steps, restarts=2, **kw),
        "mifgsm": lambda: MIFGSM(MODEL, eps=eps, alpha=alpha, steps=steps, **kw),
        "cwlinf": lambda: CWLinf(MODEL, eps=eps, alpha=alpha, steps=steps, **kw),
        "apgd-ce": lambda: APGD(MODEL, eps=eps, n_iter=steps + 2, **kw),
        "apgd-dlr": lambda: APGD(MODEL, eps=eps, n_iter=steps + 2, loss="dlr", **kw),
        "apgd-t": lambda: APGDT(MODEL, eps=eps, n_iter=steps + 2, n_target_classes=2, **kw),
        "square": lambda: Square(MODEL, eps=eps, n_queries=4 * steps, **kw),
        "spsa": lambda: SPSA(MODEL, eps=eps, steps=steps, nb_samples=8, lr=alpha, **kw),
    }[name]()


def _l2(name: str, eps: float, steps: int, **kw) -> object:
    return {
        "pgdl2": lambda: PGDL2(MODEL, eps=eps, alpha=max(eps / 4, 1e-3), steps=steps, **kw),
        "apgd-l2": lambda: APGD(MODEL, eps=eps, norm="L2", n_iter=steps + 2, **kw),
        "square-l2": lambda: Square(MODEL, eps=eps, norm="L2", n_queries=4 * steps, **kw),
        "cw": lambda: CW(MODEL, eps=eps, steps=3 * steps, binary_search_steps=2, lr=0.05, **kw),
    }[name]()


LINF = ["fgsm", "rfgsm", "bim", "pgd", "mifgsm", "cwlinf", "apgd-ce", "apgd-dlr", "apgd-t", "square", "spsa"]
L2 = ["pgdl2", "apgd-l2", "square-l2", "cw"]


def _check(atk, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, early_stop: bool) -> torch.Tensor:
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(lp_norm(x_adv - x, norm).max()) <= eps  # exactly, in the input's dtype
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if early_stop:
        with torch.no_grad():
            clean, adv = MODEL(x).argmax(1) == y, MODEL(x_adv).argmax(1) == y
        assert not bool((adv & ~clean).any())  # robust accuracy ≤ clean accuracy, per sample
    return x_adv


@SETTINGS
@given(
    name=st.sampled_from(LINF),
    eps=st.floats(0.0, 1.0),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    early_stop=st.booleans(),
)
def test_linf_attacks_stay_in_the_ball_and_box(name, eps, steps, seed, n, early_stop):
    x, y = _inputs(seed, n)
    atk = _linf(name, eps, steps, seed=seed, early_stop=early_stop)
    x_adv = _check(atk, x, y, "Linf", atk.eps, early_stop)
    if atk.eps == 0.0:
        assert torch.equal(x_adv, x)
    assert torch.equal(x_adv, atk(x, y))  # seeded: a pure function of its inputs


@SETTINGS
@given(
    name=st.sampled_from(L2),
    eps=st.floats(0.0, 3.0),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    early_stop=st.booleans(),
)
def test_l2_attacks_stay_in_the_ball_and_box(name, eps, steps, seed, n, early_stop):
    x, y = _inputs(seed, n)
    atk = _l2(name, eps, steps, seed=seed, early_stop=early_stop)
    x_adv = _check(atk, x, y, "L2", eps, early_stop)
    if eps == 0.0:
        assert torch.equal(x_adv, x)


@SETTINGS
@given(
    norm=st.sampled_from(["Linf", "L2"]),
    eps=st.floats(0.0, 2.0),
    scale=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_project_is_exact_and_idempotent(norm, eps, scale, seed, dtype):
    if norm == "Linf":
        eps = min(eps, 1.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 3, 4, 4, generator=g).to(dtype)
    x[0] = 0.0
    x[1] = 1.0
    cand = x + scale * torch.randn(x.shape, generator=g).to(dtype)
    p = project(cand, x, eps=eps, norm=norm)
    assert p.dtype == dtype
    assert float(lp_norm(p - x, norm).max()) <= eps
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    assert torch.allclose(project(p, x, eps=eps, norm=norm), p, atol=1e-6)
    inside = (x + 0.5 * (p - x)).clamp(0, 1)  # strictly inside the ball: left alone
    assert torch.allclose(project(inside, x, eps=eps, norm=norm), inside, atol=1e-7)


@pytest.mark.parametrize("name", LINF)
def test_eps_monotone_on_a_fixed_seed(name):
    """A larger ε never leaves more samples robust (summed over a grid, on one fixed seed)."""
    x, y = _inputs(0, 64)
    counts = []
    for eps in (0.0, 0.05, 0.15, 0.4):
        atk = _linf(name, eps, 4, seed=0)
        with torch.no_grad():
            counts.append(int((MODEL(atk(x, y)).argmax(1) == y).sum()))
    assert all(b <= a for a, b in zip(counts, counts[1:])), counts
    assert counts[-1] < counts[0]
