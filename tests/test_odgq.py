"""ODG-Q: fingerprints, the perturbation bank, the DG losses, the cost of a step, the carried domain."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qrobust import build_model, fit, load_dataset, quantize
from qrobust.attacks import PGD
from qrobust.defenses import OBJECTIVES, make_objective
from qrobust.defenses.odgq import OdgQ, PerturbationBank, dg_combine, image_fingerprint
from qrobust.defenses.perturb import ce_per_sample, linf_perturb
from qrobust.errors import ConfigError
from qrobust.quant import quantization_disabled
from qrobust.training import FitConfig

EPS = 0.2


class Recorder(nn.Module):
    """Wraps a model; records the inputs of its training passes (weights requiring grad; crafting passes
    freeze them) and counts every sample that goes through it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if next(self.inner.parameters()).requires_grad:
            self.inputs.append(x.detach().clone())
        self.samples += x.shape[0]
        return self.inner(x)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=g).float() / 255  # on the uint8 grid, like real data
    return x, torch.randint(0, 4, (n,), generator=g)


# ---------------------------------------------------------------------------------------- fingerprints
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), pixel=st.integers(0, 47), level=st.integers(1, 255))
def test_fingerprint_identifies_images(seed: int, pixel: int, level: int) -> None:
    x, _ = _batch(6, seed)
    x = x.repeat(1, 3, 1, 1)  # 3×4×4 images
    fp = image_fingerprint(x)
    perm = torch.randperm(6)
    assert torch.equal(image_fingerprint(x[perm]), fp[perm])  # independent of batch position
    assert torch.equal(image_fingerprint(x[2:3]), fp[2:3])  # and of the rest of the batch
    y = x.clone().reshape(6, -1)
    y[0, pixel] = (torch.round(y[0, pixel] * 255) + level) % 256 / 255  # change one pixel by ≥ 1 level
    assert image_fingerprint(y.reshape(x.shape))[0] != fp[0]


def test_fingerprint_does_not_overflow_on_large_images() -> None:
    x = torch.ones(2, 3, 64, 64)
    fp = image_fingerprint(x)
    assert fp[0] == fp[1] and fp[0] > 0  # all-255 images: the largest possible sum stays positive


# ----------------------------------------------------------------------------------------------- bank
def test_bank_round_trip_resolution_capacity_and_state() -> None:
    bank = PerturbationBank(0.1, capacity=5)
    keys = torch.arange(4, dtype=torch.int64) * 1000
    delta = (torch.rand(4, 1, 3, 3) * 2 - 1) * 0.1
    bank.put(keys, delta)
    got, found = bank.get(torch.tensor([0, 5, 2000]), torch.zeros(3, 1, 3, 3))
    assert found.tolist() == [True, False, True]
    assert (got[0] - delta[0]).abs().max() <= 0.1 / 254 + 1e-7  # int8 codes of δ/ε
    assert torch.equal(got[1], torch.zeros(1, 3, 3))
    bank.put(torch.tensor([7, 8, 9]), torch.zeros(3, 1, 3, 3))  # only one more fits
    assert len(bank) == 5
    assert bank.get(torch.tensor([7, 8]), torch.zeros(2, 1, 3, 3))[1].tolist() == [True, False]
    other = PerturbationBank(0.1)
    other.load_state_dict(bank.state_dict())
    a, fa = bank.get(keys, delta)
    b, fb = other.get(keys, delta)
    assert torch.equal(a, b) and fa.all() and fb.all()


# ------------------------------------------------------------------------------------------ DG losses
@pytest.mark.parametrize("kind,weight", [("vrex", 0.0), ("vrex", 3.0), ("softmax", 0.1), ("softmax", 2.0),
                                         ("mean", 1.0)])
def test_dg_weights_are_the_gradient(kind: str, weight: float) -> None:
    losses = torch.tensor([0.3, 1.7, 0.9], requires_grad=True)
    total, c = dg_combine(losses, kind, weight)
    (g,) = torch.autograd.grad(total, losses)
    assert torch.allclose(c, g, atol=1e-6)


@given(st.lists(st.floats(0, 10), min_size=2, max_size=5), st.floats(0.01, 5))
def test_softmax_dg_is_a_smooth_worst_case(values: list[float], tau: float) -> None:
    losses = torch.tensor(values, dtype=torch.float64)
    total, _ = dg_combine(losses, "softmax", tau)
    assert losses.max() - 1e-9 <= total <= losses.max() + tau * math.log(len(values)) + 1e-9


