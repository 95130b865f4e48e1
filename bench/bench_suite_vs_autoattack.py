"""qrobust's ``standard`` suite against torchattacks' AutoAttack (``version="standard"``), interleaved in one process.

    python bench/bench_suite_vs_autoattack.py              # w4a4 digits model, the digits test set, ε 0.1

Same model (a digits_cnn trained 10 epochs, fine-tuned w4a4 3 epochs, seed 0), images, ε and one thread; each
evaluation runs ``--repeats`` times alternately and the ratio is of the medians. Both report the per-sample
worst case over their attacks; qrobust's must not be higher. Writes bench/results/suite_vs_autoattack.json with
each attack's share of qrobust's time (the report's own ``time_s`` per attack).
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--suite", default="standard")
    p.add_argument("--out", type=Path, default=HERE / "results" / "suite_vs_autoattack.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    from _models import digits_w4a4, torchattacks_or_none

    torchattacks = torchattacks_or_none()
    if torchattacks is None:
        return 1
    import qrobust
    from qrobust.utils import atomic_write_text

    q, x, y = digits_w4a4()

    def acc(xa: torch.Tensor) -> float:
        with torch.no_grad():
            return float((q(xa).argmax(1) == y).float().mean())

    times: dict[str, list[float]] = {"qrobust": [], "torchattacks": []}
    accs: dict[str, float] = {}
    per_attack: dict[str, float] = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        rep = qrobust.evaluate(q, (x, y), eps=args.eps, suite=args.suite, diagnostics=False)
        times["qrobust"].append(time.perf_counter() - t)
        accs["qrobust"] = rep.robust_accuracy
        per_attack = {a.label: a.time_s for a in rep.result().attacks}
        t = time.perf_counter()
        aa = torchattacks.AutoAttack(q, norm="Linf", eps=args.eps, version="standard", n_classes=10, seed=0)
        accs["torchattacks"] = acc(aa(x, y))
        times["torchattacks"].append(time.perf_counter() - t)
        print(f"qrobust {times['qrobust'][-1]:.1f}s {accs['qrobust']:.4f}  "
              f"AutoAttack {times['torchattacks'][-1]:.1f}s {accs['torchattacks']:.4f}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": "digits_cnn w4a4", "n": int(x.shape[0]), "eps": args.eps, "suite": args.suite,
           "reference": "torchattacks.AutoAttack(version='standard'): APGD-CE, APGD-T, FAB-T, Square 5000",
           "robust_accuracy": accs, "seconds": times, "median_s": med,
           "speedup_over_autoattack": med["torchattacks"] / med["qrobust"],
           "qrobust_time_by_attack_s": per_attack, "threads": 1, "torch": torch.__version__,
           "qrobust_version": qrobust.__version__}
    atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("robust_accuracy", "median_s", "speedup_over_autoattack",
                                          "qrobust_time_by_attack_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
