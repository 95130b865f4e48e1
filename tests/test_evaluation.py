"""Robustness evaluation: the worst case, ε sweeps, the report's data and rendering, and the masking checks.

One digits_cnn is trained here for a few seconds on scikit-learn's 8×8 digits (bundled, offline) and
quantized to w2a2; every evaluation runs on 96 test images with small attack budgets.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qrobust.analysis import (
    CHECKS,
    Diagnostic,
    check_black_box,
    check_convergence,
    check_large_eps,
    check_single_step,
    gradient_health,
    input_gradients,
)
from qrobust.attacks import ATTACKS, FGSM, PGD, Attack
from qrobust.data import BatchLoader, load_dataset
from qrobust.errors import ConfigError, InputError
from qrobust.evaluation import RobustnessReport, SuiteEntry, evaluate, suite_entries
from qrobust.evaluation.suites import BuildSettings, build_entry, mark_roles
from qrobust.models import build_model
from qrobust.quant import quantize
from qrobust.quant.modes import round_q
from qrobust.report import save_adversarial_examples

N_TEST = 96
EPS = 0.1
SMALL_SUITE = ["fgsm", ("pgd", {"steps": 20, "alpha": "eps/4"}), ("square", {"n_queries": 100})]
ONE_SAMPLE_NOISE = 0.025  # with 96 samples one sample is 1.04 points: a healthy model may differ by one
needs_square = pytest.mark.skipif("square" not in ATTACKS, reason="Square attack not available")


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest (and reproducibly) on one thread on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def float_model(digits) -> nn.Module:
    torch.manual_seed(0)
    x, y = digits[0].tensors()
    return _train(build_model("digits_cnn", in_channels=1, input_size=8), x, y, steps=200, lr=3e-3)


@pytest.fixture(scope="module")
def w2a2_model(float_model, digits) -> nn.Module:
    x, y = digits[0].tensors()
    return _train(quantize(float_model, "w2a2"), x, y, steps=100, lr=1e-3)


@pytest.fixture(scope="module")
def test_xy(digits) -> tuple[torch.Tensor, torch.Tensor]:
    return digits[1].tensors(N_TEST)


@pytest.fixture(scope="module")
def quick_report(float_model, test_xy) -> RobustnessReport:
    return evaluate(float_model, test_xy, suite="quick", eps=EPS, return_examples=True, dataset="digits")


class RoundInput(nn.Module):
    """Gradient masking by construction: the input is rounded to 5 levels with plain ``torch.round``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 4) / 4)


class DetachInput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.detach())


def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def _flags(report: RobustnessReport) -> set[str]:
    return {d.name for d in report.flagged}


# ---------------------------------------------------------------------------------- report contents
def test_report_fields_and_json_round_trip(quick_report, float_model, test_xy, tmp_path):
    r = quick_report
    x, y = test_xy
    clean = _clean_correct(float_model, x, y)
    assert (r.model, r.dataset, r.threat_model, r.suite, r.n) == ("digits_cnn", "digits", "Linf", "quick", N_TEST)
    assert r.clean_accuracy == pytest.approx(float(clean.float().mean()), abs=0)
    assert r.eps == [EPS] and r.bits is None and r.bits_str == "float" and r.gradients == "ste" and r.seed == 0
    assert {"qrobust", "torch", "python"} <= set(r.versions) and r.wall_time_s > 0
    assert [a.label for a in r.result().attacks] == ["fgsm", "pgd-20"]
    assert r.result().attacks[1].settings["steps"] == 20
    assert r.result().attacks[1].settings["alpha"] == pytest.approx(EPS / 4)

    d = json.loads(r.to_json())
    assert d["clean_acc"] == r.clean_accuracy and d["robust_acc"] == r.robust_accuracy and d["eps"] == EPS
    assert d["threat_model"] == "Linf" and d["n_examples"] == N_TEST and d["model"] == "digits_cnn"
    assert {g["name"] for g in d["diagnostics"]} == set(CHECKS)
    assert RobustnessReport.from_dict(d) == r

    paths = r.save(tmp_path)
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "accuracy_by_attack.png"}  # one ε
    assert RobustnessReport.load(tmp_path) == r
    with pytest.raises(InputError):
        RobustnessReport.load(tmp_path / "missing")


