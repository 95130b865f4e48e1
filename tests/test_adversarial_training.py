"""PGD-AT, FGSM-RS and TRADES objectives, the training-time perturbation loop, the overfitting guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qrobust import build_model, fit, load_dataset, quantize
from qrobust.attacks import FGSM, PGD
from qrobust.defenses import OBJECTIVES, make_objective
from qrobust.defenses.adversarial import FgsmRS, PgdAT, Trades, kl_per_sample
from qrobust.defenses.guards import OverfitGuard, co_detected
from qrobust.defenses.perturb import ce_per_sample, clip_linf, crafting, linf_perturb
from qrobust.errors import ConfigError

EPS_BINARY = 0.1  # binary digits networks are far less robust: ε = 0.2 leaves every recipe near 0 %
EPS = 0.2  # digits are 8×8 with 17 grey levels: ε = 0.2 separates natural from robust training clearly
BINARY = "w1a1,act_scheme=sign,ste=clipped,first_layer_bits=8,last_layer_bits=8"


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(64, 3))


# ------------------------------------------------------------------------------------- perturbation loop
@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.001, 0.5), steps=st.integers(1, 3), seed=st.integers(0, 1000),
       start=st.sampled_from(["uniform", "normal", "none"]))
def test_perturbation_stays_in_the_threat_model(eps: float, steps: int, seed: int, start: str) -> None:
    torch.manual_seed(seed)
    x = torch.rand(6, 1, 4, 4)
    x[0] = 0.0  # pixels at the borders of [0, 1]
    x[1] = 1.0
    y = torch.randint(0, 5, (6,))
    x_adv = linf_perturb(_linear(), x, ce_per_sample(y), eps=eps, alpha=eps / 2, steps=steps, start=start)
    assert (x_adv - x).abs().max() <= eps * (1 + 1e-6) + 1e-7
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_one_step_from_the_clean_point_is_fgsm_and_k_steps_are_pgd() -> None:
    """The training loop reproduces the attacks package's FGSM and PGD exactly (same maths, one place)."""
    model = _linear(1)
    torch.manual_seed(1)
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 5, (8,))
    ours = linf_perturb(model, x, ce_per_sample(y), eps=0.1, alpha=0.1, steps=1, start="none")
    ref = FGSM(model, eps=0.1, early_stop=False)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)
    ours = linf_perturb(model, x, ce_per_sample(y), eps=0.1, alpha=0.03, steps=5, start="none")
    ref = PGD(model, eps=0.1, alpha=0.03, steps=5, random_start=False, early_stop=False)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_crafting_leaves_weights_modes_and_bn_statistics_alone() -> None:
    net = _bn_net()
    net.train()
    net[5].weight.requires_grad_(False)  # a frozen layer must stay frozen
    with torch.no_grad():
        net(torch.rand(16, 1, 4, 4))  # some running statistics to protect
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    for mode in ("train", "eval"):
        linf_perturb(net, x, ce_per_sample(y), eps=0.1, alpha=0.05, steps=3, mode=mode)
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert all(m.training for m in net.modules())
        assert net[0].weight.requires_grad and not net[5].weight.requires_grad
        assert all(p.grad is None for p in net.parameters())  # crafting computes input gradients only


def test_train_mode_crafting_uses_batch_statistics() -> None:
    net = _bn_net()
    net[3].p = 0.0  # no dropout noise
    x = torch.rand(8, 1, 4, 4) * 0.1 + 0.5  # far from the initial running statistics (0, 1)
    with crafting(net, mode="train") as m:
        out_train = m(x)
    with crafting(net, mode="eval") as m:
        out_eval = m(x)
    net.train()
    with torch.no_grad():
        assert torch.allclose(out_train, net(x), atol=1e-6)
    assert not torch.allclose(out_train, out_eval, atol=1e-3)


def test_clip_linf_is_a_projection() -> None:
    x = torch.rand(100)
    z = torch.randn(100)
    p = clip_linf(z, x, 0.1)
    assert torch.equal(clip_linf(p, x, 0.1), p)
    assert ((p - x).abs() <= 0.1 + 1e-7).all() and p.min() >= 0 and p.max() <= 1


# ----------------------------------------------------------------------------------------- objectives
def test_objectives_are_registered_and_describe_themselves() -> None:
    for name, cls in (("pgd-at", PgdAT), ("fgsm-rs", FgsmRS), ("trades", Trades)):
        assert OBJECTIVES[name] is cls
        obj = make_objective(name, eps=8 / 255)
        cfg = obj.config()
        assert cfg["name"] == name and cfg["eps"] == pytest.approx(8 / 255)
        json.dumps(cfg)
    assert make_objective("pgd-at", eps=0.1).alpha == pytest.approx(0.025)  # ε/4
    assert make_objective("fgsm-rs", eps=0.1).alpha == pytest.approx(0.125)  # 1.25ε (Wong et al.)
    assert make_objective("trades", eps=0.1).beta == 6.0
    assert FgsmRS.recommended_fit == {"schedule": "onecycle"}


