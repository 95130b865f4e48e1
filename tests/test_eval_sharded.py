"""Sharded evaluation under torchrun (2 CPU ranks, gloo): the merged report is the single-process one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qrobust
from qrobust.data import load_dataset
from qrobust.evaluation.shard import Shard
from qrobust.models import build_model
from qrobust.training import fit

SRC = str(Path(qrobust.__file__).resolve().parents[1])
N, BATCH, SEED = 120, 16, 3  # 8 batches: both ranks get several, and an uneven last one
SUITE = ["fgsm", ("pgd", {"steps": 5, "alpha": "eps/4"}), ("square", {"n_queries": 30})]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std)
    m = qrobust.quantize(m, "w4a4")
    fit(m, train, epochs=3, lr=0.05, device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "digits-w4a4.safetensors"
    qrobust.save(m.eval(), path, dataset="digits")
    return path


def _numbers(rep: dict) -> dict:
    """What must not depend on the number of ranks: every mask, count and accuracy (not times, not flags
    of the run itself)."""
    return {
        "clean": rep["clean"], "clean_acc": rep["clean_acc"], "robust_acc": rep["robust_acc"],
        "n": rep["n_examples"],
        "results": [{"eps": r["eps"], "robust": r["robust"], "robust_accuracy": r["robust_accuracy"],
                     "attacks": [{k: a[k] for k in ("label", "settings", "n_attacked", "n_broken", "robust",
                                                    "robust_accuracy", "robust_accuracy_after", "stats")}
                                 for a in r["attacks"]]} for r in rep["results"]],
        "diagnostics": [{k: v for k, v in d.items() if k != "time_s"} for d in rep["diagnostics"]],
    }


@pytest.mark.slow
def test_qrobust_eval_under_torchrun_writes_the_single_process_report(trained, tmp_path, torchrun):
    model = qrobust.load(trained)
    x, y = load_dataset("digits", "test").tensors(n=N)
    ref = qrobust.evaluate(model, (x, y), suite="quick", eps=0.1, batch_size=BATCH, seed=SEED,
                           model_name=str(trained), dataset="digits").to_dict()
    assert 0.2 < ref["robust_acc"] < ref["clean_acc"]  # a mask with both kinds

    out = tmp_path / "eval"
    # `--` ends torchrun's own options: its parser would take eval's --n for an abbreviation of its --nnodes
    torchrun("-m", "--", "qrobust.cli", "eval", str(trained), "--suite", "quick", "--eps", "0.1/1", "--n", str(N),
              "--batch-size", str(BATCH), "--seed", str(SEED), "--out", str(out))
    got = json.loads((out / "report.json").read_text())
    assert _numbers(got) == _numbers(ref)
    assert got["settings"]["ranks"] == 2
    assert not (out / "eval-state.json").exists()  # rank 0 removed it once the report was written


_LIBRARY = """
import json, os, sys
import torch, torch.distributed as dist
import qrobust
from qrobust.data import load_dataset
ckpt, out, n, batch, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
suite = json.loads(sys.argv[6])
model = qrobust.load(ckpt)
data = load_dataset("digits", "test").tensors(n=n)
kw = dict(suite=suite, eps=[0.05, 0.1], batch_size=batch, seed=seed, diagnostics=False)
ex = qrobust.evaluate(model, data, return_examples=True, **kw)
st = qrobust.evaluate(model, data, state_path=os.path.join(out, "eval-state.json"), **kw)
if dist.get_rank() == 0:
    # a call made on one rank only (as in a fit callback) must not wait for the others
    alone = qrobust.evaluate(model, data, distributed=False, **kw)
    x, x_adv, *_ = ex.adversarial_examples(0.1)
    torch.save({"x_adv": x_adv}, os.path.join(out, "examples.pt"))
    for name, rep in (("examples", ex), ("state", st), ("alone", alone)):
        with open(os.path.join(out, name + "-report.json"), "w") as f:
            json.dump(rep.to_dict(), f)
dist.barrier()

# then rank 0 dies in the middle of PGD at the second ε, at its second batch (the batch of round 2)
from qrobust.attacks import PGD
real, calls = PGD.perturb, {"n": 0}
def dying(self, x, y):
    if self.eps == 0.1 and dist.get_rank() == 0:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("rank 0 dies on purpose")
    return real(self, x, y)