def test_worst_case_is_the_per_sample_minimum(quick_report, float_model, test_xy):
    r = quick_report.result()
    x, y = test_xy
    clean = _clean_correct(float_model, x, y)
    own = [a.robust_mask for a in r.attacks]
    assert all(m is not None for m in own)
    expected = clean & own[0] & own[1]
    assert torch.equal(r.robust_mask, expected)
    assert r.robust_accuracy == pytest.approx(float(expected.float().mean()), abs=0)
    for a in r.attacks:
        assert r.robust_accuracy <= a.robust_accuracy <= quick_report.clean_accuracy
    assert r.robust_accuracy < quick_report.clean_accuracy  # the attacks did something

    # the kept worst-case examples realise the mask: legal perturbations that flip exactly the broken ones
    x_, x_adv, y_, pred_clean, pred_adv = quick_report.adversarial_examples()
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        again = float_model(x_adv).argmax(1)
    assert torch.equal(again, pred_adv) and torch.equal(pred_adv == y, r.robust_mask)
    assert torch.equal(x_adv[r.robust_mask], x[r.robust_mask])


def test_sequential_attacks_only_survivors_and_match_individual(float_model, test_xy):
    suite = [("mifgsm", {"steps": 5, "alpha": "eps/4"}), ("bim", {"steps": 10, "alpha": "eps/8"})]
    seq = evaluate(float_model, test_xy, suite=suite, eps=EPS, diagnostics=False).result()
    first, second = seq.attacks
    assert first.individual and first.robust_accuracy is not None  # ran on every clean-correct sample
    assert not second.individual and second.robust_accuracy is None and second.robust is None
    assert second.n_attacked == round(first.robust_accuracy_after * N_TEST)
    assert second.robust_accuracy_after == seq.robust_accuracy
    n_clean = int(_clean_correct(float_model, *test_xy).sum())
    assert n_clean - first.n_broken - second.n_broken == round(seq.robust_accuracy * N_TEST)

    ind = evaluate(float_model, test_xy, suite=suite, eps=EPS, diagnostics=False, individual=True).result()
    assert all(a.individual for a in ind.attacks)
    assert ind.attacks[1].n_attacked == n_clean
    both = ind.attacks[0].robust_mask & ind.attacks[1].robust_mask
    assert torch.equal(ind.robust_mask, both)
    # deterministic per-sample attacks: attacking only the survivors loses nothing
    assert torch.equal(ind.robust_mask, seq.robust_mask)


def test_eps_sweep_is_sorted_nested_and_non_increasing(float_model, test_xy):
    r = evaluate(float_model, test_xy, suite="quick", eps=[0.15, 0.05, 0.1], diagnostics=False)
    assert r.eps == [0.05, 0.1, 0.15]
    accs = r.robust_accuracies
    assert accs[0] >= accs[1] >= accs[2] and accs[2] < accs[0]
    clean = _clean_correct(float_model, *test_xy)
    for small, large in zip(r.results, r.results[1:]):
        assert not bool((large.robust_mask & ~small.robust_mask).any())  # broken at small ⇒ broken at large
        assert large.n_inherited == int((clean & ~small.robust_mask).sum())
    with pytest.raises(ConfigError, match="sweeps"):
        _ = r.robust_accuracy
    assert r.result(0.1).robust_accuracy == accs[1]
    d = r.to_dict()
    assert d["eps"] == [0.05, 0.1, 0.15] and d["robust_acc"] == accs
    assert RobustnessReport.from_dict(json.loads(json.dumps(d))) == r


