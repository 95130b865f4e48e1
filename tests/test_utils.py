"""The shared primitives: eval-mode save/restore, a model's device, atomic writes with normal permissions."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.utils import atomic_write, atomic_write_text, eval_mode, model_device, model_device_dtype
from qrobust.validation import check_choice, check_eps


def test_eval_mode_restores_each_module_flag_also_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model must come back frozen
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_model_device_dtype():
    assert model_device_dtype(nn.Linear(2, 2).double()) == (torch.device("cpu"), torch.float64)
    assert model_device(nn.ReLU()) == torch.device("cpu")
    emb = nn.Module()
    emb.register_buffer("idx", torch.zeros(2, dtype=torch.int64))
    assert model_device_dtype(emb, torch.float16) == (torch.device("cpu"), torch.float16)


def test_atomic_write_gives_normal_permissions_and_leaves_no_temp_on_failure(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    finally:
        os.umask(old)
    assert p.read_text() == "hello"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's 0600

    def fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(p, fail)
    assert p.read_text() == "hello"  # the old file is untouched
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]  # and no temporary file is left


def test_validation_messages_name_the_setting():
    with pytest.raises(ConfigError, match="norm must be one of Linf, L2; got 'L3'"):
        check_choice("norm", "L3", ("Linf", "L2"))
    assert check_choice("scheme", " DoReFa ", ("dorefa",), casefold=True) == "dorefa"
    with pytest.raises(ConfigError, match="0–255 scale"):
        check_eps(8, "Linf")
    with pytest.raises(ConfigError, match="> 0"):
        check_eps(0, "Linf", positive=True)


def test_a_killed_writers_leftover_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "metrics.jsonl"
    leftover = tmp_path / ".metrics.jsonl.abc123.tmp"  # what SIGKILL during a write leaves
    leftover.write_text("half")
    other = tmp_path / ".other.json.xyz.tmp"
    other.write_text("someone else's")
    atomic_write_text(target, "whole\n")
    assert target.read_text() == "whole\n" and not leftover.exists() and other.exists()
