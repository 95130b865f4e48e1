"""Attacks: the base's guarantees, each attack's math, and the strength orderings that must hold.

Models are tiny and trained here for a second or two on scikit-learn's 8×8 digits (bundled, offline), so
these tests do not depend on the data/models/quant rooms.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks import (
    APGD,
    APGDT,
    ATTACKS,
    BIM,
    CW,
    DIVA,
    FGSM,
    MIFGSM,
    PGD,
    PGDL2,
    RFGSM,
    SPSA,
    Attack,
    CWLinf,
    PGDpp,
    Square,
    Transfer,
    lp_norm,
    make_attack,
)
from qrobust.errors import ConfigError, InputError
from qrobust.quant.modes import round_q

N_TEST = 128


# ------------------------------------------------------------------------------------------- fixtures
def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float = 0.01) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400 : 1400 + N_TEST], y[1400 : 1400 + N_TEST]


@pytest.fixture(scope="module")
def mlp(digits) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return _train(m, digits[0], digits[1], steps=300)


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )
    return _train(m, digits[0], digits[1], steps=300)


class QAct2(nn.Module):
    """A 2-bit activation (levels 0, 1/3, 2/3, 1) through ``round_q``: a stand-in for a w2a2 model."""

    def __init__(self) -> None:
        super().__init__()
        self.quant_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(0.0, 1.0)
        return round_q(x * 3.0) / 3.0 if self.quant_enabled else x


@pytest.fixture(scope="module")
def qmlp(digits) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), QAct2(), nn.Linear(64, 10))
    return _train(m, digits[0], digits[1], steps=400)


def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


class ForwardCounter:
    """Counts samples through a model's forward (all passes together)."""

    def __init__(self, model: nn.Module) -> None:
        self.samples = 0
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.calls += 1
        self.samples += inp[0].shape[0]

    def close(self) -> None:
        self.handle.remove()


# --------------------------------------------------------------------------- every attack, same laws
EPS = 0.1