# ------------------------------------------------------------------------------------------- the step
def test_step_cost_is_one_training_pass_plus_the_fresh_share() -> None:
    """Per step the model sees the batch once for training plus craft_fraction·B samples every craft_every
    steps for crafting (one forward each) — the whole of ODG-Q's extra compute."""
    x, y = _batch(16)
    for frac, every, expected in ((0.5, 2, 4 * 16 + 2 * 8), (0.25, 1, 4 * 16 + 4 * 4), (0.0, 1, 4 * 16)):
        model = Recorder(_net())
        obj = OdgQ(eps=EPS, craft_fraction=frac, craft_every=every)
        for _ in range(4):
            loss, _ = obj(model, x, y)
            loss.backward()
        assert model.samples == expected


def test_perturbed_training_inputs_stay_in_the_threat_model() -> None:
    x, y = _batch(32)
    model = Recorder(_net())
    obj = OdgQ(eps=EPS, craft_fraction=1.0, craft_every=1, fresh_domains=["fgsm", "fgsm-cw"])
    for _ in range(3):
        loss, logits = obj(model, x, y)
        loss.backward()
        assert logits.shape == (32, 4) and torch.isfinite(loss)
    assert len(model.inputs) == 3
    assert obj.radius == pytest.approx(1.25 * EPS)  # the domains live in a slightly larger ball (radius_scale)
    for xt in model.inputs:
        assert (xt - x).abs().max() <= obj.radius + 1e-6 and xt.min() >= 0 and xt.max() <= 1


@pytest.mark.parametrize("dg,weight", [("softmax", 0.5), ("vrex", 50.0)])
def test_carried_perturbation_ascends_each_samples_own_loss(dg: str, weight: float) -> None:
    """After the loop's backward, every sample's perturbation moves one step of carry_alpha along the sign of
    the gradient of *its own* cross-entropy — also where a large V-REx λ gives its domain a negative weight
    (the backward then descends that domain's loss; the carried step must not follow it)."""
    x, y = _batch(16, seed=1)
    model = Recorder(_net(1))
    obj = OdgQ(eps=EPS, craft_fraction=0.5, craft_every=1, dg=dg, dg_weight=weight, carry_alpha=0.05)
    torch.manual_seed(0)
    loss, _ = obj(model, x, y)
    loss.backward()
    obj.flush()
    x_train = model.inputs[-1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model.inner(x_train), y, reduction="sum"), x_train)
    r = obj.radius
    expected = (x_train.detach() + 0.05 * g.sign()).clamp(x - r, x + r).clamp(0, 1) - x
    stored, found = obj.bank.get(image_fingerprint(x), x)
    assert found.all()
    assert (stored - expected).abs().max() <= r / 254 + 1e-6


def test_carried_perturbation_is_used_on_the_next_visit() -> None:
    x, y = _batch(8, seed=2)
    model = Recorder(_net(2))
    obj = OdgQ(eps=EPS, craft_fraction=0.0)
    loss, _ = obj(model, x, y)
    loss.backward()
    obj.flush()
    stored, found = obj.bank.get(image_fingerprint(x), x)
    assert found.all() and stored.abs().max() > 0
    obj(model, x, y)  # the next epoch's visit trains exactly at the stored perturbation
    assert (model.inputs[1] - (x + stored).clamp(0, 1)).abs().max() <= 1e-6
    resumed = OdgQ(eps=EPS, craft_fraction=0.0)  # a resumed run continues from the saved perturbations
    resumed.load_state_dict(obj.state_dict())
    model2 = Recorder(_net(2))
    resumed(model2, x, y)
    assert torch.equal(model2.inputs[0], model.inputs[1])


def test_carried_perturbation_follows_its_image_through_crop_and_flip() -> None:
    from qrobust.data import BatchView
    from qrobust.data.transforms import CropFlip

    g = torch.Generator().manual_seed(5)
    img = torch.randint(0, 256, (2, 1, 4, 4), generator=g).float() / 255
    y = torch.tensor([1, 3])
    index = torch.tensor([7, 42])
    views = [CropFlip(torch.tensor([[0, 2], [1, 0]]), torch.tensor([False, True]), padding=1),
             CropFlip(torch.tensor([[2, 1], [0, 2]]), torch.tensor([True, False]), padding=1)]
    model = Recorder(_net(4))
    obj = OdgQ(eps=EPS, craft_fraction=0.0)
    frame = None
    for cf in views:
        x = cf.crop(cf.pad(img))
        obj.set_batch_view(BatchView(index, cf))
        loss, _ = obj(model, x, y)
        if frame is not None:  # the second visit trains at the stored frame seen through the new window
            assert (model.inputs[-1] - (x + cf.crop(frame)).clamp(0, 1)).abs().max() <= 1e-6
        loss.backward()
        obj.flush()
        frame, found = obj.bank.get(index, cf.pad(img))
        assert found.all() and frame.shape == (2, 1, 6, 6)
        # what was stored, seen through this visit's window, is the perturbation just trained at, advanced
        # one carry step (so it differs from it by at most carry_alpha and stays in the ball), up to the
        # bank's int8 resolution radius/127
        res = obj.radius / 127 + 1e-6
        trained = model.inputs[-1] - x
        step = cf.crop(frame) - trained
        assert step.abs().max() <= obj.carry_alpha + res and cf.crop(frame).abs().max() <= obj.radius + 1e-6
        assert step.abs().max() > 0


