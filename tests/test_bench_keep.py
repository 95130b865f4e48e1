"""bench/bench_study.py --keep and its restore: a study's training runs outlive a session through the committed
bench/results/NAME/kept/, and a restored run resumes (a finished one is reused, a stopped one continues).

A toy study of two real ``fit`` runs on digits (seconds): ``float`` (2 epochs, finishes) and ``w4/b4/ft``
(nested like the dq study's tags; 4 epochs, interrupted in its third). Everything is written under tmp_path.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from qrobust import checkpoint
from qrobust.data import load_dataset
from qrobust.models import build_model
from qrobust.studies import harness
from qrobust.studies.harness import Study, StudyContext, register_study
from qrobust.training import FitConfig

BENCH = Path(__file__).resolve().parents[1] / "bench"
NAME = "keeptoy_digits"
RUNS = {"float": 2, "w4/b4/ft": 4}  # tag -> epochs
INTERRUPT = {"at": None}  # (tag, epoch) whose callback interrupts the run, as a kill would


class _KeepToy(Study):
    name = "keeptoy"
    summary = "two tiny training runs, for bench_study's keep and restore"
    format = "qrobust-keeptoy-study/1"

    def run(self, ctx: StudyContext, *, dataset: str, data_dir: Any = None) -> dict[str, Any]:
        train = load_dataset("digits", "train")
        runs = {}
        for tag, epochs in RUNS.items():
            trained: list[int] = []

            def seen(record: dict, _model: Any, tag: str = tag, trained: list = trained) -> None:
                if INTERRUPT["at"] == (tag, record["epoch"]):
                    raise KeyboardInterrupt
                trained.append(record["epoch"])

            torch.manual_seed(0)
            info = train.info
            net = build_model(
                "digits_cnn", num_classes=10, in_channels=1, input_size=8, mean=list(info.mean), std=list(info.std)
            )
            # the run's own path in its metadata, so that config.json names this machine's runs folder
            res = ctx.fit(
                tag,
                net,
                train,
                objective="ce",
                callbacks=[seen],
                config=FitConfig(epochs=epochs, batch_size=64, max_batches=3, lr=0.05, seed=ctx.seed),
                metadata={"dataset": dataset, "study": "keeptoy", "home": str(ctx.run_dir(tag).resolve())},
            )
            runs[tag] = {"trained": trained, "epochs": [h["epoch"] for h in res.history]}
        return {"format": self.format, "settings": {"dataset": dataset}, "runs": runs}

    def render(self, results: dict[str, Any]) -> str:
        return "# Keep toy\n"


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """bench_study with its bench/ folder moved to tmp_path, and the toy study registered."""
    monkeypatch.syspath_prepend(str(BENCH))
    mod = importlib.import_module("bench_study")
    here = tmp_path / "bench"
    (here / "results").mkdir(parents=True)
    monkeypatch.setattr(mod, "HERE", here)
    monkeypatch.setattr(mod, "RUNS", here / "runs")
    monkeypatch.setattr(mod, "RESULTS", here / "results")
    monkeypatch.setitem(INTERRUPT, "at", None)
    register_study(_KeepToy)
    yield mod
    del harness._REGISTRY["keeptoy"]


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_kept_study_runs_restore_and_resume(bench, capsys):
    out, kept = bench.RUNS / NAME, bench.RESULTS / NAME / "kept"
    INTERRUPT["at"] = ("w4/b4/ft", 3)
    assert bench.main(["keeptoy", "--dataset", "digits"]) == 130  # interrupted in w4/b4/ft's third epoch
    ft = out / "runs" / "w4" / "b4" / "ft"
    assert (out / "runs" / "float" / "final.safetensors").exists() and not (ft / "final.safetensors").exists()
    assert [p.name for p in checkpoint.epoch_checkpoints(ft)] == ["epoch_001.safetensors", "epoch_002.safetensors"]
    (out / "plot.png").write_bytes(b"\x89PNG")  # a study's own output files are not kept
    (out / "results.json").write_text("{}")

    capsys.readouterr()
    assert bench.main(["keeptoy", "--dataset", "digits", "--keep", "--quick", "--n-eval", "9"]) == 0
    printed = capsys.readouterr().out
    want = {
        "runs/float/config.json",
        "runs/float/metrics.jsonl",
        "runs/float/final.safetensors",
        "runs/w4/b4/ft/config.json",
        "runs/w4/b4/ft/metrics.jsonl",
        "runs/w4/b4/ft/checkpoints/epoch_002.safetensors",
    }
    assert {p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()} == want
    lines = printed.splitlines()
    for rel in want:  # each file and its size
        shown = (kept / rel).relative_to(bench.HERE.parent)
        assert any(line.startswith(f"kept {shown} (") and line.endswith(" MB)") for line in lines), printed
    local = str(bench.RUNS.resolve())
    for rel in want:
        if rel.endswith((".json", ".jsonl")):
            assert local not in (kept / rel).read_text(encoding="utf-8"), f"{rel} names this machine's runs folder"
    config = json.loads((kept / "runs/w4/b4/ft/config.json").read_text())
    assert config["home"] == f"runs/{NAME}/runs/w4/b4/ft"  # this machine's path, written relative

    originals = {rel: _digest(out / rel) for rel in want}
    final_float = checkpoint.read_tensors(out / "runs/float/final.safetensors")[0]
    shutil.rmtree(bench.RUNS)  # the next session: no bench/runs/
    restored = bench.restore(NAME)
    assert sorted(p.relative_to(out).as_posix() for p in restored) == ["runs/float", "runs/w4/b4/ft"]
    # byte for byte what was there: checkpoints as they were, text files with this machine's path put back
    assert {rel: _digest(out / rel) for rel in want} == originals
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == want

    shutil.rmtree(out / "runs" / "float")  # the normal path restores what is missing and only that
    INTERRUPT["at"] = None
    capsys.readouterr()
    assert bench.main(["keeptoy", "--dataset", "digits"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("restored ") == 1 and "restored runs/float from " in printed
    runs = json.loads((bench.RESULTS / f"{NAME}.json").read_text())["runs"]
    assert runs["float"] == {"trained": [], "epochs": [1, 2]}  # finished: reused, not trained again
    assert runs["w4/b4/ft"] == {"trained": [3, 4], "epochs": [1, 2, 3, 4]}  # continued after epoch 2
    reused = checkpoint.read_tensors(out / "runs/float/final.safetensors")[0]
    assert all(torch.equal(final_float[k], reused[k]) for k in final_float)
    assert [json.loads(line)["epoch"] for line in (ft / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_keep_without_runs_says_so(bench):
    with pytest.raises(SystemExit, match="holds no training run"):
        bench.main(["keeptoy", "--dataset", "digits", "--keep"])
    assert bench.restore(NAME) == []  # nothing kept: nothing restored


def test_keep_refuses_what_is_too_large_to_commit(tmp_path, monkeypatch):
    """A finished model up to MAX_BYTES is kept (a ResNet-20's 1.1 MB); one above it (a WRN-16-2's 2.8 MB),
    and an epoch checkpoint above it, are refused with a message naming the file and where to keep it."""
    import sys

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("_keep", None)
    keep = importlib.import_module("_keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    final = run / "final.safetensors"
    final.write_bytes(b"0" * 1_100_000)
    assert keep.run_files(run) == [run / "config.json", final]
    final.write_bytes(b"0" * 2_800_000)
    with pytest.raises(SystemExit, match=r"final.safetensors is 2.8 MB, above the 2 MB .*--runs ../shared/runs"):
        keep.run_files(run)
    final.unlink()
    (run / "checkpoints").mkdir()
    epoch = run / "checkpoints" / "epoch_1.safetensors"
    epoch.write_bytes(b"0" * 2_200_000)
    with pytest.raises(SystemExit, match="epoch_1.safetensors is 2.2 MB, too large to commit"):
        keep.run_files(run)