EPS2 = 1.0  # L2 radius on 8×8 digits
CASES: dict[str, tuple[str, dict]] = {
    "fgsm": ("Linf", {"cls": FGSM, "eps": EPS}),
    "rfgsm": ("Linf", {"cls": RFGSM, "eps": EPS, "alpha": EPS / 2}),
    "bim": ("Linf", {"cls": BIM, "eps": EPS, "alpha": EPS / 4, "steps": 10}),
    "pgd": ("Linf", {"cls": PGD, "eps": EPS, "alpha": EPS / 4, "steps": 10}),
    "pgd-restarts": ("Linf", {"cls": PGD, "eps": EPS, "alpha": EPS / 4, "steps": 5, "restarts": 3}),
    "pgd-cw": ("Linf", {"cls": PGD, "eps": EPS, "alpha": EPS / 4, "steps": 10, "loss": "cw"}),
    "mifgsm": ("Linf", {"cls": MIFGSM, "eps": EPS, "alpha": EPS / 4, "steps": 10}),
    "cwlinf": ("Linf", {"cls": CWLinf, "eps": EPS, "alpha": EPS / 4, "steps": 10}),
    "apgd-ce": ("Linf", {"cls": APGD, "eps": EPS, "n_iter": 10}),
    "apgd-dlr": ("Linf", {"cls": APGD, "eps": EPS, "n_iter": 10, "loss": "dlr", "restarts": 2}),
    "apgd-l2": ("L2", {"cls": APGD, "eps": EPS2, "norm": "L2", "n_iter": 10}),
    "apgd-t": ("Linf", {"cls": APGDT, "eps": EPS, "n_iter": 5, "n_target_classes": 3}),
    "pgdl2": ("L2", {"cls": PGDL2, "eps": EPS2, "alpha": EPS2 / 4, "steps": 10}),
    "square": ("Linf", {"cls": Square, "eps": EPS, "n_queries": 60}),
    "square-l2": ("L2", {"cls": Square, "eps": EPS2, "norm": "L2", "n_queries": 60}),
    "spsa": ("Linf", {"cls": SPSA, "eps": EPS, "steps": 8, "nb_samples": 32, "lr": 0.05}),
    "cw": ("L2", {"cls": CW, "eps": EPS2, "steps": 20, "binary_search_steps": 3, "lr": 0.05}),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded, and the CI machine is shared: restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(case: str, model: nn.Module, **over) -> Attack:
    norm, kw = CASES[case]
    kw = dict(kw)
    cls = kw.pop("cls")
    kw.update(over)
    return cls(model, **kw)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bounds_box_and_accuracy(case, early_stop, cnn, digits):
    x, y = digits[2], digits[3]
    atk = build(case, cnn, seed=0, early_stop=early_stop)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    norm = CASES[case][0]
    assert float(lp_norm(x_adv - x, norm).max()) <= atk.eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    clean, robust = acc(cnn, x, y), acc(cnn, x_adv, y)
    assert clean > 0.85  # the fixture model is a real classifier
    if early_stop:
        assert robust <= clean  # structural: misclassified samples are returned unchanged
        assert not bool((correct(cnn, x_adv, y) & ~correct(cnn, x, y)).any())
    assert robust < clean - 0.1  # and the attack does something at this ε


@pytest.mark.parametrize("case", sorted(CASES))
def test_seeds(case, cnn, digits):
    x, y = digits[2][:64], digits[3][:64]
    a1 = build(case, cnn, seed=3, early_stop=False)(x, y)
    a2 = build(case, cnn, seed=3, early_stop=False)(x, y)
    assert torch.equal(a1, a2)
    atk = build(case, cnn, seed=4, early_stop=False)
    a3 = atk(x, y)
    assert torch.equal(a3, atk(x, y))  # a call is a pure function of its inputs once seeded
    if atk.randomized:
        assert not torch.equal(a1, a3)
    else:
        assert torch.equal(a1, a3)


def test_global_rng_untouched(cnn, digits):
    x, y = digits[2][:16], digits[3][:16]
    state = torch.get_rng_state()
    PGD(cnn, eps=EPS, alpha=0.02, steps=3, seed=1)(x, y)
    PGD(cnn, eps=EPS, alpha=0.02, steps=3)(x, y)  # seed=None: OS entropy, still not the global RNG
    assert torch.equal(state, torch.get_rng_state())


def test_dtype_roundtrip_float64(cnn, digits):
    x, y = digits[2][:32].double(), digits[3][:32]
    x_adv = PGD(cnn, eps=EPS, alpha=0.03, steps=3, seed=0)(x, y)
    assert x_adv.dtype == torch.float64
    assert float((x_adv - x).abs().max()) <= EPS
    x_adv32 = PGD(cnn, eps=EPS, alpha=0.03, steps=3, seed=0)(x.float(), y)
    assert torch.allclose(x_adv.float(), x_adv32, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_cpu_input(cnn, digits):
    import copy

    model = copy.deepcopy(cnn).cuda()
    x, y = digits[2][:32], digits[3][:32]
    x_adv = PGD(model, eps=EPS, alpha=0.03, steps=3, seed=0)(x, y)
    assert x_adv.device == x.device and float((x_adv - x).abs().max()) <= EPS + 1e-6


def test_empty_batch(cnn):
    x = torch.zeros(0, 1, 8, 8)
    assert PGD(cnn)(x, torch.zeros(0, dtype=torch.long)).shape == x.shape


# ------------------------------------------------------------------------------------- FGSM, exactly
def test_fgsm_linear_two_class_is_exact_and_optimal():
    torch.manual_seed(1)
    lin = nn.Linear(20, 2)
    model = nn.Sequential(nn.Flatten(), lin)
    eps = 0.05
    x = 0.1 + 0.8 * torch.rand(32, 20)  # far from the box edges: no clipping
    y = torch.randint(0, 2, (32,))
    x_adv = FGSM(model, eps=eps, early_stop=False)(x, y)
    w = lin.weight.detach()
    w_y, w_o = w[y], w[1 - y]
    expected = x - eps * torch.sign(w_y - w_o)
    assert torch.allclose(x_adv, expected, atol=1e-6)

    def margin(z: torch.Tensor) -> torch.Tensor:  # logit of the label minus the other logit
        with torch.no_grad():
            out = model(z)
        return out.gather(1, y[:, None]).squeeze(1) - out.gather(1, (1 - y)[:, None]).squeeze(1)

    # the optimum of a linear margin over the L∞ ball: it drops by exactly ε‖w_y − w_o‖₁
    drop = eps * (w_y - w_o).abs().sum(1)
    assert torch.allclose(margin(x) - margin(x_adv), drop, atol=1e-4)
    # and no random vertex of the ball does better
    for _ in range(20):
        s = torch.randint(0, 2, x.shape).float() * 2 - 1
        assert bool((margin(x + eps * s) >= margin(x_adv) - 1e-4).all())


def test_fgsm_targeted_moves_towards_target():
    torch.manual_seed(2)
    lin = nn.Linear(10, 3)
    model = nn.Sequential(nn.Flatten(), lin)
    x = 0.2 + 0.6 * torch.rand(16, 10)
    y = torch.zeros(16, dtype=torch.long)
    t = torch.full((16,), 2, dtype=torch.long)
    x_adv = FGSM(model, eps=0.1, early_stop=False)(x, y, target=t)
    with torch.no_grad():
        lp0 = F.log_softmax(model(x), 1)[:, 2]
        lp1 = F.log_softmax(model(x_adv), 1)[:, 2]
    assert bool((lp1 > lp0).all())


# -------------------------------------------------------------------------------------- PGD orderings
def test_pgd_matches_reference_iteration(mlp, digits):
    """PGD with early_stop=False is torchattacks' PGD: uniform start, α·sign steps, ball then box."""
    x, y = digits[2][:32], digits[3][:32]
    eps, alpha, steps = 0.1, 0.02, 4
    x_adv = PGD(mlp, eps=eps, alpha=alpha, steps=steps, seed=5, early_stop=False)(x, y)
    g = torch.Generator().manual_seed(5)
    ref = (x + (torch.rand(x.shape, generator=g) * 2 * eps - eps)).clamp(0, 1)
    for _ in range(steps):
        ref = ref.clone().requires_grad_(True)
        loss = F.cross_entropy(mlp(ref), y)
        (grad,) = torch.autograd.grad(loss, ref)
        ref = ref.detach() + alpha * grad.sign()
        ref = (x + (ref - x).clamp(-eps, eps)).clamp(0, 1)
    assert torch.allclose(x_adv, ref, atol=1e-6)


def test_pgd_monotone_in_eps(mlp, digits):
    x, y = digits[2], digits[3]
    accs = [acc(mlp, PGD(mlp, eps=e, alpha=e / 4 if e else 0.01, steps=10, seed=0)(x, y), y)
            for e in (0.0, 0.03, 0.06, 0.1, 0.15, 0.25)]
    assert accs[0] == acc(mlp, x, y)
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < 0.1


def test_pgd_more_steps_never_helps_the_model(mlp, digits):
    """Same seed ⇒ the trajectories share their prefix, and early stopping freezes successes: the
    set of robust samples can only shrink as steps grow."""
    x, y = digits[2], digits[3]
    robust = [correct(mlp, PGD(mlp, eps=0.06, alpha=0.01, steps=s, seed=0)(x, y), y) for s in (1, 3, 8, 20)]
    for a, b in zip(robust, robust[1:]):
        assert not bool((b & ~a).any())
    assert int(robust[-1].sum()) < int(robust[0].sum())


def test_early_stop_same_robust_set_fewer_forwards(mlp, digits):
    """Without a random start the early-stopped run is the full run frozen at first success: a sample
    is robust under early stopping iff no iterate of the full run fooled it."""
    x, y = digits[2], digits[3]
    eps, alpha, steps = 0.12, 0.015, 12
    counter = ForwardCounter(mlp)
    es = PGD(mlp, eps=eps, alpha=alpha, steps=steps, random_start=False, early_stop=True)
    robust_es = correct(mlp, es(x, y), y)
    n_es = counter.samples
    counter.samples = 0
    full = PGD(mlp, eps=eps, alpha=alpha, steps=steps, random_start=False, early_stop=False)
    full(x, y)
    n_full = counter.samples
    counter.close()
    never_fooled = correct(mlp, x, y)
    for k in range(1, steps + 1):
        xk = PGD(mlp, eps=eps, alpha=alpha, steps=k, random_start=False, early_stop=False)(x, y)
        never_fooled &= correct(mlp, xk, y)
    assert torch.equal(robust_es, never_fooled)
    assert 0 < int(robust_es.sum()) < int(correct(mlp, x, y).sum())  # the test is not vacuous
    assert n_full == (steps + 1) * x.shape[0]  # clean pass + one gradient pass per step
    assert n_es < 0.75 * n_full


def test_restarts_only_on_unfooled_and_never_weaker(mlp, digits):
    x, y = digits[2], digits[3]
    one = correct(mlp, PGD(mlp, eps=0.12, alpha=0.02, steps=5, seed=0)(x, y), y)
    counter = ForwardCounter(mlp)
    three = correct(mlp, PGD(mlp, eps=0.12, alpha=0.02, steps=5, restarts=3, seed=0)(x, y), y)
    counter.close()
    assert not bool((three & ~one).any())  # the first restart is the single run; later ones only add
    # clean pass + the first restart's 5 gradient passes and final check, then two more restarts that
    # run only on the samples the first left unfooled
    n = x.shape[0]
    assert counter.samples <= n + 6 * n + 2 * 6 * int(one.sum())
    assert int(one.sum()) < 0.7 * n


def test_pgd_targeted_beats_chance(mlp, digits):
    x, y = digits[2], digits[3]
    t = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(0))) % 10
    x_adv = PGD(mlp, eps=0.2, alpha=0.025, steps=12, seed=0)(x, y, target=t)
    with torch.no_grad():
        hit = (mlp(x_adv).argmax(1) == t).float().mean().item()
    assert hit > 0.5  # chance is 1/10
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    # automatic targets: random other class, from the attack's own generator
    atk = PGD(mlp, eps=0.2, alpha=0.025, steps=5, seed=0, targeted="random")
    assert torch.equal(atk(x, y), atk(x, y))


