"""A killed evaluation continues where it stopped (state_path), with the numbers of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

import qrobust
from qrobust.data import load_dataset
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.training import fit

SUITE = ["fgsm", ("pgd", {"steps": 5, "alpha": "eps/4"}), ("square", {"n_queries": 30})]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def digits():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std)
    fit(m, train, epochs=4, lr=0.05)
    yield m.eval(), test.tensors(n=120)
    torch.set_num_threads(old)


def _masks(rep):
    return [(a.label, a.n_broken, a.robust_accuracy_after) for r in rep.results for a in r.attacks], \
        [r.robust for r in rep.results]


def test_interrupted_evaluation_resumes_to_the_same_numbers(digits, tmp_path, monkeypatch):
    model, data = digits
    kw = dict(suite=SUITE, eps=[0.05, 0.1], batch_size=16, seed=3, diagnostics=False)
    ref = qrobust.evaluate(model, data, **kw)

    # kill it in the middle of PGD at the second ε, after some of its batches were recorded
    from qrobust.attacks import PGD

    real = PGD.perturb
    calls = {"n": 0}

    def dying(self, x, y):
        if self.eps == 0.1:
            calls["n"] += 1
            if calls["n"] == 3:
                raise Interrupted
        return real(self, x, y)

    state = tmp_path / "state.json"
    monkeypatch.setattr(PGD, "perturb", dying)
    with pytest.raises(Interrupted):
        qrobust.evaluate(model, data, state_path=state, **kw)
    saved = json.loads(state.read_text())
    assert saved["partial"]["key"].endswith("|pgd-5") and saved["partial"]["batches"] == 2
    assert len(saved["done"]) == 4  # ε=0.05: fgsm, pgd, square; ε=0.1: fgsm

    assert saved["elapsed_s"] > 0
    # the report's wall time is the whole evaluation's, earlier runs included (a zoo card quotes it)
    state.write_text(json.dumps({**saved, "elapsed_s": 1000.0}))

    monkeypatch.setattr(PGD, "perturb", real)
    again = qrobust.evaluate(model, data, state_path=state, **kw)
    assert _masks(again) == _masks(ref)
    assert again.robust_accuracies == ref.robust_accuracies
    assert 1000.0 < again.wall_time_s < 1000.0 + 10 * ref.wall_time_s


def test_a_state_file_of_another_evaluation_is_refused(digits, tmp_path):
    model, data = digits
    state = tmp_path / "s.json"
    qrobust.evaluate(model, data, suite=["fgsm"], eps=0.1, diagnostics=False, state_path=state)
    with pytest.raises(ConfigError, match="belongs to another evaluation"):
        qrobust.evaluate(model, data, suite=["fgsm"], eps=0.2, diagnostics=False, state_path=state)
    with pytest.raises(ConfigError, match="not both"):
        qrobust.evaluate(model, data, suite=["fgsm"], eps=0.1, state_path=state, return_examples=True)


def test_bad_data_gets_one_line_errors(digits):
    from qrobust.errors import InputError

    model, (x, y) = digits
    with pytest.raises(InputError, match="divide by 255"):
        qrobust.evaluate(model, (x * 255, y), suite=["fgsm"], eps=0.1, diagnostics=False)
    with pytest.raises(InputError, match="label 10 is out of range for a model with 10 outputs"):
        qrobust.evaluate(model, (x, torch.full_like(y, 10)), suite=["fgsm"], eps=0.1, diagnostics=False)
    with pytest.raises(InputError, match="shape"):
        qrobust.evaluate(model, (torch.rand(4, 3, 32, 32), y[:4]), suite=["fgsm"], eps=0.1, diagnostics=False)
    with pytest.raises(InputError, match="empty"):
        qrobust.evaluate(model, (x[:0], y[:0]), suite=["fgsm"], eps=0.1, diagnostics=False)
