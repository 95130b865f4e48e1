"""bench/bench_cifar_full.py: every recipe is a `qrobust train` command the CLI accepts as written, and a
fine-tune recipe starts from (and is compared with) the float run it names."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from qrobust.cli import make_parser

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def full(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_cifar_full")


def test_every_recipe_is_a_command_the_cli_parses(full, tmp_path):
    parser = make_parser()
    for name in full.RECIPES:
        cmd = full.train_command(tmp_path, name, bf16=True)
        args = parser.parse_args(cmd[1:])
        assert args.dataset == "cifar10" and args.out == str(full.run_dir(tmp_path, name))
        assert args.epochs == full.SETTINGS.get(name, {}).get("epochs", full.EPOCHS)
        assert args.lr == full.SETTINGS.get(name, {}).get("lr", full.LR)


def test_a_fine_tune_starts_from_its_parent_run(full, tmp_path):
    fine_tunes = [n for n in full.RECIPES if full.init_of(n)]
    assert fine_tunes, "no fine-tune recipe left to test"
    parser = make_parser()
    for name in fine_tunes:
        parent = full.init_of(name)
        assert parent in full.RECIPES and full.RECIPES[parent][0] is None  # a float run of the same bench
        args = parser.parse_args(full.train_command(tmp_path, name)[1:])
        assert args.init == str(full.run_dir(tmp_path, parent)) and args.calib > 0
        assert args.model is None  # the architecture is the parent's
        assert full.parent_of(name) == parent  # the transfer attack's source is the model it started from
    assert full.init_of("w4a4-fgsm-rs") is None and full.parent_of("w4a4-fgsm-rs") == "float-fgsm-rs"
    assert full.parent_of("w4a4-pgd-at-2") == "float-pgd-at-2"
    assert full.parent_of("w8a8-odgq") == full.parent_of("w4a4-odgq-e30") == "float-odgq"
    assert full.arch_of("w4a4-odgq-wrn-16-2") == "wrn-16-2" and full.arch_of("w8a8-odgq") == "resnet20"