def test_targeted_true_requires_target(cnn, digits):
    atk = PGD(cnn, eps=0.1, targeted=True)
    with pytest.raises(InputError, match="target"):
        atk(digits[2][:4], digits[3][:4])


# --------------------------------------------------------------------------------- the model's state
class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_train_mode_model_attacked_in_eval_and_restored(digits):
    torch.manual_seed(0)
    model = _Noisy()
    _train(model, digits[0], digits[1], steps=50)
    model.train()
    model.net[4].eval()  # a mixed state must come back exactly as it was
    model.net[1].bias.requires_grad_(False)
    before_modes = [m.training for m in model.modules()]
    before_grads = [p.requires_grad for p in model.parameters()]
    bn_mean = model.net[2].running_mean.clone()
    x, y = digits[2][:64], digits[3][:64]
    a1 = PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False, early_stop=False)(x, y)
    a2 = PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False, early_stop=False)(x, y)
    assert torch.equal(a1, a2)  # dropout off, BN on running statistics: deterministic
    assert [m.training for m in model.modules()] == before_modes
    assert [p.requires_grad for p in model.parameters()] == before_grads
    assert torch.equal(model.net[2].running_mean, bn_mean)
    model.eval()
    a3 = PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False, early_stop=False)(x, y)
    assert torch.equal(a1, a3)

    class Spy(nn.Module):  # the attack really sees eval mode and frozen weights during its passes
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.seen: list[tuple[bool, bool]] = []

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            self.seen.append((self.training, any(p.requires_grad for p in self.parameters())))
            return self.inner(z)

    spy = Spy(model).train()
    PGD(spy, eps=0.1, steps=2)(x, y)
    assert spy.seen and all(s == (False, False) for s in spy.seen)
    assert spy.training and [p.requires_grad for p in spy.parameters()] == before_grads


def test_state_restored_when_the_call_raises(mlp, digits):
    mlp.train()
    try:
        with pytest.raises(InputError, match=r"\[0, 10\)"):
            PGD(mlp)(digits[2][:4], torch.tensor([0, 1, 2, 10]))
        assert mlp.training and all(p.requires_grad for p in mlp.parameters())
    finally:
        mlp.eval()


