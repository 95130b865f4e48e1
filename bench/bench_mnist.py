"""Small CNN on full MNIST, 3 epochs each: float, w4a4 and w1a32 (binary weights), trained from scratch.

    python bench/bench_mnist.py          # ≈ 5 min on this 2-core machine

Writes bench/results/mnist_small_cnn.json (test accuracy, epoch time, images/s per model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--specs", default="float,w4a4,w1a32")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QROBUST_NO_PROGRESS", "1")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from qrobust.data import load_dataset
    from qrobust.models import build_model
    from qrobust.quant import quantize
    from qrobust.training import FitConfig, fit
    from qrobust.utils import atomic_write_text

    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    results = {"dataset": "MNIST (60,000 train / 10,000 test)", "model": "small_cnn", "torch_threads": args.threads,
               "runs": {}}
    for spec in args.specs.split(","):
        torch.manual_seed(0)
        model = build_model("small_cnn", in_channels=1, input_size=28, mean=list(train.info.mean),
                            std=list(train.info.std))
        if spec != "float":
            model = quantize(model, spec)
        cfg = FitConfig(epochs=args.epochs, batch_size=128, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                        schedule="onecycle", seed=0)
        t0 = time.perf_counter()
        res = fit(model, train, test=test, config=cfg, out=HERE / "runs" / f"mnist-{spec}", resume=True,
                  metadata={"dataset": "mnist"})
        results["runs"][spec] = {
            "test_acc": res.history[-1]["test_acc"], "epochs": args.epochs,
            "train_time_s": sum(r["epoch_time_s"] for r in res.history), "wall_time_s": time.perf_counter() - t0,
            "images_per_s": sum(r["images_per_s"] for r in res.history) / len(res.history),
            "recipe": cfg.to_dict(), "history": res.history}
        print(spec, results["runs"][spec]["test_acc"], flush=True)
    atomic_write_text(HERE / "results" / "mnist_small_cnn.json", json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
