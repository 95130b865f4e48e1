"""Attacks of other libraries in qrobust's evaluation, and torchattacks' argument names on qrobust's attacks."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import qrobust
from qrobust.attacks import APGD, APGDT, PGD, PGDL2, RFGSM, External, Square, is_foreign_attack
from qrobust.data import load_dataset
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.quant import quantize
from qrobust.training import fit


@pytest.fixture(scope="module")
def digits_w4():
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std)
    fit(m, train, epochs=5, lr=0.05)
    q = quantize(m, "w4a4")
    fit(q, train, epochs=1, lr=0.01)
    x, y = test.tensors(n=64)
    yield q.eval(), x, y
    torch.set_num_threads(old)


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_what_counts_as_a_foreign_attack(digits_w4):
    q, _, _ = digits_w4
    assert not is_foreign_attack(PGD(q, eps=0.1)) and not is_foreign_attack(PGD)
    assert not is_foreign_attack(lambda model, **kw: PGD(model, **kw))  # a factory
    assert is_foreign_attack(lambda x, y: x)
    assert not is_foreign_attack("pgd")


def test_a_callable_joins_the_suite_and_is_held_to_the_threat_model(digits_w4, caplog):
    q, x, y = digits_w4
    calls = []

    def far(xb, yb):  # breaks the threat model on purpose: 3ε of noise
        calls.append(xb.shape[0])
        return (xb + 0.3 * torch.randn_like(xb)).clamp(0, 1)

    with caplog.at_level(logging.WARNING, logger="qrobust.attacks.external"):
        rep = qrobust.evaluate(q, (x, y), eps=0.1, suite=["fgsm", far], diagnostics=False, return_examples=True)
    res = rep.result().attack("far")
    assert "outside the Linf ball" in caplog.text  # said, not silently clipped
    assert calls and calls[0] == res.n_attacked  # it saw only the points FGSM left robust
    x_kept, adv = rep.adversarial_examples()[:2]
    assert (adv - x_kept).abs().amax() <= 0.1 + 1e-6
    assert not res.black_box  # undeclared: counted as white-box


def test_foreign_attack_eps_and_model_must_match(digits_w4):
    q, x, y = digits_w4

    class Foreign:
        def __init__(self, model, eps):
            self.model, self.eps = model, eps

        def __call__(self, xb, yb):
            return xb

    with pytest.raises(ConfigError, match="eps=0.2 but is evaluated at eps=0.1"):
        qrobust.evaluate(q, (x, y), eps=0.1, suite=[Foreign(q, 0.2)], diagnostics=False)
    with pytest.raises(ConfigError, match="another model object"):
        External(q, Foreign(nn.Linear(2, 2), 0.1))
    assert External(q, Foreign(q, 0.1)).eps == 0.1  # ε taken from the foreign attack


def test_torchattacks_object_runs_with_straight_through_gradients(digits_w4):
    torchattacks = pytest.importorskip("torchattacks")
    q, x, y = digits_w4
    ref = torchattacks.PGD(q, eps=0.1, alpha=0.025, steps=10)
    rep = qrobust.evaluate(q, (x, y), eps=0.1, suite=[ref], diagnostics=False)
    # inside qrobust it gets the straight-through estimators through every quantizer (not rounding's zeros),
    # so it breaks points; ours at the same settings is at least as strong (it also falls back to BPDA where
    # the estimator's gradient is all zero)
    ours = _acc(q, PGD(q, eps=0.1, alpha=0.025, steps=10, seed=0)(x, y), y)
    assert rep.result().attack("pgd").robust_accuracy < rep.clean_accuracy - 0.2
    assert ours <= rep.robust_accuracy + 1 / 64


def test_torchattacks_argument_names(digits_w4):
    q, x, y = digits_w4
    a = APGD(q, eps=0.1, steps=7, n_restarts=2)
    assert (a.n_iter, a.restarts) == (7, 2)
    assert APGDT(q, eps=0.1, steps=5).n_iter == 5
    assert Square(q, eps=0.1, n_queries=10, n_restarts=3).restarts == 3
    assert torch.equal(APGD(q, eps=0.1, steps=5, seed=1)(x, y), APGD(q, eps=0.1, n_iter=5, seed=1)(x, y))
    with pytest.raises(ConfigError, match="both n_iter= and steps="):
        APGD(q, eps=0.1, steps=5, n_iter=6)
    assert a.config()["n_iter"] == 7  # reports use qrobust's own name


def test_default_step_sizes_follow_eps(digits_w4):
    q, _, _ = digits_w4
    assert PGD(q, eps=8 / 255).alpha == pytest.approx(2 / 255)  # torchattacks' default at its default ε
    assert PGD(q, eps=0.3).alpha == pytest.approx(0.075)
    assert PGDL2(q, eps=0.5).alpha == pytest.approx(0.1)
    assert RFGSM(q, eps=8 / 255).alpha == pytest.approx(4 / 255)
    assert PGD(q, eps=0.3, alpha=0.01).alpha == 0.01