# ------------------------------------------------------------------------------ errors: what and where
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": 1.5}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1e-3}, "alpha"),
        ({"restarts": 0}, "restarts"),
        ({"gradients": "straight-through"}, "gradients"),
        ({"seed": -1}, "seed"),
        ({"eot_samples": 0}, "eot_samples"),
        ({"loss": "hinge"}, "loss"),
        ({"targeted": "sometimes"}, "targeted"),
        ({"surrogate": nn.Linear(2, 2)}, "surrogate"),
        ({"random_start": "yes"}, "random_start"),
    ],
)
def test_config_errors(kwargs, match, mlp):
    with pytest.raises(ConfigError, match=match):
        PGD(mlp, **kwargs)


def test_fgsm_config_errors(mlp):
    with pytest.raises(ConfigError, match="eps"):
        FGSM(mlp, eps=-0.01)
    with pytest.raises(ConfigError, match="fraction"):
        FGSM(mlp, eps=8)
    with pytest.raises(ConfigError, match="Module"):
        FGSM(lambda z: z, eps=0.1)
    with pytest.raises(TypeError):
        FGSM(mlp, 0.1)  # hyperparameters are keyword-only


def test_input_errors(mlp, digits):
    x, y = digits[2][:8], digits[3][:8]
    atk = PGD(mlp, eps=0.1)
    bad = [
        ((x * 2, y), "\\[0, 1\\]"),
        ((x - 0.5, y), "\\[0, 1\\]"),
        ((torch.where(x > 0.5, float("nan"), x), y), "NaN"),
        ((x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 10])), "\\[0, 10\\)"),
        ((x, torch.tensor([0, 1, 2, 3, 4, 5, 6, -1])), "\\[0, 10\\)"),
        ((x, y[:7]), "7 labels"),
        ((x[0, 0, 0], y[:1]), "batch"),
        ((x, y[:, None]), "shape"),
        ((x, y.float()), "integer"),
        (((x * 255).to(torch.uint8), y), "float"),
        ((x.numpy(), y), "Tensor"),
    ]
    for args, match in bad:
        with pytest.raises(InputError, match=match):
            atk(*args)
    with pytest.raises(InputError, match="target"):
        atk(x, y, target=torch.full((8,), 11))
    assert atk(x, y.int()).shape == x.shape  # int32 labels are fine


def test_model_output_checked(digits):
    with pytest.raises(InputError, match="logits"):
        FGSM(nn.Flatten(0), eps=0.1)(digits[2][:4], digits[3][:4])


def test_call_is_final():
    with pytest.raises(TypeError, match="final"):

        class Bad(Attack):  # noqa: F841
            def __call__(self, x, y, target=None):
                return x

            def perturb(self, x, y):
                return x


def test_nonfinite_output_replaced_and_projection_structural(mlp, digits):
    class Wild(Attack):
        def __init__(self, model, **kw):
            super().__init__(model, eps=0.05, norm="Linf", **kw)

        def perturb(self, x, y):
            out = x + 10.0 * self.randn(x.shape)
            out[0] = float("nan")
            return out

    x, y = digits[2][:16], digits[3][:16]
    x_adv = Wild(mlp, seed=0, early_stop=False)(x, y)
    assert torch.equal(x_adv[0], x[0])
    assert float((x_adv - x).abs().max()) <= 0.05
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


# ------------------------------------------------------------------------------- gradient modes & EOT
def test_native_gradients_are_masked_ste_is_not(qmlp, digits):
    x, y = digits[2], digits[3]
    clean = correct(qmlp, x, y)
    assert clean.float().mean() > 0.8
    native = PGD(qmlp, eps=0.1, alpha=0.02, steps=10, random_start=False, gradients="native")
    ste = PGD(qmlp, eps=0.1, alpha=0.02, steps=10, random_start=False, gradients="ste")
    surrogate = PGD(qmlp, eps=0.1, alpha=0.02, steps=10, random_start=False, gradients="surrogate")
    x_nat = native(x, y)
    assert torch.equal(x_nat, x)  # zero gradient everywhere: sign(0) = 0, no step is ever taken
    assert native.last_stats["zero_gradients"] == native.last_stats["gradients"] > 0  # and it is reported
    r_ste = correct(qmlp, ste(x, y), y).float().mean()
    r_sur = correct(qmlp, surrogate(x, y), y).float().mean()
    assert r_ste < clean.float().mean() - 0.3
    assert r_sur < clean.float().mean() - 0.3
    assert surrogate.last_stats["forward_passes"] > ste.last_stats["forward_passes"]  # grads + real checks
    assert ste.last_stats["zero_gradients"] < ste.last_stats["gradients"] // 10
    # with a random start the native attack finds only what the noise finds
    r_nat = correct(qmlp, PGD(qmlp, eps=0.1, alpha=0.02, steps=10, seed=0, gradients="native")(x, y), y)
    r_ste = correct(qmlp, PGD(qmlp, eps=0.1, alpha=0.02, steps=10, seed=0, gradients="ste")(x, y), y)
    assert r_nat.float().mean() > r_ste.float().mean() + 0.3


