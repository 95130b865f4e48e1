"""PGD++: PGD on temperature-scaled logits."""

from __future__ import annotations

import torch
from torch import nn

from qrobust.attacks import PGD, PGDpp, make_attack


def _net(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        net[3].weight.mul_(scale)
        net[3].bias.mul_(scale)
    return net.eval()


def test_beta_one_is_pgd_and_beta_follows_the_logit_scale():
    net = _net()
    x = torch.rand(12, 1, 4, 4)
    y = net(x).argmax(1)
    a = PGDpp(net, eps=0.05, steps=5, seed=3, beta=1.0)(x, y)
    b = PGD(net, eps=0.05, steps=5, seed=3)(x, y)
    assert torch.equal(a, b)
    small, big = PGDpp(_net(1.0), eps=0.05, steps=1, seed=0), PGDpp(_net(10.0), eps=0.05, steps=1, seed=0)
    small(x, y), big(x, y)
    assert abs(small.last_beta / big.last_beta - 10.0) < 1e-3  # ten times the logits, a tenth of β


def test_saturated_softmax_stalls_pgd_but_not_pgdpp():
    net = _net(1e4)  # logits so large that float32 softmax is one-hot: CE's gradient underflows to zero
    x = torch.rand(32, 1, 4, 4)
    y = net(x).argmax(1)
    pgd = PGD(net, eps=0.3, steps=10, seed=0, random_start=False)
    pp = PGDpp(net, eps=0.3, steps=10, seed=0, random_start=False)
    with torch.no_grad():
        acc_pgd = (net(pgd(x, y)).argmax(1) == y).float().mean().item()
        acc_pp = (net(pp(x, y)).argmax(1) == y).float().mean().item()
    assert acc_pp < acc_pgd
    assert isinstance(make_attack("pgd++", net, eps=0.1), PGDpp)