def test_fit_hands_indices_so_augmented_data_keeps_the_bank() -> None:
    from qrobust.data import ArrayDataset, dataset_info

    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (48,), generator=g), dataset_info("cifar10"), split="train")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    obj = OdgQ(eps=8 / 255)
    res = fit(net, ds, objective=obj, config=FitConfig(epochs=3, batch_size=16, lr=0.01, augment=True))
    rates = [h["odgq_bank_hit_rate"] for h in res.history]
    assert rates == [0.0, 1.0, 1.0]  # every image found again in later epochs despite crop+flip
    assert obj.bank_enabled and len(obj.bank) == 48


def test_augmented_data_switches_the_bank_off(caplog) -> None:
    model = _net()
    obj = OdgQ(eps=EPS)
    for epoch in range(2):
        obj.on_epoch_start(epoch)
        for i in range(3):
            x, y = _batch(8, seed=100 + 10 * epoch + i)  # never the same image twice
            loss, _ = obj(model, x, y)
            loss.backward()
    assert obj.bank_enabled and len(obj.bank) > 0  # the first epoch never hits: no verdict yet
    with caplog.at_level(logging.WARNING):
        obj.on_epoch_start(2)
    assert not obj.bank_enabled and len(obj.bank) == 0
    assert "switched off" in caplog.text
    loss, _ = obj(model, *_batch(8))
    assert torch.isfinite(loss)


def test_float_domain_is_crafted_on_the_float_copy() -> None:
    torch.manual_seed(0)
    q = quantize(_net(3), "w2a2")
    x, y = _batch(8, seed=3)
    ours = linf_perturb(q, x, ce_per_sample(y), eps=EPS, alpha=EPS, steps=1, start="none", float_copy=True)
    with quantization_disabled(q):
        ref = linf_perturb(q, x, ce_per_sample(y), eps=EPS, alpha=EPS, steps=1, start="none")
    on_q = linf_perturb(q, x, ce_per_sample(y), eps=EPS, alpha=EPS, steps=1, start="none")
    assert torch.equal(ours, ref) and not torch.equal(ours, on_q)
    assert all(m.quant_enabled for m in q.modules() if hasattr(m, "quant_enabled"))


def test_registered_configurable_and_validated() -> None:
    assert OBJECTIVES["odgq"] is OdgQ
    obj = make_objective("odgq", eps=8 / 255, fresh_domains="fgsm,fgsm-cw", dg="vrex", dg_weight=1.0)
    cfg = obj.config()
    assert cfg["fresh_domains"] == ["fgsm", "fgsm-cw"] and cfg["bank"] is True and cfg["name"] == "odgq"
    json.dumps(cfg)
    for bad in ({"craft_fraction": 1.5}, {"craft_every": 0}, {"fresh_domains": ["pgd"]}, {"dg": "worst"},
                {"dg": "softmax", "dg_weight": 0.0}, {"fresh_start": "zero"}, {"eps": 2.0}):
        with pytest.raises(ConfigError):
            OdgQ(**{"eps": EPS, **bad})