def test_surrogate_success_is_judged_on_the_target(mlp, qmlp, digits):
    """Gradients from a float surrogate, but early stopping must use the *target's* verdict: the
    early-stopped run is robust exactly where no iterate of the full run fooled the target."""
    x, y = digits[2], digits[3]
    kw = {"eps": 0.12, "alpha": 0.02, "random_start": False}
    sur = {"gradients": "surrogate", "surrogate": mlp}
    robust_es = correct(qmlp, PGD(qmlp, steps=6, **kw, **sur)(x, y), y)
    never = correct(qmlp, x, y)
    for k in range(1, 7):
        never &= correct(qmlp, PGD(qmlp, steps=k, early_stop=False, **kw, **sur)(x, y), y)
    assert torch.equal(robust_es, never)
    # the surrogate's own verdicts differ from the target's somewhere, so the check above has teeth
    on_src = PGD(mlp, steps=6, **kw)(x, y)
    assert bool((correct(mlp, on_src, y) != correct(qmlp, on_src, y)).any())


def test_least_likely_targets(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    with torch.no_grad():
        ll = mlp(x).argmin(1)
    x_adv = PGD(mlp, eps=0.25, alpha=0.03, steps=15, seed=0, targeted="least-likely")(x, y)
    with torch.no_grad():
        assert (mlp(x_adv).argmax(1) == ll).float().mean() > 0.4


def test_surrogate_model_gives_the_gradients_target_judges(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    same = PGD(mlp, eps=0.1, alpha=0.02, steps=5, seed=0, gradients="surrogate", surrogate=mlp)(x, y)
    plain = PGD(mlp, eps=0.1, alpha=0.02, steps=5, seed=0)(x, y)
    assert torch.equal(same, plain)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(flat[1].weight)  # a surrogate with no gradient at all: PGD cannot move
    out = PGD(mlp, eps=0.1, alpha=0.02, steps=5, random_start=False, gradients="surrogate",
              surrogate=flat)(x, y)
    assert torch.equal(out, x)


def test_eot_averages_passes(mlp, digits):
    x, y = digits[2][:32], digits[3][:32]
    one = PGD(mlp, eps=0.1, alpha=0.02, steps=3, seed=0, early_stop=False)
    three = PGD(mlp, eps=0.1, alpha=0.02, steps=3, seed=0, early_stop=False, eot_samples=3)
    assert torch.allclose(one(x, y), three(x, y), atol=1e-6)  # deterministic model: same gradient
    assert three.last_stats["forward_passes"] == 3 * one.last_stats["forward_passes"]


def test_config_is_plain_data(mlp):
    import json

    cfg = PGD(mlp, eps=8 / 255, steps=7).config()
    json.dumps(cfg)
    assert cfg["attack"] == "pgd" and cfg["steps"] == 7 and cfg["norm"] == "Linf"
    assert math.isclose(cfg["eps"], 8 / 255)


# ------------------------------------------------------------------------------- the other attacks
def _binary_linear(seed: int, d: int = 20, bias: float = 0.0) -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(seed)
    lin = nn.Linear(d, 2)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([bias, -bias]))
    return nn.Sequential(nn.Flatten(), lin), lin


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_apgd_checkpoints_follow_the_paper():
    from qrobust.attacks.apgd import apgd_checkpoints

    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:  # p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    for n_iter in (100, 200, 1000):
        assert apgd_checkpoints(n_iter) == [math.ceil(pj * n_iter - 1e-6) for pj in p[1:]]
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for n_iter in (1, 5, 10, 37):  # small budgets: integer gaps, at least one iteration each
        got = apgd_checkpoints(n_iter)
        assert got[0] == max(int(0.22 * n_iter), 1) and got[-1] <= n_iter
        assert all(b > a for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_apgd_and_pgdl2_reach_the_linear_optimum(norm):
    """On a linear binary model that cannot be fooled, the loss maximiser over the ball is known:
    the vertex x − ε·sign(w_y − w_o) in L∞, x − ε·(w_y − w_o)/‖w_y − w_o‖₂ in L2."""
    model, lin = _binary_linear(3, bias=3.0)
    x = 0.3 + 0.4 * torch.rand(16, 20)
    y = torch.zeros(16, dtype=torch.long)
    eps = 0.05 if norm == "Linf" else 0.1
    dw = lin.weight[0].detach() - lin.weight[1].detach()
    opt = x - eps * (dw.sign() if norm == "Linf" else dw / dw.norm())
    assert bool(correct(model, opt, y).all())  # no sample can be fooled: the loss maximiser is returned
    best = _ce(model, opt, y)
    found = APGD(model, eps=eps, norm=norm, n_iter=30, seed=0, early_stop=False)(x, y)
    assert torch.allclose(_ce(model, found, y), best, rtol=1e-4)
    assert torch.allclose(found, opt, atol=3e-3 if norm == "L2" else 1e-6)
    if norm == "L2":
        found = PGDL2(model, eps=eps, alpha=eps / 4, steps=40, seed=0, early_stop=False)(x, y)
        assert torch.allclose(_ce(model, found, y), best, rtol=1e-4)
        assert torch.allclose(found, opt, atol=1e-3)


@pytest.mark.parametrize("name", ["mlp", "qmlp"])
def test_apgd_ce_at_least_as_strong_as_pgd20(name, request, digits):
    model = request.getfixturevalue(name)
    x, y = digits[2], digits[3]
    pgd = apgd = 0
    for e in (0.08, 0.1, 0.12):
        pgd += int(correct(model, PGD(model, eps=e, alpha=e / 4, steps=20, seed=0)(x, y), y).sum())
        apgd += int(correct(model, APGD(model, eps=e, n_iter=50, seed=0)(x, y), y).sum())
    assert apgd <= pgd


def test_apgd_dlr_needs_three_classes_apgdt_four(digits):
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y = digits[2][:8], digits[3][:8] % 3
    with pytest.raises(ConfigError, match="3 classes"):
        APGD(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), loss="dlr")(x, y % 2)
    with pytest.raises(ConfigError, match="4 classes"):
        APGDT(three, n_iter=2)(x, y)
    assert APGDT(three, n_iter=2, loss="ce", seed=0)(x, y).shape == x.shape
    with pytest.raises(ConfigError, match="target"):
        APGDT(three, n_iter=2, loss="ce")(x, y, target=(y + 1) % 3)
    with pytest.raises(ConfigError, match="targets"):
        APGDT(three, targeted="random")


def test_apgdt_finds_what_apgd_dlr_finds_or_more(cnn, digits):
    x, y = digits[2], digits[3]
    dlr = correct(cnn, APGD(cnn, eps=0.1, n_iter=20, loss="dlr", seed=0)(x, y), y)
    t = correct(cnn, APGDT(cnn, eps=0.1, n_iter=20, n_target_classes=3, seed=0)(x, y), y)
    assert int(t.sum()) <= int(dlr.sum()) + 2
    assert int(t.sum()) < int(correct(cnn, x, y).sum()) - 20


def test_bim_is_pgd_without_random_start_and_mifgsm_without_momentum_is_bim(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    kw = {"eps": 0.1, "alpha": 0.02, "steps": 6, "early_stop": False}
    bim = BIM(mlp, **kw)(x, y)
    assert torch.equal(bim, PGD(mlp, random_start=False, **kw)(x, y))
    assert torch.equal(bim, MIFGSM(mlp, decay=0.0, **kw)(x, y))
    assert not torch.equal(bim, MIFGSM(mlp, decay=1.0, **kw)(x, y))


def test_rfgsm_step_structure(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    eps, alpha = 0.1, 0.04
    x_adv = RFGSM(mlp, eps=eps, alpha=alpha, seed=0, early_stop=False)(x, y)
    d = (x_adv - x).abs()
    inside = (x_adv > 0) & (x_adv < 1) & (x > alpha) & (x < 1 - alpha)  # neither step clipped
    # ±α then ±(ε − α): each coordinate moved by ε or by |2α − ε|, or not at all where the gradient is 0
    ok = (d - eps).abs().lt(1e-6) | (d - abs(2 * alpha - eps)).abs().lt(1e-6) | (d - alpha).abs().lt(1e-6)
    assert bool(ok[inside].all())
    assert float((d[inside] - eps).abs().lt(1e-6).float().mean()) > 0.3
    with pytest.raises(ConfigError, match="alpha < eps"):
        RFGSM(mlp, eps=0.1, alpha=0.1)


def test_square_linf_lives_on_the_vertices_and_counts_queries(cnn, digits):
    x, y = digits[2], digits[3]
    atk = Square(cnn, eps=0.1, n_queries=80, seed=0)
    x_adv = atk(x, y)
    d = (x_adv - x).abs()
    at_vertex = (d - 0.1).abs().lt(1e-6) | (x_adv == 0) | (x_adv == 1)
    attacked = correct(cnn, x, y)
    assert bool(at_vertex[attacked].all())
    q = atk.last_queries
    assert q.shape == (x.shape[0],) and q.dtype == torch.long
    assert int(q.max()) <= 80 and bool((q[~attacked] == 0).all()) and bool((q[attacked] >= 1).all())
    fooled = attacked & ~correct(cnn, x_adv, y)
    assert bool((q[attacked & ~fooled] == 80).all())  # the robust ones used the whole budget
    assert float(q[fooled].float().mean()) < 80
    assert acc(cnn, x_adv, y) < acc(cnn, x, y) - 0.2


@pytest.mark.parametrize("channels", [1, 3])
def test_square_linf_never_queries_a_proposal_that_changes_nothing(channels):
    """On a model whose margin never moves, no proposal is accepted, so each sample's point stays its start:
    every query must differ from it. On 4×4 images late windows are one pixel, and a random sign repeats the
    current corner half the time (one channel), which a query must not be spent on."""

    class Flat(nn.Module):  # the same logits everywhere: nothing improves, nothing succeeds
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x.detach().clone())
            return torch.tensor([[5.0, 0.0]]).expand(x.shape[0], 2) + 0 * x.flatten(1)[:, :1]

    model = Flat()
    x = torch.rand(16, channels, 4, 4)
    atk = Square(model, eps=0.1, n_queries=300, seed=0)
    atk(x, torch.zeros(16, dtype=torch.long))
    start, queries = model.seen[1], torch.stack(model.seen[2:])  # [0] is the clean check
    assert queries.shape[0] == 299
    same = (queries == start).flatten(2).all(dim=2)
    assert int(same.sum()) == 0, f"{int(same.sum())} of {same.numel()} queries repeated the current point"


def test_square_l2_spends_the_whole_radius(cnn, digits):
    x, y = digits[2][:64], digits[3][:64]
    x_adv = Square(cnn, eps=1.0, norm="L2", n_queries=40, seed=0)(x, y)
    n = lp_norm(x_adv - x, "L2")
    attacked = correct(cnn, x, y)
    assert float(n.max()) <= 1.0 + 1e-6
    assert float(n[attacked].min()) > 0.5  # normalised to ε, then only the box clips it
    with pytest.raises(InputError, match="N×C×H×W"):
        Square(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), eps=0.1)(x.flatten(1), y)


def test_square_pattern_shape():
    from qrobust.attacks.square import square_pattern

    for s in (1, 3, 5, 8):
        p = square_pattern(s)
        assert p.shape == (s, s) and math.isclose(float(p.norm()), 1.0, rel_tol=1e-5)
    p = square_pattern(7)
    assert bool((p[:3] > 0).all()) and bool((p[3:] < 0).all())
    assert float(p[1, 3]) == float(p[:3].max())  # the bump peaks at the centre of its half


def test_spsa_estimates_the_gradient_sign():
    """On a linear model finite differences are exact, so the SPSA estimate is (v vᵀ)-averaged ∇:
    with many directions its sign matches FGSM's optimal step on almost every coordinate."""
    model, lin = _binary_linear(4)
    x = 0.3 + 0.4 * torch.rand(8, 20)
    y = torch.zeros(8, dtype=torch.long)
    atk = SPSA(model, eps=0.05, steps=1, nb_samples=1024, delta=0.01, lr=0.05, update="sign",
               random_start=False, early_stop=False, seed=0)
    x_adv = atk(x, y)
    dw = lin.weight[0].detach() - lin.weight[1].detach()
    agree = (torch.sign(x_adv - x) == -torch.sign(dw)).float().mean()
    assert agree > 0.9
    assert int(atk.last_queries.max()) == 1024


def test_spsa_queries_and_strength(mlp, digits):
    x, y = digits[2], digits[3]
    atk = SPSA(mlp, eps=0.12, steps=10, nb_samples=32, lr=0.05, seed=0)
    x_adv = atk(x, y)
    attacked = correct(mlp, x, y)
    assert acc(mlp, x_adv, y) < acc(mlp, x, y) - 0.2
    q = atk.last_queries
    assert bool((q[~attacked] == 0).all()) and int(q.max()) <= 1 + 10 * 33
    with pytest.raises(ConfigError, match="even"):
        SPSA(mlp, nb_samples=33)


def test_cw_finds_the_minimal_l2_distance_of_a_linear_model():
    model, lin = _binary_linear(5)
    x = 0.4 + 0.2 * torch.rand(16, 20)
    with torch.no_grad():
        y = model(x).argmax(1)
        z = model(x)
    w = lin.weight.detach()
    dw = w[y] - w[1 - y]
    margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)
    dist = margin / dw.norm(dim=1)  # no adversarial can be closer
    closest = x - dist[:, None] * dw / dw.norm(dim=1, keepdim=True)
    assert bool(((closest > 0) & (closest < 1)).all())  # and the box does not get in the way
    atk = CW(model, c=1.0, steps=300, lr=0.01, binary_search_steps=8)
    x_adv = atk(x, y)
    norms = atk.last_norms
    assert bool(torch.isfinite(norms).all())
    assert bool((norms >= dist - 1e-4).all())
    assert bool((norms <= dist * 1.1 + 1e-3).all())
    assert torch.allclose(lp_norm(x_adv - x, "L2"), norms, atol=1e-5)
    assert not bool(correct(model, x_adv, y).any())


