"""Run a qrobust study and commit-ready copies of its results: bench/results/{study}_{dataset}.json + plots.

    python bench/bench_study.py dq --dataset digits                 # ≈ 2–3 min
    python bench/bench_study.py dq --dataset mnist --bits 1,2,4,32 --betas 3e-3,3e-2 --n-eval 1000
    python bench/bench_study.py odgq --dataset digits

Extra options are passed to `qrobust study` unchanged (`qrobust study NAME --help` lists them); the run folder
is bench/runs/{study}_{dataset}[_{tag}]. Any registered study works (qrobust.studies.harness.available_studies).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    from qrobust.cli import main as cli
    from qrobust.studies.harness import available_studies

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=available_studies())
    p.add_argument("--dataset", default="digits")
    p.add_argument("--tag", default="", help="suffix of the result names (for variants)")
    args, rest = p.parse_known_args()
    name = f"{args.study}_{args.dataset}{'_' + args.tag if args.tag else ''}"
    out = HERE / "runs" / name
    code = cli(["study", args.study, "--dataset", args.dataset, "--out", str(out), "--resume", *rest])
    if code:
        return code
    results = HERE / "results"
    shutil.copyfile(out / "results.json", results / f"{name}.json")
    (results / name).mkdir(exist_ok=True)
    for png in out.glob("*.png"):
        shutil.copyfile(png, results / name / png.name)
    shutil.copyfile(out / "report.md", results / name / "report.md")
    print(f"copied to {results / (name + '.json')} and {results / name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
