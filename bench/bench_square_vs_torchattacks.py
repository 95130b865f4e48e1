"""Square (L∞) against torchattacks' Square at the same budget, interleaved in one process, on a w4a4 digits model.

    python bench/bench_square_vs_torchattacks.py            # ≈ 2–3 min on one thread

Same model, images, ε, query budget and one restart; each implementation runs ``--repeats`` times alternately
(timing on a shared machine drifts, so the ratio is of medians measured side by side). Writes
bench/results/square_vs_torchattacks.json: robust accuracy of each (qrobust's must not be higher), seconds and
the time ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    from _models import digits_w4a4, torchattacks_or_none

    torchattacks = torchattacks_or_none()
    if torchattacks is None:
        return 1
    from qrobust.attacks import Square
    from qrobust.utils import atomic_write_text

    q, x, y = digits_w4a4()

    def acc(xa: torch.Tensor) -> float:
        with torch.no_grad():
            return float((q(xa).argmax(1) == y).float().mean())

    times: dict[str, list[float]] = {"qrobust": [], "torchattacks": []}
    accs: dict[str, float] = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        accs["qrobust"] = acc(Square(q, eps=args.eps, n_queries=args.queries, seed=0)(x, y))
        times["qrobust"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = torchattacks.Square(q, eps=args.eps, n_queries=args.queries, n_restarts=1, seed=0)
        accs["torchattacks"] = acc(ref(x, y))
        times["torchattacks"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": "digits_cnn w4a4", "n": int(x.shape[0]), "eps": args.eps, "n_queries": args.queries,
           "robust_accuracy": accs, "seconds": times, "median_s": med,
           "time_ratio_qrobust_over_torchattacks": med["qrobust"] / med["torchattacks"], "threads": 1}
    atomic_write_text(HERE / "results" / "square_vs_torchattacks.json", json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("robust_accuracy", "median_s", "time_ratio_qrobust_over_torchattacks")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