def test_cw_with_eps_keeps_only_perturbations_inside(cnn, digits):
    x, y = digits[2][:64], digits[3][:64]
    free = CW(cnn, steps=30, binary_search_steps=3, lr=0.05)
    x_free = free(x, y)
    norms = free.last_norms
    eps = float(norms[torch.isfinite(norms)].median())
    bound = CW(cnn, eps=eps, steps=30, binary_search_steps=3, lr=0.05, early_stop=False)
    x_b = bound(x, y)
    assert float(lp_norm(x_b - x, "L2").max()) <= eps + 1e-6
    outside = bound.last_norms > eps
    assert torch.equal(x_b[outside], x[outside])
    assert bool(outside.any()) and not bool(outside.all())
    assert float(lp_norm(x_free - x, "L2").max()) > eps  # without eps nothing is cut


@pytest.mark.parametrize(
    "case, eps",
    [("pgd", 0.2), ("mifgsm", 0.2), ("apgd-ce", 0.2), ("apgd-dlr", 0.2), ("square", 0.25), ("cw", None),
     ("fgsm", 0.25)],
)
def test_targeted_attacks_reach_the_target(case, eps, mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    t = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(1))) % 10
    over = {"seed": 0}
    if eps is not None:
        over["eps"] = eps
        if "alpha" in CASES[case][1]:
            over["alpha"] = eps / 4
    else:
        over["eps"] = None
    if case == "square":
        over["n_queries"] = 150
    atk = build(case, mlp, **over)
    x_adv = atk(x, y, target=t)
    with torch.no_grad():
        hit = (mlp(x_adv).argmax(1) == t).float().mean().item()
    assert hit > (0.2 if case == "fgsm" else 0.4)  # chance: 0.1


