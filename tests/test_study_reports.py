"""Every committed study report (bench/results/NAME/report.md) re-renders byte-identically from its JSON.

Baseline before the study harness: the then-current ``_report`` functions reproduced dq_cifar10_fold,
odgq_digits_3ep, odgq_mnist and odgq_cifar10 but not the five studies committed before later report changes —
dq_digits and dq_mnist (no BN-factor or BN-folded columns then), dq_digits_adv (run before the header named
the training subset and transfer-source epochs), dq_cifar10 (before the BN-folded column) and odgq_digits
(before "random initialisation", when the settings had no ``init``). The renderers now show what each
generation of results carries, so all nine match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qrobust.cli import main
from qrobust.studies.harness import get_study, load_results, paired_test, render_results, significant, study_of

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
COMMITTED = ["dq_digits", "dq_mnist", "dq_cifar10", "dq_cifar10_fold", "dq_digits_adv", "odgq_digits",
             "odgq_digits_3ep", "odgq_mnist", "odgq_cifar10"]


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_report_re_renders_identically(name):
    results = load_results(RESULTS / f"{name}.json")
    assert study_of(results) is get_study(name.split("_")[0])
    assert render_results(results) == (RESULTS / name / "report.md").read_text()


def test_study_render_command(tmp_path, capsys):
    folder = tmp_path / "odgq_mnist"
    folder.mkdir()
    shutil.copyfile(RESULTS / "odgq_mnist.json", folder / "results.json")
    want = (RESULTS / "odgq_mnist" / "report.md").read_text()
    assert main(["study", "render", str(folder), "--figures"]) == 0
    assert (folder / "report.md").read_text() == want
    for png in ("robustness_vs_cost.png", "attacks.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["study", "render", str(RESULTS / "dq_digits.json"), "--out", "-"]) == 0
    assert capsys.readouterr().out == (RESULTS / "dq_digits" / "report.md").read_text()


def test_render_rejects_what_is_not_a_study(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"format": "something-else/1"}))
    assert main(["study", "render", str(tmp_path)]) == 1
    assert "no known study" in capsys.readouterr().err
    assert main(["study", "render", str(tmp_path / "nowhere")]) == 1


def _discordant(diff: float, z: float, n: int) -> tuple[int, int]:
    """The discordant counts (b, c) of a committed comparison, recovered from its accuracy difference
    (b − c = diff·n) and McNemar's z = (b − c)/√(b + c)."""
    d = round(diff * n)
    if d == 0:
        return 0, 0  # b = c: the total does not matter, p = 1 either way
    total = round((d / z) ** 2)
    b, c = (total + d) // 2, (total - d) // 2
    assert b - c == d and abs(d / (b + c) ** 0.5 - z) < 1e-9
    return b, c


def test_exact_test_on_the_committed_comparisons():
    """Redo every committed paired comparison with the exact test: the one significance that changes is
    dq_cifar10's 1-bit DQ β=0.003 vs vanilla (16 vs 6 discordant samples: z = 2.13 but p = 0.053), so that
    study's claim 3 (best β = 0.003) would read "… 0 significant" instead of "1 significant"; every other
    verdict, and every ODG-Q comparison, is the same under both rules."""
    changed = []
    for name in COMMITTED:
        res = load_results(RESULTS / f"{name}.json")
        n = res["settings"]["n_eval"]
        if name.startswith("dq"):
            cl = res["claims"]
            comps = list(cl["1"]["comparisons"]) + list(cl["4"].get("comparisons", []))
            comps += [c[k] for v in cl["3"]["per_beta"].values() for c in v["comparisons"] for k in ("vs_vanilla",
                                                                                                     "vs_float")]
            pairs = [(c["a"], c["b"], c["diff"], c["z"]) for c in comps]
        else:
            pairs = [(f"odgq {b}", k, c[k]["gap"], c[k]["z"]) for b, c in res["claims"].items()
                     for k in ("vs_fgsm_rs", "vs_pgd_at") if k in c]
        for a, b, diff, z in pairs:
            only_a, only_b = _discordant(diff, z, n)
            test = paired_test(torch.tensor([True] * only_a + [False] * only_b),
                               torch.tensor([False] * only_a + [True] * only_b))
            assert test["z"] == pytest.approx(z)
            if (diff > 0 and z > 1.96) != (diff > 0 and significant(test)) or (abs(z) > 1.96) != (test["p"] < 0.05):
                changed.append((name, a, b, only_a, only_b, round(test["p"], 4)))
    assert changed == [("dq_cifar10", "w32a1 dq-0.003", "w32a1 vanilla", 16, 6, 0.0525)]
