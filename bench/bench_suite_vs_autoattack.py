"""qrobust's ``standard`` suite against torchattacks' AutoAttack (``version="standard"``), interleaved in one process.

    python bench/bench_suite_vs_autoattack.py              # w4a4 digits model, the digits test set, ε 0.1

Same model (a digits_cnn trained 10 epochs, fine-tuned w4a4 3 epochs, seed 0), images, ε and one thread; each
evaluation runs ``--repeats`` times alternately and the ratio is of the medians. All report the per-sample
worst case over their attacks; qrobust's must not be higher. Two references: torchattacks' AutoAttack as it
ships (its APGD, APGD-T and FAB-T default to 10 iterations) and the same four attacks at the settings of the
AutoAttack paper and of qrobust's suite (100 iterations; Square 5,000 queries in both). Writes
bench/results/suite_vs_autoattack.json with each attack's time on each side (qrobust: the report's own
``time_s``; torchattacks: each member of its MultiAttack timed, with the number of images it was given).
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

    def references() -> dict[str, torch.nn.Module]:
        shipped = torchattacks.AutoAttack(q, norm="Linf", eps=args.eps, version="standard", n_classes=10, seed=0)
        kw = {"norm": "Linf", "eps": args.eps, "seed": 0, "n_restarts": 1}
        paper = torchattacks.MultiAttack([
            torchattacks.APGD(q, loss="ce", steps=100, **kw),
            torchattacks.APGDT(q, steps=100, n_classes=10, **kw),
            torchattacks.FAB(q, steps=100, multi_targeted=True, n_classes=10, **kw),
            torchattacks.Square(q, n_queries=5000, **kw)])
        return {"torchattacks": shipped, "torchattacks_100": paper}

    def timer(f, name: str, parts: dict):
        def timed(images, labels):
            t0 = time.perf_counter()
            out = f(images, labels)
            parts[name] = {"time_s": round(time.perf_counter() - t0, 2), "n": int(images.shape[0])}
            return out
        return timed

    def members(ref: torch.nn.Module) -> list:
        return list(getattr(ref, "_autoattack", ref).attacks)

    times: dict[str, list[float]] = {"qrobust": [], "torchattacks": [], "torchattacks_100": []}
    accs: dict[str, float] = {}
    per_attack: dict[str, dict] = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        rep = qrobust.evaluate(q, (x, y), eps=args.eps, suite=args.suite, diagnostics=False)
        times["qrobust"].append(time.perf_counter() - t)
        accs["qrobust"] = rep.robust_accuracy
        per_attack["qrobust"] = {a.label: {"time_s": round(a.time_s, 2), "robust_after": a.robust_accuracy_after}
                                 for a in rep.result().attacks}
        for key, ref in references().items():
            parts: dict[str, dict] = {}
            for atk in members(ref):  # each member timed, with the images MultiAttack hands it
                atk.forward = timer(atk.forward, type(atk).__name__, parts)
            t = time.perf_counter()
            accs[key] = acc(ref(x, y))
            times[key].append(time.perf_counter() - t)
            per_attack[key] = parts
        print("  ".join(f"{k} {v[-1]:.1f}s {accs[k]:.4f}" for k, v in times.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": "digits_cnn w4a4", "n": int(x.shape[0]), "eps": args.eps, "suite": args.suite,
           "reference": "torchattacks.AutoAttack(version='standard') as shipped: APGD-CE, APGD-T, FAB-T at 10 "
                        "iterations each, Square 5000",
           "reference_100": "the same four torchattacks attacks at 100 iterations (the AutoAttack paper's and "
                            "qrobust's setting), Square 5000",
           "robust_accuracy": accs, "seconds": times, "median_s": med,
           "speedup_over_autoattack": med["torchattacks"] / med["qrobust"],
           "speedup_over_autoattack_100": med["torchattacks_100"] / med["qrobust"],
           "time_by_attack_s": per_attack, "threads": 1, "torch": torch.__version__,
           "qrobust_version": qrobust.__version__}
    atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("robust_accuracy", "median_s", "speedup_over_autoattack",
                                          "speedup_over_autoattack_100", "time_by_attack_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