def test_transfer_from_itself_is_the_source_attack(mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    kw = {"eps": 0.1, "alpha": 0.02, "steps": 5, "random_start": False}
    tr = Transfer(mlp, source=mlp, attack="pgd", **kw)
    assert tr.eps == 0.1 and tr.norm == "Linf" and tr.source_attack.early_stop is False
    out = tr(x, y)
    ref = PGD(mlp, early_stop=False, **kw)(x, y)
    ok = correct(mlp, x, y)
    assert torch.equal(out[ok], ref[ok]) and torch.equal(out[~ok], x[~ok])
    same = Transfer(mlp, source_attack=PGD(mlp, early_stop=False, **kw))(x, y)
    assert torch.equal(same, out)


def test_transfer_from_float_parent_fools_the_quantized_model(mlp, qmlp, digits):
    x, y = digits[2], digits[3]
    tr = Transfer(qmlp, source=mlp, attack=PGD, eps=0.12, alpha=0.02, steps=10, seed=0)
    counter = ForwardCounter(qmlp)
    x_adv = tr(x, y)
    counter.close()
    assert counter.samples == x.shape[0]  # the target is only asked for its clean predictions
    assert acc(qmlp, x_adv, y) < acc(qmlp, x, y) - 0.2
    with pytest.raises(ConfigError, match="not both"):
        Transfer(qmlp, source=mlp, source_attack=PGD(mlp))
    with pytest.raises(ConfigError, match="source"):
        Transfer(qmlp, attack="pgd")


@pytest.mark.parametrize("case", ["bim", "pgd", "mifgsm", "apgd-ce", "apgd-l2", "spsa", "cwlinf"])
def test_early_stopping_costs_less_and_loses_nothing(case, mlp, digits):
    x, y = digits[2], digits[3]
    es = build(case, mlp, seed=0, early_stop=True)
    full = build(case, mlp, seed=0, early_stop=False)
    r_es = correct(mlp, es(x, y), y)
    r_full = correct(mlp, full(x, y), y)
    assert es.last_stats["forward_samples"] < full.last_stats["forward_samples"]
    if case in ("bim", "mifgsm"):  # deterministic trajectories: freezing at success only helps
        assert not bool((r_es & ~r_full).any())
    assert int(r_es.sum()) <= int(r_full.sum()) + 2


# ------------------------------------------------------------------------------------- the registry
def test_registry_and_factory(cnn, mlp, digits):
    assert set(ATTACKS) == {"fgsm", "rfgsm", "bim", "pgd", "pgdl2", "mifgsm", "cw", "cwlinf", "apgd-ce",
                            "apgd-dlr", "apgd-t", "square", "square-l2", "spsa", "transfer", "pgd++", "diva"}
    x, y = digits[2][:8], digits[3][:8]
    for name in ATTACKS:
        extra = {"source": mlp} if name == "transfer" else {"twin": mlp} if name == "diva" else {}
        atk = make_attack(name.upper(), cnn, **extra)
        assert isinstance(atk, ATTACKS[name]) and atk.name == name
        assert atk.config()["attack"] == name
    assert make_attack("apgd-dlr", cnn).loss == "dlr"
    assert make_attack("square-l2", cnn, eps=0.5).norm == "L2"
    assert make_attack("pgd", cnn, eps=0.05, steps=2, seed=0)(x, y).shape == x.shape
    with pytest.raises(ConfigError, match="available"):
        make_attack("deepfool", cnn)
    with pytest.raises(ConfigError, match="implies"):
        make_attack("apgd-ce", cnn, loss="dlr")


# ----------------------------------------------------------------------------- what each attack declares
#: class → (black_box, single_step, supports_targeted, diagnostic_role, steps_in_label), each declared in the
#: attack's own file (an attack derived from another must not inherit a fact by accident: BIM is a PGD
#: without the PGD reference role, CWLinf a PGD whose label does not name its steps)
FACTS: dict[type, tuple[bool, bool, bool, str | None, bool]] = {
    FGSM: (False, True, True, "fgsm", False),
    RFGSM: (False, True, True, None, False),
    BIM: (False, False, True, None, True),
    PGD: (False, False, True, "pgd", True),
    PGDL2: (False, False, True, "pgd", True),
    MIFGSM: (False, False, True, None, True),
    CW: (False, False, True, None, False),
    CWLinf: (False, False, True, None, False),
    APGD: (False, False, True, None, False),
    APGDT: (False, False, False, None, False),
    Square: (True, False, True, None, False),
    SPSA: (True, False, True, None, False),
    Transfer: (True, False, True, None, False),
    PGDpp: (False, False, True, None, True),
    DIVA: (True, False, False, None, True),
}
FACT_NAMES = ("black_box", "single_step", "supports_targeted", "diagnostic_role", "steps_in_label")
#: registry name → whether an attack built with the defaults draws random numbers
RANDOMIZED = {"fgsm": False, "rfgsm": True, "bim": False, "pgd": True, "pgdl2": True, "mifgsm": False,
              "cw": False, "cwlinf": True, "apgd-ce": True, "apgd-dlr": True, "apgd-t": True, "square": True,
              "square-l2": True, "spsa": True, "transfer": True, "pgd++": True, "diva": False}


def test_every_registered_attack_declares_its_class_facts():
    assert set(ATTACKS.values()) == set(FACTS)
    for cls, expected in FACTS.items():
        for fact, want in zip(FACT_NAMES, expected):
            assert fact in vars(cls), f"{cls.__name__}.{fact} is inherited, not declared in its own file"
            assert getattr(cls, fact) == want, (cls.__name__, fact)
    assert all(Attack.__dict__[f] in (False, True, None) for f in FACT_NAMES)  # the base has defaults


def test_instances_never_overwrite_class_facts(cnn, mlp):
    assert set(RANDOMIZED) == set(ATTACKS)
    for name in ATTACKS:
        extra = {"source": mlp} if name == "transfer" else {"twin": mlp} if name == "diva" else {}
        atk = make_attack(name, cnn, **extra)
        assert not {"name", "randomized", *FACT_NAMES} & set(vars(atk)), name
        assert atk.randomized is RANDOMIZED[name], name
    # where a setting decides, the instance's property follows it
    assert PGD(cnn, random_start=False).randomized is False and PGDL2(cnn, random_start=False).randomized is False
    assert Transfer(cnn, source=mlp, attack="bim").randomized is False
    assert Transfer(cnn, source=mlp, attack="pgd").randomized is True
    assert APGDT(cnn, loss="ce").name == "apgd-t-ce" and APGD(cnn, loss="dlr").name == "apgd-dlr"
