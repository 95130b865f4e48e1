"""The objective protocol: declared hooks with no-op defaults, plain callables wrapped, one registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from qrobust import fit
from qrobust.defenses import (
    OBJECTIVES,
    CrossEntropy,
    FunctionObjective,
    Objective,
    OrthogonalityPenalty,
    Sum,
    as_objective,
    make_objective,
    register_objective,
)
from qrobust.errors import ConfigError


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


class Recorder(Objective):
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def __call__(self, model, x, y):
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    def on_epoch_start(self, epoch):
        self.events.append(("epoch", epoch))

    def set_batch_view(self, view):
        self.events.append(("view", None if view is None else len(view.index)))

    def callback(self, record, model):
        record["recorded"] = len(self.events)


def test_fit_calls_every_hook_of_the_protocol():
    rec = Recorder()
    res = fit(nn.Linear(4, 3), _data(), objective=rec, epochs=2, batch_size=16, lr=0.1, device="cpu")
    assert [e for e in rec.events if e[0] == "epoch"] == [("epoch", 0), ("epoch", 1)]
    assert [e for e in rec.events if e[0] == "view"] == [("view", 16)] * 4
    assert [r["recorded"] for r in res.history] == [3, 6]


def test_defaults_are_no_ops_and_a_plain_callable_is_wrapped():
    ce = CrossEntropy()
    assert ce.state_dict() is None and ce.on_epoch_start(0) is None and ce.set_batch_view(None) is None
    assert ce.callback({}, nn.Linear(1, 1)) is None and ce.recommended_fit == {}

    def loss(model, x, y):
        return nn.functional.cross_entropy(model(x), y)

    wrapped = make_objective(loss)
    assert isinstance(wrapped, FunctionObjective) and wrapped.fn is loss
    assert wrapped.config() == {"name": "function"} and wrapped.state_dict() is None
    assert as_objective(ce) is ce
    with pytest.raises(ConfigError, match="callable"):
        as_objective(3)
    res = fit(nn.Linear(4, 3), _data(), objective=loss, epochs=1, batch_size=16, lr=0.1, device="cpu")
    assert res.history[0]["train_acc"] == 0.0  # a loss-only objective reports no logits


def test_a_duck_typed_objective_keeps_its_hooks_when_wrapped():
    class Old:
        def __init__(self):
            self.epochs = []

        def __call__(self, model, x, y):
            return nn.functional.cross_entropy(model(x), y)

        def on_epoch_start(self, epoch):
            self.epochs.append(epoch)

    old = Old()
    fit(nn.Linear(4, 3), _data(), objective=old, epochs=2, batch_size=16, lr=0.1, device="cpu")
    assert old.epochs == [0, 1]


def test_sum_forwards_every_hook_to_its_main_objective():
    rec = Recorder()
    obj = Sum(rec, OrthogonalityPenalty(1e-3))
    for hook in Objective.HOOKS:
        assert getattr(obj, hook) == getattr(rec, hook)
    obj.on_epoch_start(4)
    assert rec.events == [("epoch", 4)]


def test_one_registry_filled_by_one_decorator():
    @register_objective("test-only")
    class TestOnly(CrossEntropy):
        name = "test-only"

    try:
        assert OBJECTIVES["test-only"] is TestOnly and isinstance(make_objective("test-only"), TestOnly)
    finally:
        del OBJECTIVES["test-only"]
    assert {"ce", "dq", "pgd-at", "fgsm-rs", "trades", "odgq"} <= set(OBJECTIVES)
    assert all(isinstance(make_objective(n, eps=0.1) if n not in ("ce", "dq") else make_objective(n), Objective)
               for n in OBJECTIVES)


def test_built_ins_are_found_by_name_without_importing_their_module():
    code = ("from qrobust.defenses.objectives import make_objective\n"
            "print(type(make_objective('pgd-at', eps=0.1)).__name__, type(make_objective('odgq', eps=0.1)).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PgdAT", "OdgQ"]