def test_markdown_puts_diagnostics_near_the_top_and_png_is_written(quick_report, tmp_path):
    quick_report.save(tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    diag = lines.index("## Diagnostics")
    assert diag < 15 and diag < lines.index("## Attacks")
    for title in CHECKS.values():
        assert title in md
    assert "![robust accuracy by attack](accuracy_by_attack.png)" in md  # one ε: a bar chart, named for it
    png = (tmp_path / "accuracy_by_attack.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert quick_report.markdown() == md


# ---------------------------------------------------------------------------------- masking checks
def test_w2a2_native_gradients_flagged_and_ste_finds_more(w2a2_model, test_xy):
    native = evaluate(w2a2_model, test_xy, suite="quick", eps=EPS, gradients="native")
    ste = evaluate(w2a2_model, test_xy, suite="quick", eps=EPS, gradients="ste")
    assert native.bits_str == "w2a2" and native.bits["weight_bits"] == 2
    zero = next(d for d in native.diagnostics if d.name == "zero_gradients")
    assert zero.flagged and zero.numbers["masked_fraction_native"] == 1.0
    assert all(a.gradients == "native" for a in native.result().attacks)
    assert ste.robust_accuracy <= native.robust_accuracy
    broken_ste = ste.clean_accuracy - ste.robust_accuracy
    broken_native = native.clean_accuracy - native.robust_accuracy
    assert broken_ste >= broken_native and broken_ste > 0
    ste_zero = next(d for d in ste.diagnostics if d.name == "zero_gradients")
    assert ste_zero.numbers["masked_fraction_native"] == 1.0
    assert ste_zero.numbers["masked_fraction_ste"] < 1.0
    assert "native" in ste_zero.evidence


@needs_square
def test_masking_model_triggers_black_box_and_zero_gradient_flags(float_model, test_xy, tmp_path):
    r = evaluate(RoundInput(float_model), test_xy, suite=SMALL_SUITE, eps=0.15, tol=ONE_SAMPLE_NOISE)
    assert {"zero_gradients", "black_box_beats_white_box"} <= _flags(r)
    bb = next(d for d in r.diagnostics if d.name == "black_box_beats_white_box")
    assert bb.numbers["black_box_extra"]["square"] > 0.5
    sq = r.result().attacks[2]
    assert sq.black_box and sq.gradients is None and sq.n_broken > 0
    r.save(tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "**FLAGGED**" in md and "WARNING" in md.split("## Attacks")[0]


def test_detached_input_is_flagged_and_fgsm_cannot_move(float_model, test_xy):
    model = DetachInput(float_model)
    r = evaluate(model, test_xy, suite="quick", eps=EPS)
    zero = next(d for d in r.diagnostics if d.name == "zero_gradients")
    assert zero.flagged and zero.numbers["masked_fraction_ste"] == 1.0
    fgsm = r.result().attack("fgsm")
    assert fgsm.robust_accuracy == r.clean_accuracy  # a zero gradient has sign 0: FGSM returns x
    assert "not_zero_at_large_eps" in _flags(r)


@needs_square
def test_healthy_model_raises_no_masking_flag(float_model, test_xy):
    r = evaluate(float_model, test_xy, suite=SMALL_SUITE, eps=0.15, tol=ONE_SAMPLE_NOISE)
    assert r.flagged == []
    assert all(d.checked for d in r.diagnostics)
    assert {d.name for d in r.diagnostics} == set(CHECKS)
    assert r.robust_accuracy < 0.5 * r.clean_accuracy


# --------------------------------------------------------------------------------- suites and data
@pytest.mark.skipif(not {"apgd-ce", "apgd-t", "square"} <= set(ATTACKS), reason="APGD/Square missing")
def test_standard_suite_runs_in_sequence(float_model, test_xy):
    r = evaluate(float_model, test_xy, suite="standard", eps=EPS, n=48, n_queries=50, diagnostic_n=48,
                 attack_kwargs={"apgd-ce": {"n_iter": 5}, "apgd-t": {"n_iter": 5, "n_target_classes": 2}})
    atk = r.result().attacks
    assert [a.label for a in atk] == ["apgd-ce", "apgd-t", "square"]
    assert atk[2].settings["n_queries"] == 50 and atk[0].settings["n_iter"] == 5
    assert atk[2].black_box and not atk[0].black_box and atk[0].gradients == "ste"
    assert atk[1].n_attacked == round(atk[0].robust_accuracy_after * 48)
    assert atk[2].n_attacked == round(atk[1].robust_accuracy_after * 48)
    # FGSM/PGD are not in the suite: the diagnostics ran their own probes
    assert next(d for d in r.diagnostics if d.name == "single_step_beats_iterative").checked


@pytest.mark.skipif(not {"apgd-ce", "apgd-t", "square", "spsa", "transfer"} <= set(ATTACKS),
                    reason="attacks of the quantized suite missing")
def test_quantized_suite_uses_ste_surrogate_black_box_and_transfer(w2a2_model, float_model, test_xy):
    small = {"n_iter": 3, "n_target_classes": 2}
    r = evaluate(w2a2_model, test_xy, suite="quantized", eps=EPS, n=32, n_queries=30, parent=float_model,
                 diagnostic_n=32, attack_kwargs={"apgd-ce[ste]": {"n_iter": 3}, "apgd-t[ste]": small,
                                                 "apgd-ce[bpda]": {"n_iter": 3}, "apgd-ce[surrogate]": {"n_iter": 3},
                                                 "apgd-t[surrogate]": small,
                                                 "spsa": {"steps": 2, "nb_samples": 8}})
    atk = {a.label: a for a in r.result().attacks}
    assert list(atk) == ["apgd-ce[ste]", "apgd-t[ste]", "apgd-ce[bpda]", "apgd-ce[surrogate]", "apgd-t[surrogate]",
                         "square", "spsa", "transfer-pgd-20[parent]"]
    assert atk["apgd-ce[ste]"].gradients == "ste" and atk["apgd-ce[surrogate]"].gradients == "surrogate"
    assert atk["apgd-ce[bpda]"].gradients == "bpda"
    assert all(atk[k].black_box for k in ("square", "spsa", "transfer-pgd-20[parent]"))
    assert r.parent == "digits_cnn" and atk["transfer-pgd-20[parent]"].settings["source"] == "digits_cnn"
    zero = next(d for d in r.diagnostics if d.name == "zero_gradients")
    assert {"masked_fraction_ste", "masked_fraction_surrogate"} <= set(zero.numbers)
    no_parent = evaluate(w2a2_model, test_xy, suite="quantized", eps=EPS, n=8, n_queries=5, diagnostics=False,
                         attack_kwargs={"apgd-ce[ste]": {"n_iter": 2}, "apgd-t[ste]": small,
                                        "apgd-ce[bpda]": {"n_iter": 2}, "apgd-ce[surrogate]": {"n_iter": 2},
                                        "apgd-t[surrogate]": small,
                                        "spsa": {"steps": 1, "nb_samples": 4}})
    assert "transfer" not in " ".join(a.label for a in no_parent.result().attacks)
    assert "skipped" in no_parent.settings["transfer"]


def test_l2_quick_suite_stays_in_the_l2_ball(float_model, test_xy):
    r = evaluate(float_model, test_xy, suite="quick", eps=0.8, norm="L2", return_examples=True)
    assert r.threat_model == "L2" and [a.label for a in r.result().attacks] == ["fgm-l2", "pgd-l2-20"]
    x, x_adv = r.adversarial_examples()[:2]
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 0.8 + 1e-5
    assert r.robust_accuracy < r.clean_accuracy


def test_data_forms_agree(float_model, digits):
    test = digits[1]
    kw = {"suite": ["fgsm"], "eps": EPS, "diagnostics": False}
    a = evaluate(float_model, test, n=64, **kw)
    b = evaluate(float_model, BatchLoader(test, 20), n=64, **kw)
    c = evaluate(float_model, torch.utils.data.DataLoader(test, batch_size=16), n=64, **kw)
    d = evaluate(float_model, test.tensors(64), **kw)
    assert a.n == b.n == c.n == d.n == 64
    assert a.dataset == b.dataset == c.dataset == "digits" and d.dataset == "unknown"
    assert a.clean_accuracy == b.clean_accuracy == c.clean_accuracy == d.clean_accuracy
    assert a.robust_accuracy == b.robust_accuracy == c.robust_accuracy == d.robust_accuracy


def test_bad_settings_are_refused(float_model, test_xy):
    with pytest.raises(ConfigError, match="unknown suite"):
        evaluate(float_model, test_xy, suite="fast")
    with pytest.raises(ConfigError, match="exceeds 1"):
        evaluate(float_model, test_xy, eps=8)
    with pytest.raises(ConfigError, match="attack_kwargs"):
        evaluate(float_model, test_xy, suite="quick", attack_kwargs={"pgd-100": {"steps": 3}})
    with pytest.raises(ConfigError, match="not available"):
        evaluate(float_model, test_xy, suite=["deepfool"])
    with pytest.raises(ConfigError, match="sweeps"):
        evaluate(float_model, test_xy, suite=[PGD(float_model, eps=0.05)], eps=[0.05, 0.1])
    with pytest.raises(ConfigError, match="threat model is L2"):
        evaluate(float_model, test_xy, suite=[FGSM], eps=0.5, norm="L2")
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        evaluate(float_model, (test_xy[0] * 2, test_xy[1]))
    with pytest.raises(ConfigError):
        evaluate(float_model, test_xy, n=0)


def test_instances_and_factories_in_a_custom_suite(float_model, test_xy):
    suite = [FGSM(float_model, eps=EPS), lambda m, **kw: PGD(m, steps=3, alpha=EPS / 3, **kw)]
    r = evaluate(float_model, test_xy, suite=suite, eps=EPS, diagnostics=False, seed=3)
    labels = [a.label for a in r.result().attacks]
    assert labels == ["fgsm", "pgd-3"]
    assert r.result().attacks[1].settings["seed"] == 3  # the factory received the evaluation's seed
    assert r.result().attacks[0].individual  # the FGSM of a custom suite runs on every sample


class SignNoise(Attack):
    """A black-box attack defined here, not in qrobust: random ±ε signs, no gradients. Its class says so."""

    name = "sign-noise"
    black_box = True
    randomized = True
    single_step = True

    def __init__(self, model: nn.Module, *, eps: float = 0.1, **kwargs) -> None:
        super().__init__(model, eps=eps, norm="Linf", **kwargs)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.project(x + self.eps * self.rademacher(x.shape), x)


def test_an_attack_that_declares_black_box_gets_no_gradients_and_counts_as_black_box(
        float_model, test_xy, monkeypatch):
    settings = BuildSettings(model=float_model, norm="Linf", gradients="native", seed=0, surrogate=None)
    for item in (SignNoise, "sign-noise"):  # a factory (the class), or a name once in the registry
        if isinstance(item, str):
            monkeypatch.setitem(ATTACKS, "sign-noise", SignNoise)
        b = build_entry(SuiteEntry("", item), eps=EPS, settings=settings, overrides={})
        assert "gradients" not in b.kwargs and b.attack.gradients == "ste"  # not handed the suite's mode
        assert b.black_box and b.gradients is None and b.label == "sign-noise"
    pgd = build_entry(SuiteEntry("", "pgd"), eps=EPS, settings=settings, overrides={})
    assert pgd.kwargs["gradients"] == "native" and not pgd.black_box

    suite = [("pgd", {"steps": 5, "alpha": "eps/4"}), ("sign-noise", {"individual": True}), SignNoise]
    r = evaluate(float_model, test_xy, suite=suite, eps=EPS, diagnostic_n=48, diagnostic_steps=5)
    atk = r.result().attacks
    assert [a.label for a in atk] == ["pgd-5", "sign-noise", "sign-noise#2"]
    assert [a.black_box for a in atk] == [False, True, True] and atk[1].gradients is None
    bb = next(d for d in r.diagnostics if d.name == "black_box_beats_white_box")
    assert bb.checked and set(bb.numbers["white_box"]) == {"pgd-5"}
    assert set(bb.numbers["black_box"]) == {"sign-noise"}
    assert set(bb.numbers["black_box_extra"]) == {"sign-noise", "sign-noise#2"}


def test_custom_suite_roles_come_from_the_attack_classes(float_model, test_xy):
    """BIM and CW-L∞ are PGDs by class but not the diagnostics' PGD reference; the first PGD is."""
    suite = [("bim", {"steps": 3}), ("cwlinf", {"steps": 3}), ("pgd", {"steps": 4, "alpha": "eps/4"}), "fgsm"]
    entries = suite_entries(suite)
    mark_roles(entries)
    assert [e.role for e in entries] == [None, None, "pgd", "fgsm"]
    assert [e.individual for e in entries] == [False, False, True, True]
    r = evaluate(float_model, test_xy, suite=suite, eps=EPS, diagnostic_n=48, diagnostic_steps=5)
    assert [a.label for a in r.result().attacks] == ["bim-3", "cwlinf", "pgd-4", "fgsm"]
    conv = next(d for d in r.diagnostics if d.name == "not_converged")
    assert conv.numbers["steps"] == 4  # the suite's own PGD, rebuilt with twice its steps


def test_package_top_exports_evaluate_and_the_report():
    import qrobust

    assert qrobust.evaluate is evaluate and qrobust.RobustnessReport is RobustnessReport
    assert {"evaluate", "RobustnessReport"} <= set(qrobust.__all__)
    # and every registered attack class, as torchattacks users expect (qrobust.PGD, qrobust.APGD, …)
    assert {cls.__name__ for cls in ATTACKS.values()} <= set(qrobust.__all__)
    assert all(getattr(qrobust, cls.__name__) is cls for cls in ATTACKS.values())


# ------------------------------------------------------------------------------ adversarial examples
def test_save_adversarial_examples(quick_report, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    x, x_adv, y, pc, pa = quick_report.adversarial_examples()
    paths = save_adversarial_examples(x, x_adv, y, pc, pa, tmp_path, max_images=8, metadata={"eps": EPS})
    loaded = load_file(paths["safetensors"])
    for k, v in {"x": x, "x_adv": x_adv, "y": y, "pred_clean": pc, "pred_adv": pa}.items():
        assert torch.equal(loaded[k], v)
    with safe_open(str(paths["safetensors"]), "pt") as f:
        meta = json.loads(f.metadata()["qrobust"])
    assert meta["fooled"] == int(((pc == y) & (pa != y)).sum()) > 0
    assert meta["eps"] == EPS and meta["linf_max"] <= EPS + 1e-6
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InputError, match="same shape"):
        save_adversarial_examples(x, x_adv[:, :, :4], y, pc, pa, tmp_path)


# ----------------------------------------------------------------------------- the checks themselves
@settings(max_examples=60, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.2))
def test_threshold_checks_flag_exactly_beyond_the_tolerance(a, b, tol):
    assert check_single_step(fgsm_accuracy=a, pgd_accuracy=b, eps=0.1, tol=tol).flagged == (a < b - tol)
    assert check_convergence(accuracy=a, accuracy_more_steps=b, steps=10, eps=0.1, tol=tol).flagged == (
        b < a - tol)
    assert check_large_eps(accuracy=a, large_eps=0.5, max_accuracy=b).flagged == (a > b)


def test_check_boundaries_and_black_box_rules():
    assert not check_single_step(fgsm_accuracy=0.415, pgd_accuracy=0.42, eps=0.1).flagged
    assert check_single_step(fgsm_accuracy=0.40, pgd_accuracy=0.42, eps=0.1).flagged
    assert not check_large_eps(accuracy=0.10, large_eps=0.5).flagged
    assert check_large_eps(accuracy=0.11, large_eps=0.5).flagged
    own = check_black_box(white_box={"pgd": 0.40, "fgsm": 0.45}, black_box={"square": 0.38}, eps=0.1)
    assert own.flagged and own.numbers["best_white_box"] == 0.40
    assert not check_black_box(white_box={"pgd": 0.40}, black_box={"square": 0.395}, eps=0.1).flagged
    extra = check_black_box(white_box={}, black_box={}, black_box_extra={"square": 0.02}, eps=0.1)
    assert extra.flagged and "square" in extra.evidence
    assert not check_black_box(white_box={}, black_box={}, black_box_extra={"square": 0.0}, eps=0.1).flagged
    none = check_black_box(white_box={"pgd": 0.4}, black_box={}, eps=0.1)
    assert not none.checked and not none.flagged and none.status == "not checked"
    with pytest.raises(ConfigError):
        check_single_step(fgsm_accuracy=1.5, pgd_accuracy=0.2, eps=0.1)
    d = check_single_step(fgsm_accuracy=0.3, pgd_accuracy=0.5, eps=0.1)
    assert Diagnostic.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_input_gradients_match_the_definition():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x, y = torch.rand(5, 6), torch.tensor([0, 1, 2, 3, 0])
    g = input_gradients(lin, x, y)
    p = torch.softmax(lin(x), dim=1).detach()
    expected = (p - F.one_hot(y, 4).float()) @ lin.weight.detach()
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


class _QuantInput(nn.Module):
    """A 2-bit input quantizer through ``round_q`` (follows the gradient mode) in front of a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.quant_enabled = True
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(round_q(x * 3) / 3 if self.quant_enabled else x)


def test_gradient_health_counts_modes_and_non_finite():
    torch.manual_seed(0)
    m = _QuantInput()
    x, y = torch.rand(8, 6), torch.randint(0, 3, (8,))
    assert gradient_health(m, x, y, gradients="native").zero == 8
    assert gradient_health(m, x, y, gradients="ste").masked == 0
    # the surrogate gradient is the float model's gradient (quantizer disabled)
    m.quant_enabled = False
    float_grad = input_gradients(m, x, y, gradients="native")
    m.quant_enabled = True
    torch.testing.assert_close(input_gradients(m, x, y, gradients="surrogate"), float_grad)
    assert m.quant_enabled  # restored

    class Sqrt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.sqrt(x))

    x = torch.rand(8, 6) * 0.9 + 0.1
    x[:3, 0] = 0.0  # d sqrt/dx = inf at 0
    h = gradient_health(Sqrt(), x, y)
    assert (h.nonfinite, h.zero, h.masked_fraction) == (3, 0, 3 / 8)
