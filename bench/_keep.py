"""Keeping a training run across sessions, for the bench scripts that train for hours (bench_cifar_full.py's
``keep`` stage, bench_study.py's ``--keep``).

On a machine whose scratch space does not outlive the session only the committed checkout survives, and
bench/runs/ is not committed. Keeping a run copies what it needs to continue — config.json, metrics.jsonl,
final.safetensors or else only the newest epoch checkpoint (weights, optimizer and RNG state) — into
bench/results/, to be committed; restoring copies it back. ``qrobust.training.fit(..., resume=True)`` continues
the kept epoch checkpoint, and reuses a kept final.safetensors as the finished run it is. In the text files
this machine's path of the runs folder is written as :data:`KEPT_RUNS`, and restoring puts the local path back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

#: how kept text files name the runs folder: relative, never this machine's path
KEPT_RUNS = "runs/"
#: the files whose text names paths (reports, state, config, metrics); checkpoints are copied byte for byte
TEXT = (".json", ".jsonl", ".md")


def copy_file(src: Path, dst: Path, old: str, new: str) -> None:
    """Copy one file; in a text file the runs folder's path ``old`` becomes ``new``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix in TEXT and src.parent.name != "checkpoints":
        dst.write_text(src.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    else:
        shutil.copy2(src, dst)


#: the largest file a keep copies into the repository (the project keeps checkpoints out of git above 2 MB:
#: a ResNet-20 epoch checkpoint with optimizer state is 2.2 MB, an ODG-Q one carries its perturbation
#: bank — 240 MB for CIFAR-10 — which does not belong in git; a finished ResNet-20 is 1.1 MB, a WRN-16-2 2.8 MB)
MAX_BYTES = 2_000_000


def run_files(run: Path) -> list[Path]:
    """What the run folder ``run`` needs to continue: config.json and metrics.jsonl (where there), and
    final.safetensors where the run finished, else its newest epoch checkpoint (by epoch number). A file above
    :data:`MAX_BYTES` is refused (SystemExit naming it and where to keep it), never committed by accident."""
    from qrobust.checkpoint import FINAL_NAME, epoch_checkpoints

    files = [f for f in (run / "config.json", run / "metrics.jsonl") if f.exists()]
    files += [run / FINAL_NAME] if (run / FINAL_NAME).exists() else epoch_checkpoints(run)[-1:]
    for f in files:
        if f.stat().st_size > MAX_BYTES and f.name == FINAL_NAME:
            raise SystemExit(f"keep: {f} is {f.stat().st_size / 1e6:.1f} MB, above the {MAX_BYTES / 1e6:.0f} MB "
                             "a kept model may have (a wider network's): keep its run folder on storage that "
                             "outlives the machine (--runs ../shared/runs), not in git")
        if f.stat().st_size > MAX_BYTES:
            raise SystemExit(f"keep: {f} is {f.stat().st_size / 1e6:.1f} MB, too large to commit (an epoch "
                             "checkpoint holds optimizer state, ODG-Q's its perturbation bank): let the run "
                             "finish — final.safetensors is small — or keep it outside git")
    return files


def show(files: list[Path], root: Path) -> None:
    """Print each kept file (relative to ``root`` where it lies under it) and its size."""
    for f in files:
        print(f"kept {f.relative_to(root) if f.is_relative_to(root) else f} ({f.stat().st_size / 1e6:.2f} MB)")
