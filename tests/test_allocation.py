"""Per-layer bit allocation under a size budget: the exact solver, the methods, the spec it returns."""

from __future__ import annotations

import itertools

import pytest
import torch

import qrobust
from qrobust.analysis.allocation import METHODS, allocate, layer_costs, solve_allocation
from qrobust.data import load_dataset
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.training import fit


def test_solver_is_exact_against_brute_force():
    g = torch.Generator().manual_seed(0)
    sizes = {"a": 30, "b": 500, "c": 80, "d": 10}
    cands = (2, 3, 4, 8)
    costs = {n: {b: float(torch.rand((), generator=g)) * (9 - b) for b in cands} for n in sizes}
    total = sum(sizes.values())
    for budget in (2.5, 3.0, 4.2):
        best = min((sum(costs[n][b] for n, b in zip(sizes, combo)), combo)
                   for combo in itertools.product(cands, repeat=len(sizes))
                   if sum(sizes[n] * b for n, b in zip(sizes, combo)) <= budget * total)
        got = solve_allocation(costs, sizes, budget)
        assert sum(costs[n][got[n]] for n in sizes) == pytest.approx(best[0])
        assert sum(sizes[n] * got[n] for n in sizes) <= budget * total
    with pytest.raises(ConfigError, match="cannot be met"):
        solve_allocation(costs, sizes, 1.5)


@pytest.fixture(scope="module")
def digits_float():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std,
                    activation="relu6")
    fit(m, train, epochs=5, lr=0.05)
    yield m.eval(), train.tensors(n=64)
    torch.set_num_threads(old)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_a_spec_within_budget_that_quantize_applies(digits_float, method):
    m, (x, y) = digits_float
    spec, info = allocate(m, x, y, budget=4.0, method=method, eps=0.1, candidates=(2, 4, 8))
    assert info["average_bits"] <= 4.0 + 1e-9
    q = qrobust.quantize(m, spec)
    rows = {r["name"]: r for r in qrobust.describe(q)}
    for layer, bits in info["bits"].items():
        assert rows[layer]["weight_bits"] == bits  # the override reached the layer


def test_costs_fall_with_more_bits_and_need_a_float_model_and_eps(digits_float):
    m, (x, y) = digits_float
    c = layer_costs(m, x, y, method="lipschitz", eps=0.1, candidates=(2, 4, 8))
    for per_bits in c.values():
        assert per_bits[2] > per_bits[4] > per_bits[8] > 0
    with pytest.raises(ConfigError, match="needs eps"):
        layer_costs(m, x, y, method="lipschitz")
    with pytest.raises(ConfigError, match="float model"):
        layer_costs(qrobust.quantize(m, "w4a4"), x, y, method="hawq")
