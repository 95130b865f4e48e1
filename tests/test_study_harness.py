"""The study harness: exact paired statistics, verdicts, budgets, timing, the registry and a toy study run
through the same machinery (and the CLI) as the real ones."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch
from scipy.stats import binomtest

from qrobust.cli import main, make_parser, study_settings
from qrobust.errors import ConfigError, InputError
from qrobust.studies import harness
from qrobust.studies.harness import (
    Option,
    Study,
    StudyContext,
    available_studies,
    dataset_defaults,
    get_study,
    grid,
    interleaved_epoch_times,
    md_table,
    median_epoch_time,
    new_figure,
    paired_test,
    paired_text,
    register_study,
    render_results,
    resolve_budget,
    run_study,
    significant,
    timing_ratios,
)


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("only_a, only_b, both, neither", [(6, 0, 10, 4), (5, 0, 3, 3), (9, 1, 0, 0), (3, 7, 2, 8),
                                                           (0, 0, 5, 5)])
def test_paired_test_is_the_exact_mcnemar_test(only_a, only_b, both, neither):
    a = torch.tensor([True] * only_a + [False] * only_b + [True] * both + [False] * neither)
    b = torch.tensor([False] * only_a + [True] * only_b + [True] * both + [False] * neither)
    t = paired_test(a, b)
    n = only_a + only_b
    assert (t["only_a"], t["only_b"]) == (only_a, only_b)
    assert t["p"] == pytest.approx(binomtest(only_a, n, 0.5).pvalue if n else 1.0)
    assert t["z"] == pytest.approx((only_a - only_b) / n**0.5 if n else 0.0)
    # significant only in the claimed direction: a robust more often, p < 0.05
    assert significant(t) == (only_a > only_b and t["p"] < 0.05)
    assert not significant(paired_test(b, a)) or only_a < only_b


def test_exact_test_is_more_careful_than_z_on_few_discordant_pairs():
    a = torch.tensor([True] * 5 + [False] * 5)
    b = torch.zeros(10, dtype=torch.bool)
    t = paired_test(a, b)  # 5 vs 0: z = 2.24 > 1.96, but p = 1/16
    assert t["z"] > 1.96 and t["p"] == pytest.approx(0.0625) and not significant(t)
    with pytest.raises(InputError):
        paired_test(a, b[:3])


def test_md_table_escapes_pipes():
    assert md_table(["a", "b"], [[1, "x|y"]]) == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]


def test_paired_text_keeps_legacy_z_only_results():
    assert paired_text({"z": 1.234}) == "z = 1.23"
    assert paired_text({"z": 1.234}, signed=True) == "z = +1.23"
    assert paired_text({"z": 2.5, "p": 0.0123}) == "z = 2.50, p = 0.012"


# ------------------------------------------------------------------------------------------ settings
def test_dataset_defaults_take_the_model_from_one_place():
    table = {"digits": {"epochs": 5}, "cifar10": {"epochs": 30, "model": "wrn"}}
    fallback = {"epochs": 10, "lr": 0.1, "model": "resnet20"}
    assert dataset_defaults(table, "digits", fallback) == {"epochs": 5, "lr": 0.1, "model": "digits_cnn"}
    assert dataset_defaults(table, "cifar10", fallback)["model"] == "wrn"
    assert dataset_defaults(table, "nonesuch", fallback) == fallback
    from qrobust import cli

    assert cli.DEFAULT_MODEL is harness.DEFAULT_MODEL


@dataclasses.dataclass
class _Budget:
    steps: int = 10
    batches: int | None = None


def test_budget_is_resolved_and_checked_by_name():
    study = _Toy()
    assert resolve_budget(study, quick=False, overrides=None) == _Budget()
    assert resolve_budget(study, quick=True, overrides={"batches": 3}) == _Budget(steps=2, batches=3)
    with pytest.raises(ConfigError, match=r"unknown budget fields \['step'\]"):
        resolve_budget(study, quick=False, overrides={"step": 3})
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        resolve_budget(study, quick=False, overrides={"steps": 0})


def test_grid_is_the_product_of_named_axes_first_slowest():
    cells = grid({"bits": [4, 1], "recipe": ["ce", "odgq"]}, where=lambda j: (j["bits"], j["recipe"]) != (1, "ce"))
    assert cells == [{"bits": 4, "recipe": "ce"}, {"bits": 4, "recipe": "odgq"}, {"bits": 1, "recipe": "odgq"}]
    assert grid({}) == [{}]


# ------------------------------------------------------------------------------------------ timing
def test_interleaved_timing_rotates_the_order():
    calls: list[str] = []

    def run(name: str, seconds: float):
        def f():
            calls.append(name)
            return [{"epoch_time_s": seconds}, {"epoch_time_s": seconds}]
        return f

    times = interleaved_epoch_times({"ref": run("ref", 1.0), "a": run("a", 2.0), "b": run("b", 3.0)}, repeats=3)
    assert calls == ["ref", "a", "b", "a", "b", "ref", "b", "ref", "a"]
    assert times == {"ref": [1.0] * 3, "a": [2.0] * 3, "b": [3.0] * 3}
    r = timing_ratios(times, "ref")
    assert r["a"] == {"median": 2.0, "of_medians": 2.0, "of_minima": 2.0} and r["ref"]["median"] == 1.0
    assert median_epoch_time([{"epoch_time_s": t} for t in (9.0, 1.0, 2.0)], skip_first=True) == 1.5
    assert median_epoch_time([{"epoch_time_s": t} for t in (9.0, 1.0, 2.0)]) == 2.0
    assert median_epoch_time([]) is None


# ------------------------------------------------------------------------------------------ a toy study
class _Toy(Study):
    name = "toy"
    summary = "a toy study: two coins compared"
    format = "qrobust-toy-study/1"
    budget = _Budget()
    quick_budget = _Budget(steps=2)
    options = (Option("--flips", "int", "coin flips per coin"), Option("--fair", "flag", "use fair coins"),
               Option("--eps", "eps255_list", "ε list (0–255)"))

    def run(self, ctx: StudyContext, *, dataset: str, data_dir: Any = None, flips: int = 20, fair: bool = False,
            eps: Any = None) -> dict[str, Any]:
        g = torch.Generator().manual_seed(ctx.seed)
        a = torch.rand(flips, generator=g) < 0.9
        b = torch.rand(flips, generator=g) < (0.9 if fair else 0.1)
        t = paired_test(a, b)
        return {"format": self.format, "settings": {"dataset": dataset, "flips": flips, "eps": eps,
                                                    "steps": ctx.budget.steps, "threads": ctx.threads},
                "claims": {"a beats b": {**t, "verdict": harness.verdict([(t["only_a"] > t["only_b"],
                                                                            significant(t))])}}}

    def render(self, results: dict[str, Any]) -> str:
        c = results["claims"]["a beats b"]
        return f"# Toy study\n\na beats b: **{c['verdict']}** ({paired_text(c)})\n"

    def figures(self, results: dict[str, Any]) -> dict[str, Any]:
        fig = new_figure((3, 2))
        fig.add_subplot(1, 1, 1).bar([0, 1], [results["claims"]["a beats b"]["only_a"], 1])
        return {"toy.png": fig}


@pytest.fixture
def toy():
    register_study(_Toy)
    yield harness._REGISTRY["toy"]
    del harness._REGISTRY["toy"]


def test_a_study_is_one_class_run_by_the_harness(toy, tmp_path):
    assert "toy" in available_studies() and get_study("toy") is toy
    res = run_study("toy", out=tmp_path / "t", quick=True, budget={"batches": 2}, flips=40)
    assert res["settings"]["steps"] == 2 and res["settings"]["threads"] == 1 and res["wall_time_s"] >= 0
    assert res["claims"]["a beats b"]["verdict"] == "reproduced"
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert (tmp_path / "t" / "toy.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "t" / "report.md").read_text()
    assert report.startswith("# Toy study") and render_results(tmp_path / "t") == report
    with pytest.raises(ConfigError, match=r"the toy study has no setting \['flipz'\]; it takes \['data_dir', 'eps'"):
        run_study("toy", out=tmp_path / "u", flipz=3)
    assert not (tmp_path / "u").exists()
    with pytest.raises(ConfigError, match="unknown study"):
        get_study("nonesuch")
    with pytest.raises(ConfigError, match="already registered"):
        register_study(type("Other", (_Toy,), {}))
    with pytest.raises(ConfigError, match="name"):
        register_study(type("Render", (_Toy,), {"name": "render"}))


def test_cli_learns_a_study_and_its_options_from_the_registry(toy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = capsys.readouterr().out
    assert "toy" in out and "a toy study" in out and "dq" in out and "odgq" in out
    with pytest.raises(SystemExit):
        main(["study", "toy", "--help"])
    out = capsys.readouterr().out
    assert "--flips" in out and "coin flips per coin" in out and "--fair" in out and "--quick" in out
    assert main(["study", "toy", "--flips", "30", "--fair", "--eps", "8,16", "--out", str(tmp_path / "c")]) == 0
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    assert res["settings"]["flips"] == 30 and res["settings"]["eps"] == [8 / 255, 16 / 255]
    code = main(["study", "toy", "--flips", "many"])
    assert code == 2 and "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize("study, flags", [
    ("dq", ["--bits", "--betas", "--quantize-weights", "--adversarial", "--init", "--penalty-bn", "--full-confirm",
            "--float-epochs", "--source-epochs", "--eps"]),
    ("odgq", ["--bits", "--eps", "--recipes", "--init", "--lr"]),
])
def test_study_help_lists_each_studys_own_flags(capsys, study, flags):
    with pytest.raises(SystemExit):
        main(["study", study, "--help"])
    out = capsys.readouterr().out
    for flag in [*flags, "--dataset", "--data-dir", "--model", "--epochs", "--n-train", "--n-eval", "--budget",
                 "--bf16", "--quick", "--resume", "--seed", "--out"]:
        assert flag in out, flag


@pytest.mark.parametrize("argv, expected", [
    # the README's and bench/results' commands: the same keywords the studies got before the registry
    ("dq --dataset mnist --bits 1,2,4,32 --betas 3e-3,3e-2",
     {"dataset": "mnist", "bits": (1, 2, 4, 32), "betas": (3e-3, 3e-2), "quantize_weights": "act-only",
      "penalty_bn": "ignore", "adversarial": False, "full_confirm": False, "bf16": False}),
    ("dq --dataset cifar10 --init f.safetensors --bits 1,2,4,32 --n-train 20000 --epochs 3 --source-epochs 5 "
     "--n-eval 500 --bf16 --eps 2,4 --quantize-weights act-only,both --penalty-bn fold --adversarial",
     {"dataset": "cifar10", "init": "f.safetensors", "bits": (1, 2, 4, 32), "n_train": 20000, "epochs": 3,
      "source_epochs": 5, "n_eval": 500, "bf16": True, "eps": [2 / 255, 4 / 255],
      "quantize_weights": "act-only,both", "penalty_bn": "fold", "adversarial": True, "full_confirm": False}),
    ("odgq --dataset mnist --bits 4,1 --epochs 2 --n-eval 300 --budget {\"at_steps\":7} --eps 8 --lr 0.02 "
     "--recipes fgsm-rs,odgq",
     {"dataset": "mnist", "bits": (4, 1), "epochs": 2, "n_eval": 300, "budget": {"at_steps": 7}, "eps": 8 / 255,
      "lr": 0.02, "recipes": ("fgsm-rs", "odgq"), "bf16": False}),
])
def test_study_flags_keep_their_meaning(argv, expected):
    args = make_parser().parse_args(["study", *argv.split()])
    settings = study_settings(args)
    common = {"out": f"runs/{args.name}-{expected['dataset']}", "quick": False, "resume": False, "seed": 0}
    assert settings == {**common, **expected}


def test_a_flag_of_the_other_study_is_refused(capsys):
    assert main(["study", "dq", "--recipes", "odgq"]) == 2
    assert "unrecognized arguments: --recipes" in capsys.readouterr().err