@pytest.mark.parametrize("name,kwargs", [
    ("pgd-at", {"eps": 8}), ("pgd-at", {"eps": 0}), ("pgd-at", {"eps": 0.1, "steps": 0}),
    ("pgd-at", {"eps": 0.1, "alpha": -1}), ("fgsm-rs", {"eps": float("nan")}),
    ("trades", {"eps": 0.1, "beta": -1.0}), ("fgsm-rs", {"eps": 0.1, "craft_mode": "test"}),
    ("pgd-at", {"eps": 0.1, "epsilon": 0.1}),
])
def test_bad_options_are_refused(name: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        make_objective(name, **kwargs)


def test_pgd_at_and_fgsm_rs_train_on_adversarial_inputs() -> None:
    """The loss is the cross-entropy at a point inside the ε-ball that is at least as bad as the clean one."""
    model = _linear(2)
    torch.manual_seed(3)
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 5, (32,))
    clean = F.cross_entropy(model(x), y)
    for obj in (PgdAT(eps=0.1, steps=5), FgsmRS(eps=0.1)):
        loss, logits = obj(model, x, y)
        assert loss.requires_grad and logits.shape == (32, 5)
        assert loss.item() > clean.item()
        assert torch.allclose(loss, F.cross_entropy(logits, y))


def test_trades_loss_is_ce_plus_beta_kl() -> None:
    model = _linear(4)
    x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 5, (16,))
    torch.manual_seed(0)
    loss0, logits = Trades(eps=0.1, steps=3, beta=0.0)(model, x, y)
    assert torch.allclose(loss0, F.cross_entropy(model(x), y))
    assert torch.allclose(logits, model(x))
    torch.manual_seed(0)
    loss6, _ = Trades(eps=0.1, steps=3, beta=6.0)(model, x, y)
    torch.manual_seed(0)
    loss1, _ = Trades(eps=0.1, steps=3, beta=1.0)(model, x, y)
    kl = (loss1 - loss0).item()  # the same x' for the same seed: the KL term is linear in β
    assert kl > 0
    assert loss6.item() == pytest.approx(loss0.item() + 6 * kl, rel=1e-5)
    p = torch.softmax(torch.randn(4, 5), 1)
    assert kl_per_sample(p, torch.log(p)).abs().max() < 1e-6  # KL(p‖p) = 0


def test_random_draws_follow_the_global_seed() -> None:
    model = _linear(5)
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 5, (8,))
    torch.manual_seed(7)
    a, _ = FgsmRS(eps=0.1)(model, x, y)
    torch.manual_seed(7)
    b, _ = FgsmRS(eps=0.1)(model, x, y)
    c, _ = FgsmRS(eps=0.1)(model, x, y)
    assert a.item() == b.item() and c.item() != a.item()


# ----------------------------------------------------------------------------------- end to end, digits
def _digits_model(spec: str | None = None) -> nn.Module:
    info = load_dataset("digits", "test").info
    m = build_model("digits_cnn", in_channels=1, input_size=8, activation="relu6", mean=list(info.mean),
                    std=list(info.std))
    return quantize(m, spec) if spec else m


def _pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> float:
    x_adv = PGD(model, eps=eps, alpha=eps / 4, steps=10, seed=0)(x, y)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def _train_and_attack(spec: str, recipes: dict, *, epochs: int, batch_size: int, eps: float = EPS
                      ) -> dict[str, float]:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    x, y = test.tensors(200)
    acc = {}
    for name, obj in recipes.items():
        torch.manual_seed(0)
        model = _digits_model(spec)
        res = fit(model, train, objective=obj, epochs=epochs, batch_size=batch_size, lr=0.05, seed=0)
        assert all(math.isfinite(h["train_loss"]) for h in res.history)
        acc[name] = _pgd_accuracy(model, x, y, eps)
    acc["_model"] = model  # type: ignore[assignment]
    return acc


@pytest.mark.slow
def test_each_recipe_raises_pgd_accuracy_over_natural_training_at_w4a4() -> None:
    """Same model, data, epochs and optimiser; only the objective differs."""
    acc = _train_and_attack("w4a4", {"ce": "ce", "fgsm-rs": FgsmRS(eps=EPS), "pgd-at": PgdAT(eps=EPS, steps=3),
                                     "trades": Trades(eps=EPS, steps=3)}, epochs=6, batch_size=64)
    assert acc["ce"] < 0.15
    for name in ("fgsm-rs", "pgd-at", "trades"):
        assert acc[name] > acc["ce"] + 0.2, acc


