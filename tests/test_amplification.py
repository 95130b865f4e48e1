"""Error amplification: per-layer relative distances and quantization-bucket changes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from qrobust.analysis.amplification import (
    amplification,
    amplification_report,
    amplification_summary,
    amplification_sweep,
    plot_amplification,
)
from qrobust.errors import ConfigError, InputError
from qrobust.models import activation_modules, build_model
from qrobust.quant import QuantAct, quantize


def _digits(spec: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    m = build_model("digits_cnn", in_channels=1, input_size=8, activation="relu6")
    return quantize(m, spec) if spec else m


@pytest.mark.parametrize("spec", [None, "w32a2", "w4a4"])
def test_one_row_per_activation_and_zero_for_identical_inputs(spec):
    model = _digits(spec)
    x = torch.rand(6, 1, 8, 8)
    rows = amplification(model, x, x.clone(), bits=3)
    assert [r["name"] for r in rows] == [n for n, _ in activation_modules(model)]
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["rel_l2_total"] in (0.0, None) and r["bucket_change"] == 0.0
        assert r["rel_l2"] in (0.0, None)
    grid = [(r["bits"], r["alpha"]) for r in rows]
    assert grid == [(3 if spec is None else int(spec[-1]), 6.0)] * 3  # a QuantAct keeps its own grid


def test_bucket_change_and_distance_match_hand_computation():
    net = nn.Sequential(QuantAct(2, clip=3.0))  # levels 0, 1, 2, 3
    x = torch.tensor([[0.4, 1.2, 2.6, 9.0], [0.2, 0.9, 1.4, 2.0]])
    x_adv = torch.tensor([[0.6, 1.6, 2.4, 8.0], [0.3, 1.1, 1.6, 1.4]])
    # buckets: [0,1,3,3] → [1,2,2,3] (3 changed); [0,1,1,2] → [0,1,2,1] (2 changed): 5 of 8
    row = amplification(net, x, x_adv)[0]
    assert row["bucket_change"] == 5 / 8
    r1 = math.sqrt(3 / 19)  # outputs (0,1,3,3) → (1,2,2,3)
    r2 = math.sqrt(2 / 6)  # outputs (0,1,1,2) → (0,1,2,1)
    assert row["rel_l2"] == pytest.approx((r1 + r2) / 2)
    assert row["rel_l2_total"] == pytest.approx(math.sqrt(5 / 25))
    assert (row["grid"], row["bits"], row["alpha"]) == ("clip", 2, 3.0)


def test_float_activation_bucketed_on_a_given_grid():
    net = nn.Sequential(nn.ReLU6())
    x = torch.tensor([[0.4, 1.2, 2.6, 9.0]])
    x_adv = torch.tensor([[0.6, 1.6, 2.4, 8.0]])
    assert amplification(net, x, x_adv)[0]["bucket_change"] is None  # no grid for a float layer
    assert amplification(net, x, x_adv, bits=2, alpha=3.0)[0]["bucket_change"] == 0.75
    # 1 bit on [0, 6]: bucket = z ≥ 3; nothing crosses 3 here
    assert amplification(net, x, x_adv, bits=1)[0]["bucket_change"] == 0.0
    # relative distance of the ReLU6 outputs (0.4,1.2,2.6,6) → (0.6,1.6,2.4,6)
    d = math.sqrt(0.2**2 + 0.4**2 + 0.2**2) / math.sqrt(0.4**2 + 1.2**2 + 2.6**2 + 36)
    assert amplification(net, x, x_adv)[0]["rel_l2"] == pytest.approx(d, rel=1e-5)
    # force_grid makes a QuantAct use the given grid instead of its own
    q = nn.Sequential(QuantAct(4, clip=6.0))
    assert amplification(q, x, x_adv, bits=2, alpha=3.0, force_grid=True)[0]["bucket_change"] == 0.75


def test_zero_activation_samples_are_counted_not_divided():
    net = nn.Sequential(nn.ReLU())
    x = torch.tensor([[-1.0, -2.0], [1.0, 1.0]])
    x_adv = torch.tensor([[0.5, -2.0], [1.0, 2.0]])
    row = amplification(net, x, x_adv)[0]
    assert row["n_zero"] == 1 and row["rel_l2"] == pytest.approx(1 / math.sqrt(2))


def test_input_checks():
    net = nn.Sequential(nn.ReLU())
    with pytest.raises(InputError):
        amplification(net, torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="no activation"):
        amplification(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ConfigError):
        amplification(net, torch.zeros(1, 2), torch.zeros(1, 2), bits=9)


def test_sweep_summary_plot_and_report(tmp_path):
    model, q = _digits(), _digits("w32a4")
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    sweep = amplification_sweep(q, x, y, [0.05, 0.1], attack="pgd", steps=2)
    assert [s["eps"] for s in sweep] == [0.05, 0.1] and sweep[0]["attack"] == "pgd-2"
    assert all(len(s["rows"]) == 3 for s in sweep)
    # a larger ball gives a larger first-layer distortion (PGD without early stopping uses its budget)
    assert sweep[1]["rows"][0]["rel_l2"] > sweep[0]["rows"][0]["rel_l2"] > 0
    summ = amplification_summary(sweep[0]["rows"])
    assert summ["growth"] == pytest.approx(summ["last_rel_l2"] / summ["first_rel_l2"])
    with pytest.raises(ConfigError):
        amplification_sweep(q, x, y, [0.1], attack="cw")
    path = plot_amplification({"w32a4": sweep}, tmp_path / "amp.png")
    assert path.stat().st_size > 1000
    rep = amplification_report({"float": model, "w32a4": q}, x, y, eps_list=[0.1], attack="fgsm", bits=4,
                               out=tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "amplification.json").read_text())
    assert set(saved["models"]) == {"float", "w32a4"} and (tmp_path / "r" / "amplification.png").is_file()
    assert rep["models"]["float"][0]["rows"][0]["bucket_change"] is not None  # float on the 4-bit grid