PGD.perturb = dying
qrobust.evaluate(model, data, state_path=os.path.join(out, "killed-state.json"), **kw)
"""


@pytest.mark.slow
def test_library_evaluate_under_torchrun_merges_examples_and_state(trained, tmp_path, torchrun):
    """A custom suite with a random black-box attack on the survivors, an ε sweep, kept adversarial
    examples, and a state file that a single process then continues from: the numbers of one process."""
    model = qrobust.load(trained)
    data = load_dataset("digits", "test").tensors(n=N)
    kw = dict(suite=SUITE, eps=[0.05, 0.1], batch_size=BATCH, seed=SEED, diagnostics=False)
    ref = qrobust.evaluate(model, data, return_examples=True, **kw)

    script = tmp_path / "lib_eval.py"
    script.write_text(_LIBRARY)
    r = torchrun("--", str(script), str(trained), str(tmp_path), str(N), str(BATCH), str(SEED), json.dumps(SUITE),
                  check=False)
    assert r.returncode != 0 and "rank 0 dies on purpose" in r.stderr, r.stderr[:3000]
    for name in ("examples", "state", "alone"):
        got = json.loads((tmp_path / f"{name}-report.json").read_text())
        assert _numbers(got) == _numbers(ref.to_dict()), name
    assert torch.equal(torch.load(tmp_path / "examples.pt")["x_adv"], ref.adversarial_examples(0.1)[1])
    assert any(a.n_broken for a in ref.results[1].attacks[1:])  # the survivors' attacks had work to merge

    # the state file the sharded run left: a single process reuses every attack and gets the same numbers
    saved = json.loads((tmp_path / "eval-state.json").read_text())
    assert len(saved["done"]) == 6 and saved["partial"] is None
    again = qrobust.evaluate(model, data, state_path=tmp_path / "eval-state.json", **kw)
    # nothing attacked again: its wall time is the sharded run's (recorded in the state) and a moment more
    assert saved["elapsed_s"] <= again.wall_time_s < saved["elapsed_s"] + 0.5 * ref.wall_time_s
    assert _numbers(again.to_dict()) == _numbers(ref.to_dict())

    # the killed sharded run recorded its finished attacks and the first round of PGD's batches (one per
    # rank): a single process continues from there to the uninterrupted numbers
    killed = json.loads((tmp_path / "killed-state.json").read_text())
    assert len(killed["done"]) == 4  # ε=0.05: fgsm, pgd, square; ε=0.1: fgsm
    assert killed["partial"]["key"].endswith("|pgd-5") and killed["partial"]["batches"] == 2
    resumed = qrobust.evaluate(model, data, state_path=tmp_path / "killed-state.json", **kw)
    assert _numbers(resumed.to_dict()) == _numbers(ref.to_dict())


_FAILING = """
import os, sys
from qrobust.attacks import PGD
from qrobust.cli import main
if os.environ["RANK"] == "1":
    def boom(self, x, y):
        raise RuntimeError("rank 1 fails in the middle of the evaluation")
    PGD.perturb = boom
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_run_instead_of_hanging_it(trained, tmp_path, torchrun):
    """Rank 1 fails while rank 0 waits for its batches: the run must end (no closing barrier after a failure),
    with the failure on stderr and no report written."""
    script = tmp_path / "failing.py"
    script.write_text(_FAILING)
    r = torchrun("--", str(script), "eval", str(trained), "--suite", "quick", "--eps", "0.1/1", "--n", str(N),
                  "--batch-size", str(BATCH), "--no-diagnostics", "--out", str(tmp_path / "ev"), timeout=120,
                  check=False)
    assert r.returncode != 0 and "rank 1 fails in the middle" in r.stderr
    assert not (tmp_path / "ev" / "report.json").exists()


def test_a_single_process_shard_merges_nothing():
    """Outside torchrun the merge is the identity (no process group is needed)."""
    s = Shard()
    local = torch.tensor([1, 0, 2])
    assert not s.active and s.mine(0) and s.mine(7)
    assert s.merge(local, torch.tensor([True, False, True])) is local
    assert s.max(2.5) == 2.5 and s.sum_counts({"a": 1}) == {"a": 1}
