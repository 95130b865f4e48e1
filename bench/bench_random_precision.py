"""Random-precision inference (Double-Win Quant's idea) on digits, evaluated naively and adaptively.

    python bench/bench_random_precision.py          # ≈ 1–2 min on one thread

One digits_cnn (ReLU6) trained in float, then a RandomPrecision network at 8/4/2 bits (shared weights) fine-tuned
with random-precision training. Naive evaluation (the paper's): PGD-20 on one random draw per step, one random
prediction. Adaptive: PGD-20 with gradients averaged over 3 draws (EOT), APGD-CE on the exact expectation (the
averaged softmax over precisions) and Square, each point counted robust only if 5 repeated predictions are all
correct. Writes bench/results/random_precision_digits.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    torch.set_num_threads(1)
    import qrobust
    from qrobust.data import load_dataset
    from qrobust.defenses import RandomPrecision, RandomPrecisionTraining
    from qrobust.models import build_model
    from qrobust.training import fit
    from qrobust.utils import atomic_write_text

    t0 = time.perf_counter()
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std,
                    activation="relu6")
    fit(m, train, epochs=15, lr=0.05)
    rp = RandomPrecision(m, bits=(8, 4, 2))
    fit(rp, train, objective=RandomPrecisionTraining("ce"), epochs=3, lr=0.01)
    rp.eval()
    x, y = test.tensors(n=300)
    eps = 0.1
    fixed = {}
    for b in rp.bits:
        with rp.fixed(b):
            fixed[f"{b}-bit PGD-20"] = qrobust.evaluate(rp, (x, y), eps=eps, suite=[("pgd", {"steps": 20})],
                                                         diagnostics=False).robust_accuracy
    naive = qrobust.evaluate(rp, (x, y), eps=eps, suite=[("pgd", {"steps": 20})], diagnostics=False)
    adaptive = qrobust.evaluate(rp, (x, y), eps=eps, repeats=5, diagnostics=False, suite=[
        ("pgd", {"label": "pgd-20[eot-3]", "steps": 20, "eot_samples": 3}),
        ("apgd-ce", {"label": "apgd-ce[expectation]", "n_iter": 50, "gradients": "surrogate",
                     "surrogate": rp.as_ensemble()}),
        ("square", {"n_queries": 500})])
    res = {"model": "digits_cnn, RandomPrecision(8, 4, 2), random-precision training 3 epochs", "n": 300,
           "eps": eps, "fixed_precision_pgd20": fixed,
           "naive": {"clean": naive.clean_accuracy, "robust": naive.robust_accuracy},
           "adaptive": {"clean": adaptive.clean_accuracy, "robust": adaptive.robust_accuracy,
                        "attacks": {a.label: {"robust_after": a.robust_accuracy_after, "broken": a.n_broken}
                                    for a in adaptive.result().attacks}},
           "wall_time_s": time.perf_counter() - t0}
    atomic_write_text(HERE / "results" / "random_precision_digits.json", json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