def test_same_seed_same_run() -> None:
    x, y = _batch(16, seed=4)
    losses = []
    for _ in range(2):
        torch.manual_seed(11)
        model, obj = _net(4), OdgQ(eps=EPS)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = []
        for _ in range(4):
            loss, _ = obj(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_odgq_trains_robust_quantized_and_binary_digits(tmp_path) -> None:
    """Same model, data, epochs and optimiser as natural QAT: ODG-Q raises PGD accuracy at w4a4 (ε = 0.2) and
    on a binary network (ε = 0.1, where binary digits networks still have some robustness to gain)."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    x, y = test.tensors(200)
    info = test.info
    out = {}
    for spec, eps, batch in (("w4a4", EPS, 64), ("w1a1,act_scheme=sign,ste=clipped,first_layer_bits=8,"
                                                  "last_layer_bits=8", 0.1, 32)):
        for name in ("ce", "odgq"):
            torch.manual_seed(0)
            model = quantize(build_model("digits_cnn", in_channels=1, input_size=8, activation="relu6",
                                         mean=list(info.mean), std=list(info.std)), spec)
            obj = make_objective(name) if name == "ce" else OdgQ(eps=eps)
            cbs = [obj.callback] if name == "odgq" else []
            fit(model, train, objective=obj, epochs=6, batch_size=batch, lr=0.05, seed=0, callbacks=cbs,
                out=tmp_path / f"{spec[:4]}-{name}")
            x_adv = PGD(model, eps=eps, alpha=eps / 4, steps=10, seed=0)(x, y)
            with torch.no_grad():
                out[spec[:4], name] = float((model(x_adv).argmax(1) == y).float().mean())
    assert out["w4a4", "ce"] < 0.1 and out["w4a4", "odgq"] > out["w4a4", "ce"] + 0.2, out
    assert out["w1a1", "odgq"] > out["w1a1", "ce"] + 0.04, out
    rec = json.loads((tmp_path / "w4a4-odgq" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["odgq_bank_hit_rate"] == 1.0 and rec["odgq_bank_size"] == len(train)
    assert rec["odgq_loss_carried"] > 0 and {"odgq_loss_fgsm", "odgq_loss_fgsm-float"} <= set(rec)


# -------------------------------------------------------------------------------------------- the study
@pytest.mark.slow
def test_study_writes_report_json_and_plots(tmp_path) -> None:
    from qrobust.studies.odgq import run_odgq_study, spec_for_bits

    assert spec_for_bits(4) == "w4a4" and spec_for_bits(1).startswith("w1a1,act_scheme=sign")
    with pytest.raises(ConfigError):
        spec_for_bits(9)
    with pytest.raises(ConfigError):
        run_odgq_study(recipes=("ce", "madry"), out=tmp_path / "bad")
    res = run_odgq_study(dataset="digits", bits=(4,), recipes=("ce", "odgq"), epochs=1, n_train=200, n_eval=32,
                         quick=True, out=tmp_path / "study")
    out = tmp_path / "study"
    assert json.loads((out / "results.json").read_text())["claims"] == json.loads(json.dumps(res["claims"]))
    for name in ("robustness_vs_cost.png", "attacks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## 4 bits" in report and "## Claims" in report and "ODG-Q" in report
    from qrobust.studies.harness import render_results

    assert render_results(out) == report and "exact McNemar" in report
    assert res["format"] == "qrobust-odgq-study/2"
    rows = {r["recipe"]: r for r in res["rows"]}
    assert set(rows) == {"ce", "odgq"} and rows["ce"]["epoch_time_ratio"] == 1.0
    for r in rows.values():
        # five white-box attacks; black-box: no other precision with one bit-width, so four
        assert r["white_box"] == ["FGSM", "PGD-10", "CW-Linf", "APGD-CE", "APGD-DLR"]
        assert r["black_box"] == ["T-float-PGD-AT", "T-MI-FGSM", "Square", "SPSA"]
        assert 0 <= r["worst_all"] <= min(r["standard"], r["worst_ten"]) <= r["clean"] <= 1
        assert all(0 <= v <= r["clean"] for v in r["attacks"].values())
    assert res["claims"]["4"]["odgq_epoch_time_ratio"] == rows["odgq"]["epoch_time_ratio"] > 0
    assert (out / "runs" / "w4a4-odgq" / "metrics.jsonl").exists()


def test_sum_with_a_penalty_keeps_the_loop_hooks_of_odgq() -> None:
    from qrobust.defenses import Objective, OrthogonalityPenalty, Sum

    obj = Sum(OdgQ(eps=EPS), OrthogonalityPenalty(1e-3))
    for hook in ("on_epoch_start", "set_batch_view", "state_dict", "load_state_dict", "callback"):
        assert getattr(obj, hook).__self__ is obj.main
    # cross-entropy has no per-batch hook of its own: a Sum over it has the protocol's no-op default
    assert Sum(make_objective("ce"), OrthogonalityPenalty(1e-3)).set_batch_view.__func__ is Objective.set_batch_view
    with pytest.raises(AttributeError):
        obj.not_a_hook  # noqa: B018
