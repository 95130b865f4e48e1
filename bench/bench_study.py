"""Run a qrobust study and commit-ready copies of its results: bench/results/{study}_{dataset}.json + plots.

    python bench/bench_study.py dq --dataset digits                 # ≈ 2–3 min
    python bench/bench_study.py dq --dataset mnist --bits 1,2,4,32 --betas 3e-3,3e-2 --n-eval 1000
    python bench/bench_study.py odgq --dataset digits
    python bench/bench_study.py threats --dataset cifar10 --keep    # keep its runs for the next session

Extra options are passed to `qrobust study` unchanged (`qrobust study NAME --help` lists them); the run folder
is bench/runs/{study}_{dataset}[_{tag}]. Any registered study works (qrobust.studies.harness.available_studies).

bench/runs/ is not committed: before a session ends with a study unfinished, ``--keep`` (same name, dataset and
tag; other options ignored) copies what each of its training runs needs to continue into
bench/results/{study}_{dataset}[_{tag}]/kept/runs/, to be committed; the next run of the study copies a kept run
back where its folder is missing, and resumes it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from _keep import KEPT_RUNS, copy_file, run_files, show

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
RESULTS = HERE / "results"


def run_folders(out: Path) -> list[Path]:
    """The training runs of the study folder ``out``: every folder under out/runs with a config.json (a run's
    tag may be nested, e.g. the dq study's runs/weights/b4/dq-0.01)."""
    found = (c.parent for c in (out / "runs").rglob("config.json"))
    return sorted(run for run in found if "checkpoints" not in run.relative_to(out).parts)


def keep(name: str) -> list[Path]:
    """Copy what each training run of study folder ``name`` needs to continue into RESULTS/name/kept/runs/RUN,
    its text files naming the runs folder as runs/... instead of this machine's path. A kept run that is not
    here is left as it is. The study's own files (results.json, report.md, figures) are not kept: the harness
    writes them from the runs again, and a finished study's are copied into RESULTS already."""
    out, kept = RUNS / name, RESULTS / name / "kept"
    runs = run_folders(out)
    if not runs:
        raise SystemExit(f"keep: {out / 'runs'} holds no training run (no config.json): run the study first")
    files = []
    for run in runs:
        rel = run.relative_to(out)
        if (kept / rel).exists():
            shutil.rmtree(kept / rel)
        for f in run_files(run):
            copy_file(f, kept / f.relative_to(out), f"{RUNS.resolve()}/", KEPT_RUNS)
            files.append(kept / f.relative_to(out))
    return files


def restore(name: str) -> list[Path]:
    """Copy each kept run of study folder ``name`` back into RUNS/name where its run folder is missing (an
    existing one is never overwritten); returns the run folders restored."""
    out, kept = RUNS / name, RESULTS / name / "kept"
    restored = []
    for src in run_folders(kept) if kept.is_dir() else []:
        dst = out / src.relative_to(kept)
        if dst.exists():
            continue
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            copy_file(f, dst / f.relative_to(src), f"{KEPT_RUNS}{name}/", f"{RUNS.resolve()}/{name}/")
        print(f"restored {dst.relative_to(out)} from {src} into {dst}", flush=True)
        restored.append(dst)
    return restored


def main(argv: list[str] | None = None) -> int:
    from qrobust.cli import main as cli
    from qrobust.studies.harness import available_studies

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=available_studies())
    p.add_argument("--dataset", default="digits")
    p.add_argument("--tag", default="", help="suffix of the result names (for variants)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="copy what the study's training runs need to continue into bench/results/NAME/kept/ "
        "(nothing runs; other options are ignored)",
    )
    args, rest = p.parse_known_args(argv)
    name = f"{args.study}_{args.dataset}{'_' + args.tag if args.tag else ''}"
    if args.keep:
        show(keep(name), HERE.parent)
        return 0
    out = RUNS / name
    restore(name)
    code = cli(["study", args.study, "--dataset", args.dataset, "--out", str(out), "--resume", *rest])
    if code:
        return code
    shutil.copyfile(out / "results.json", RESULTS / f"{name}.json")
    (RESULTS / name).mkdir(exist_ok=True)
    for png in out.glob("*.png"):
        shutil.copyfile(png, RESULTS / name / png.name)
    shutil.copyfile(out / "report.md", RESULTS / name / "report.md")
    print(f"copied to {RESULTS / (name + '.json')} and {RESULTS / name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
