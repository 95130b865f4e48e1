"""qrobust's attacks against an independent implementation (torchattacks) on a small CNN trained on real MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qrobust.attacks import APGD, PGD
from qrobust.data import load_dataset
from qrobust.errors import DataError
from qrobust.models import build_model
from qrobust.training import fit

torchattacks = pytest.importorskip("torchattacks", reason="the test-only reference; .ci/run installs it")

MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def mnist_model():
    try:
        train = load_dataset("mnist", "train", root=MNIST).subset(12000, seed=0)
        test = load_dataset("mnist", "test", root=MNIST)
    except DataError:
        pytest.skip("MNIST not found in ../shared/data")
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, input_size=28, mean=list(train.info.mean), std=list(train.info.std))
    fit(model, train, epochs=1, batch_size=128, optimizer="adamw", lr=3e-3, schedule="onecycle")
    x, y = test.tensors(n=500)
    return model.eval(), x, y


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_pgd_agrees_with_torchattacks(mnist_model, eps):
    model, x, y = mnist_model
    assert _acc(model, x, y) > 0.95
    alpha, steps = eps / 4, 10
    ours = _acc(model, PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True, seed=0)(x, y), y)
    torch.manual_seed(0)
    ref = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    theirs = _acc(model, ref(x, y), y)
    assert 0.02 < theirs < 0.98, "choose an ε where robust accuracy is informative"
    print(f"eps={eps}: qrobust PGD {ours:.3f}, torchattacks PGD {theirs:.3f}")
    assert abs(ours - theirs) <= 0.015, (ours, theirs)


def test_apgd_ce_at_least_as_strong_as_pgd20(mnist_model):
    model, x, y = mnist_model
    eps = 0.1
    pgd = _acc(model, PGD(model, eps=eps, alpha=eps / 4, steps=20, seed=0)(x, y), y)
    apgd = _acc(model, APGD(model, eps=eps, n_iter=20, loss="ce", seed=0)(x, y), y)
    assert apgd <= pgd + 1e-9, (apgd, pgd)
