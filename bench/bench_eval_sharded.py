"""`qrobust eval` in one process and under torchrun with N ranks: wall times, and whether the reports agree.

    python bench/bench_eval_sharded.py [--checkpoint zoo:NAME] [--nproc 2] [--suite standard]
        [--n-queries 1000] [--batch-size 64] [--out bench/results/eval_sharded.json]

Both runs are the same `qrobust eval` command (one thread per process); the torchrun one shares the batches of
every pass among the ranks (qrobust.evaluation.shard). The result records each run's wall time, each attack's
time and whether every per-sample mask, count and accuracy of the two reports is the same (it must be).
The load average before each run says how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qrobust import __version__

ROOT = Path(__file__).resolve().parents[1]


def _numbers(rep: dict) -> dict:
    return {"clean": rep["clean"], "clean_acc": rep["clean_acc"], "robust_acc": rep["robust_acc"],
            "results": [{"robust": r["robust"], "attacks": [
                {k: a[k] for k in ("label", "n_attacked", "n_broken", "robust", "robust_accuracy_after", "stats")}
                for a in r["attacks"]]} for r in rep["results"]],
            "diagnostics": [{k: v for k, v in d.items() if k != "time_s"} for d in rep["diagnostics"]]}


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="zoo:digits-digits_cnn-w4a4-pgd-at")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--suite", default="standard")
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n", type=int, default=None, help="test images (default: the whole test split)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_sharded.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QROBUST_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    eval_args = ["eval", args.checkpoint, "--suite", args.suite, "--n-queries", str(args.n_queries),
                 "--batch-size", str(args.batch_size)] + ([] if args.n is None else ["--n", str(args.n)])
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qrobust-bench-shard-") as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        commands = {
            "single": [sys.executable, "-m", "qrobust.cli", *eval_args, "--out", f"{tmp}/single"],
            # `--` ends torchrun's options: its parser would take eval's --n for an abbreviation of --nnodes
            "sharded": [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                        f"--master_port={port}", "-m", "--", "qrobust.cli", *eval_args, "--out", f"{tmp}/sharded"],
        }
        for name, cmd in commands.items():
            load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            wall = _run(cmd, env)
            rep = json.loads(Path(f"{tmp}/{name}/report.json").read_text())
            runs[name] = {"wall_s": round(wall, 1), "load_average_before": load, "report": rep}
            logging.info("%s: %.1f s, robust %.2f%%", name, wall, 100 * rep["robust_acc"])
    one, many = runs["single"]["report"], runs["sharded"]["report"]
    result = {
        "benchmark": "eval_sharded",
        "checkpoint": args.checkpoint,
        "suite": args.suite,
        "n_queries": args.n_queries,
        "batch_size": args.batch_size,
        "n_examples": one["n_examples"],
        "nproc": args.nproc,
        "cpu_count": os.cpu_count(),
        "identical": _numbers(one) == _numbers(many),
        "clean_acc": one["clean_acc"],
        "robust_acc": {"single": one["robust_acc"], "sharded": many["robust_acc"]},
        "wall_s": {k: v["wall_s"] for k, v in runs.items()},
        "speedup": round(runs["single"]["wall_s"] / runs["sharded"]["wall_s"], 2),
        "attack_time_s": {a["label"]: {"single": round(a["time_s"], 1), "sharded": round(b["time_s"], 1)}
                          for a, b in zip(one["results"][0]["attacks"], many["results"][0]["attacks"])},
        "load_average_before": {k: v["load_average_before"] for k, v in runs.items()},
        "versions": {"qrobust": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    logging.info("identical: %s, speed-up %.2f× with %d ranks → %s", result["identical"], result["speedup"],
                 args.nproc, args.out)
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
