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


@pytest.fixture(scope="module")
def mnist_w4a4(mnist_model):
    from qrobust.quant import quantize

    model, x, y = mnist_model
    train = load_dataset("mnist", "train", root=MNIST).subset(12000, seed=0)
    torch.manual_seed(0)
    q = quantize(model, "w4a4")
    fit(q, train, epochs=1, batch_size=128, optimizer="adamw", lr=1e-3, schedule="onecycle")
    return q.eval(), x[:200], y[:200]


class _ClampedAPGD(APGD):
    """Our APGD with torchattacks' (and AutoAttack's) projection, ``clamp(min(max(x', x − ε), x + ε), 0, 1)``:
    in float32 ``x ± ε`` rounds, so its points can lie up to ~3e-8 outside the ε-ball; ours stay inside (the
    base's strict projection). Used only as the control that this is the one difference that matters."""

    def project(self, x_adv, x):
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)


def _still_correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


@pytest.mark.parametrize("which", ["float", "w4a4"])
def test_apgd_ce_at_least_as_strong_as_torchattacks(mnist_model, mnist_w4a4, which):
    """Same settings (ε 0.15, 20 iterations, 1 restart), 4 seeds, the first 200 MNIST test images: our APGD-CE
    leaves at most the robust images torchattacks' does. On the quantized model torchattacks differentiates
    through the model's own straight-through estimators, which is what our default gradients='ste' uses too
    (plus BPDA where they are all zero); with BPDA alone ours was the weaker one (34.8 vs 33.4 %, measured).

    Paired: both attacks get only the images the model classifies correctly. torchattacks draws its random
    start for exactly those, ours for every image of the batch, so with a misclassified image among the 200
    the same seed gave every image after it a different start in the two attacks (robust counts then differed
    by up to 8 images a seed, by chance: w4a4 ours 30.00 vs 29.38 % on seeds 0–3 but 29.75 vs 30.00 % on 0–7)."""
    model, x, y = (mnist_model[0], mnist_model[1][:200], mnist_model[2][:200]) if which == "float" else mnist_w4a4
    keep = _still_correct(model, x, y)
    x, y = x[keep], y[keep]
    ours, theirs = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        ref = torchattacks.APGD(model, eps=0.15, steps=20, loss="ce", n_restarts=1, seed=seed)
        r_theirs = _still_correct(model, ref(x, y), y)
        r_ours = _still_correct(model, APGD(model, eps=0.15, n_iter=20, loss="ce", seed=seed)(x, y), y)
        r_clamped = _still_correct(model, _ClampedAPGD(model, eps=0.15, n_iter=20, loss="ce", seed=seed)(x, y), y)
        # the control: with the projection swapped, ours fools exactly the images torchattacks fools (step
        # halving, restart from the best point, momentum and start agree; a momentum of 0.7 or no restart
        # from the best point breaks this, measured). Our other differences changed no outcome here: early
        # stopping (ours returns the first adversarial iterate, theirs the last), the first oscillation
        # window (ours compares step 1 with the starting loss, theirs with 0) and BPDA for all-zero
        # gradients (never needed on this model)
        assert torch.equal(r_clamped, r_theirs), (seed, (r_clamped != r_theirs).nonzero().flatten().tolist())
        ours.append(int(r_ours.sum()))
        theirs.append(int(r_theirs.sum()))
    print(f"{which}: robust images of {x.shape[0]}, qrobust APGD-CE {ours}, torchattacks APGD {theirs}")
    assert 0.05 < sum(theirs) / (4 * 200) < 0.95, "choose an ε where robust accuracy is informative"
    # What remains is chance: our strict projection moves a point on the ε-boundary by one float32 ulp, which
    # sends a few trajectories elsewhere. Measured on an AVX2 machine, seeds 0–15, this float model: 3 images
    # only torchattacks fools, 2 only ours (764 vs 763 robust of 16×199), and each of the 3 stays
    # adversarial when pulled into our stricter ball — so the ulp of radius is not what fooled them; w4a4:
    # equal on every seed of 0–7. Seeds 0–3 here: float 189 vs 188, w4a4 236 vs 236. The worst 4-seed window of
    # those 16 seeds was 2 images, so 2 robust images in total (0.25 point of the mean) are allowed; the
    # weakness this test was written for (BPDA-only APGD) was 1.35 points, 11 images, over.
    assert sum(ours) <= sum(theirs) + 2, (ours, theirs)


@pytest.mark.parametrize("which", ["float", "w4a4"])
def test_square_at_least_as_strong_as_torchattacks(mnist_model, mnist_w4a4, which):
    """Same budget (ε 0.2, 300 queries, p_init 0.8, 1 restart), seeds 0–1, the correctly classified images of
    the first 200 MNIST test images: our Square leaves at most the robust images torchattacks' does (measured:
    float 47 + 43 vs 65 + 62 of 199, w4a4 78 + 76 vs 97 + 104 of 200). Ours draws a window and channel signs
    per sample (theirs one window and one set of signs per batch) and never spends a query on a proposal that
    changes nothing (theirs queries one whose window already sits at the proposed corners)."""
    from qrobust.attacks import Square

    model, x, y = (mnist_model[0], mnist_model[1][:200], mnist_model[2][:200]) if which == "float" else mnist_w4a4
    keep = _still_correct(model, x, y)
    x, y = x[keep], y[keep]
    ours, theirs = [], []
    for seed in range(2):
        ref = torchattacks.Square(model, eps=0.2, n_queries=300, p_init=0.8, n_restarts=1, seed=seed)
        theirs.append(int(_still_correct(model, ref(x, y), y).sum()))
        ours.append(int(_still_correct(model, Square(model, eps=0.2, n_queries=300, seed=seed)(x, y), y).sum()))
    print(f"{which}: robust images of {x.shape[0]}, qrobust Square {ours}, torchattacks Square {theirs}")
    assert 0.05 < sum(theirs) / (2 * x.shape[0]) < 0.95, "choose an ε where robust accuracy is informative"
    assert sum(ours) <= sum(theirs), (ours, theirs)