@pytest.mark.slow
def test_binary_network_trains_with_each_recipe() -> None:
    """1-bit weights (sign × per-channel mean |w|) and sign activations: every recipe trains and beats natural
    training under PGD; the binary layers really compute with two weight values per output channel."""
    acc = _train_and_attack(BINARY, {"ce": "ce", "fgsm-rs": FgsmRS(eps=EPS_BINARY),
                                     "pgd-at": PgdAT(eps=EPS_BINARY, steps=2),
                                     "trades": Trades(eps=EPS_BINARY, steps=2)}, epochs=6, batch_size=32,
                            eps=EPS_BINARY)
    for name in ("fgsm-rs", "pgd-at", "trades"):
        assert acc[name] > acc["ce"] + 0.05, acc
    w = acc["_model"].conv2.quantized_weight().detach()  # type: ignore[attr-defined]
    assert all(len(torch.unique(w[c].abs())) == 1 for c in range(w.shape[0]))


# ------------------------------------------------------------------------------------------- the guard
@given(pgd=st.floats(0, 1), fgsm=st.floats(0, 1), best=st.floats(0, 1), lower=st.floats(0, 1),
       higher=st.floats(0, 1))
def test_co_detection_is_monotone(pgd: float, fgsm: float, best: float, lower: float, higher: float) -> None:
    """Worse PGD accuracy or better FGSM accuracy never un-flags a collapse."""
    if co_detected(pgd_acc=pgd, fgsm_acc=fgsm, best_pgd_acc=best):
        assert best - pgd >= 0.2 and fgsm - pgd >= 0.3
        assert co_detected(pgd_acc=pgd * lower, fgsm_acc=fgsm, best_pgd_acc=best)
        assert co_detected(pgd_acc=pgd, fgsm_acc=fgsm + (1 - fgsm) * higher, best_pgd_acc=best)


def test_co_decision_on_synthetic_numbers() -> None:
    assert co_detected(pgd_acc=0.05, fgsm_acc=0.8, best_pgd_acc=0.45)
    assert not co_detected(pgd_acc=0.40, fgsm_acc=0.8, best_pgd_acc=0.45)  # no collapse
    assert not co_detected(pgd_acc=0.05, fgsm_acc=0.2, best_pgd_acc=0.45)  # FGSM fell too: not CO
    assert co_detected(pgd_acc=0.3, fgsm_acc=0.65, best_pgd_acc=0.45, drop=0.1, gap=0.3)


def _scripted_guard(action: str, script: list[tuple[float, float]]) -> OverfitGuard:
    guard = OverfitGuard((torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)), eps=0.1, action=action)
    it = iter(script)
    guard.measure = lambda model: next(it)  # type: ignore[method-assign]
    return guard


@pytest.mark.parametrize("action", ["warn", "stop", "restore"])
def test_guard_flags_the_collapse_and_acts(action: str) -> None:
    model = _linear(6)
    guard = _scripted_guard(action, [(0.6, 0.4), (0.7, 0.5), (0.72, 0.45), (0.95, 0.02), (0.9, 0.01)])
    records, outcomes, weights = [], [], []
    for epoch in range(1, 6):
        with torch.no_grad():
            model[1].weight.fill_(float(epoch))  # each epoch leaves different weights
        weights.append(model[1].weight.clone())
        rec = {"epoch": epoch}
        outcomes.append(guard(rec, model))
        records.append(rec)
        if outcomes[-1] == "stop":
            break
    assert [r["co_flag"] for r in records[:3]] == [False, False, False]
    assert records[3]["co_flag"] is True and records[3]["co_pgd_acc"] == 0.02
    assert records[3]["co_best_pgd_acc"] == 0.5 and guard.best_epoch == 2
    assert guard.flagged[0] == 4
    if action == "warn":
        assert outcomes == [None] * 5 and "co_action" not in records[3]
    else:
        assert outcomes == [None, None, None, "stop"]
    if action == "restore":
        assert torch.equal(model[1].weight, weights[1])  # the epoch with the best PGD accuracy
        assert records[3]["co_action"] == "restored epoch 2 and stopped"
    else:
        assert torch.equal(model[1].weight, weights[-1])


def test_guard_refuses_bad_settings() -> None:
    data = (torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError):
        OverfitGuard(data, eps=0.1, action="explode")
    with pytest.raises(ConfigError):
        OverfitGuard(data, eps=0.1, drop=0.0)
    with pytest.raises(ConfigError):
        OverfitGuard((torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.long)), eps=0.1)


def test_guard_logs_into_metrics_jsonl(tmp_path) -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = _digits_model("w4a4")
    guard = OverfitGuard(test, eps=EPS, n=64, steps=5)
    fit(model, train, objective=FgsmRS(eps=EPS), epochs=2, batch_size=64, lr=0.05, seed=0, max_batches=8,
        out=tmp_path / "run", callbacks=[guard])
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for rec in lines:
        assert 0 <= rec["co_pgd_acc"] <= 1 and 0 <= rec["co_fgsm_acc"] <= 1 and rec["co_flag"] is False
    assert lines[1]["co_best_pgd_acc"] == max(r["co_pgd_acc"] for r in lines)
