"""RandomPrecision: one network (shared weights) at several precisions with its own BatchNorm per precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrobust.defenses import Ensemble, RandomPrecision, RandomPrecisionTraining
from qrobust.errors import ConfigError
from qrobust.models import Normalize
from qrobust.training import fit


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Normalize([0.5], [0.25]), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def test_one_set_of_weights_and_a_batchnorm_per_precision():
    rp = RandomPrecision(_net(), bits=(8, 4, 2))
    convs = [c[1] for c in rp.copies]
    assert all(c.weight is convs[0].weight for c in convs)  # one network
    bns = [c[2] for c in rp.copies]
    assert len({id(b) for b in bns}) == 3 and len({id(b.running_mean) for b in bns}) == 3
    n_float = sum(p.numel() for p in _net().parameters())
    n_bn = sum(p.numel() for p in _net()[2].parameters())
    assert sum(p.numel() for p in rp.parameters()) == n_float + 2 * n_bn  # shared weights, BN per precision
    with pytest.raises(ConfigError, match="at least two"):
        RandomPrecision(_net(), bits=(4,))


def test_draws_cover_every_precision_and_fixed_pins_one():
    rp = RandomPrecision(_net(), bits=(8, 4, 2), seed=1).eval()
    x = torch.rand(3, 1, 8, 8)
    seen = set()
    for _ in range(60):
        rp(x)
        seen.add(rp.last_bits)
    assert seen == {8, 4, 2}
    with rp.fixed(2), torch.no_grad():
        a, b = rp(x), rp(x)
        assert torch.equal(a, b) and torch.equal(a, rp.at(2)(x)) and rp.last_bits == 2
    with pytest.raises(ConfigError, match="not one of"):
        rp.at(3)
    assert isinstance(rp.as_ensemble(), Ensemble)


def test_random_precision_training_updates_the_shared_weights_at_every_precision():
    rp = RandomPrecision(_net(), bits=(8, 2), seed=0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    before = rp.copies[0][1].weight.detach().clone()
    bn2_before = rp.at(2)[2].running_mean.clone()
    fit(rp, (x, y), objective=RandomPrecisionTraining("ce"), epochs=2, batch_size=16, lr=0.05)
    assert not torch.equal(before, rp.copies[0][1].weight.detach())
    assert rp.copies[1][1].weight is rp.copies[0][1].weight
    assert not torch.equal(bn2_before, rp.at(2)[2].running_mean)  # the 2-bit BN saw 2-bit steps
    with pytest.raises(ConfigError, match="trains a RandomPrecision"):
        RandomPrecisionTraining("ce")(_net(), x, y)


def test_repeated_predictions_give_the_worst_case_of_a_randomized_model():
    import qrobust

    class Coin(nn.Module):  # right or wrong at random: one prediction says nothing
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.g = torch.Generator().manual_seed(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            right = torch.rand(x.shape[0], generator=self.g) < 0.5
            out = torch.zeros(x.shape[0], 2) + self.w
            out[right, 0], out[~right, 1] = 1.0, 1.0
            return out

    x, y = torch.rand(400, 1, 2, 2), torch.zeros(400, dtype=torch.long)
    once = qrobust.evaluate(Coin(), (x, y), suite=["fgsm"], eps=0.1, diagnostics=False)
    five = qrobust.evaluate(Coin(), (x, y), suite=["fgsm"], eps=0.1, diagnostics=False, repeats=5)
    assert 0.4 < once.clean_accuracy < 0.6
    assert five.clean_accuracy < 0.1 and five.settings["repeats"] == 5  # right five times in a row: ~3 %


def test_a_random_precision_network_saves_and_loads_from_the_path_alone(tmp_path):
    import qrobust
    from qrobust.models import build_model

    torch.manual_seed(0)
    rp = RandomPrecision(build_model("digits_cnn", in_channels=1, input_size=8), bits=(8, 2)).eval()
    qrobust.save(rp, tmp_path / "rp.safetensors")
    back = qrobust.load(tmp_path / "rp.safetensors")
    x = torch.rand(4, 1, 8, 8)
    assert isinstance(back, RandomPrecision) and back.bits == [8, 2]
    assert back.copies[1].conv1.weight is back.copies[0].conv1.weight  # still one network
    with torch.no_grad():
        for b in back.bits:
            with rp.fixed(b), back.fixed(b):
                assert torch.equal(rp(x), back(x))
