"""ResNet-20 on CIFAR-10 (JPEG): float training, w4a4 fine-tuning from it, and the QAT overhead per epoch.

    python bench/bench_cifar_resnet20.py float      # ≈ 30–40 min on this 2-core machine
    python bench/bench_cifar_resnet20.py w4a4       # fine-tunes from the float run, ≈ 10–15 min
    python bench/bench_cifar_resnet20.py overhead   # float vs w4a4 epoch cost, measured in one process

Each stage merges its numbers into bench/results/cifar_resnet20.json. Run folders go to bench/runs/ (not
committed); the float checkpoint there is the starting point of the other studies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / "runs"
RESULTS = HERE / "results" / "cifar_resnet20.json"


def _merge(key: str, value: dict) -> None:
    from qrobust.utils import atomic_write_text

    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    data["dataset"] = "CIFAR-10 (JPEG), 50,000 train / 10,000 test"
    data[key] = value
    atomic_write_text(RESULTS, json.dumps(data, indent=2))


def _data():
    from qrobust.data import load_dataset

    return load_dataset("cifar10", "train"), load_dataset("cifar10", "test")


def stage_float(args) -> None:
    from qrobust.models import build_model
    from qrobust.training import FitConfig, fit

    train, test = _data()
    torch.manual_seed(0)
    model = build_model("resnet20", mean=list(train.info.mean), std=list(train.info.std))
    cfg = FitConfig(epochs=args.epochs, batch_size=128, lr=args.lr, schedule="onecycle", weight_decay=5e-4,
                    bf16=args.bf16, seed=0)
    t0 = time.perf_counter()
    res = fit(model, train, test=test, config=cfg, out=WORK / "resnet20-float", resume=True,
              metadata={"dataset": "cifar10"})
    wall = time.perf_counter() - t0
    _merge("float", {"test_acc": res.history[-1]["test_acc"], "epochs": cfg.epochs,
                     "train_time_s": sum(r["epoch_time_s"] for r in res.history), "wall_time_s": wall,
                     "images_per_s": sum(r["images_per_s"] for r in res.history) / len(res.history),
                     "recipe": cfg.to_dict(), "history": res.history})


def stage_w4a4(args) -> None:
    import qrobust
    from qrobust.quant import quantize
    from qrobust.training import FitConfig, fit

    train, test = _data()
    model = quantize(qrobust.load(WORK / "resnet20-float").train(), "w4a4")
    cfg = FitConfig(epochs=args.epochs, batch_size=128, lr=args.lr, schedule="cosine", weight_decay=5e-4,
                    bf16=args.bf16, seed=0)
    t0 = time.perf_counter()
    res = fit(model, train, test=test, config=cfg, out=WORK / "resnet20-w4a4", resume=True,
              metadata={"dataset": "cifar10", "init": "resnet20-float"})
    wall = time.perf_counter() - t0
    _merge("w4a4_finetune", {"test_acc": res.history[-1]["test_acc"], "epochs": cfg.epochs, "spec": "w4a4",
                             "train_time_s": sum(r["epoch_time_s"] for r in res.history), "wall_time_s": wall,
                             "recipe": cfg.to_dict(), "history": res.history})


def stage_overhead(args) -> None:
    """Float vs w4a4 training cost on identical batches, alternated (f, q, f, q, …) so drift cancels."""
    from qrobust.data import BatchLoader
    from qrobust.models import build_model
    from qrobust.quant import quantize
    from qrobust.training import FitConfig, make_optimizer

    train, _ = _data()
    loader = BatchLoader(train, 128, shuffle=True, augment=True, seed=0)
    loader.set_epoch(0)
    batches = []
    for i, b in enumerate(loader):
        if i >= args.batches:
            break
        batches.append(b)
    out = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        f = build_model("resnet20")
        models = {"float": f, "w4a4": quantize(f, "w4a4")}
        opts = {k: make_optimizer(m, FitConfig()) for k, m in models.items()}
        times = {k: 0.0 for k in models}
        for rep in range(args.reps):
            for k, m in models.items():
                m.train()
                t0 = time.perf_counter()
                for x, y in batches:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = torch.nn.functional.cross_entropy(m(x), y)
                    opts[k].zero_grad(set_to_none=True)
                    loss.float().backward()
                    opts[k].step()
                if rep > 0:  # the first repetition warms up
                    times[k] += time.perf_counter() - t0
        n_img = (args.reps - 1) * sum(len(y) for _, y in batches)
        out["bf16" if bf16 else "fp32"] = {
            "float_images_per_s": n_img / times["float"], "w4a4_images_per_s": n_img / times["w4a4"],
            "w4a4_over_float": times["w4a4"] / times["float"]}
        print(("bf16" if bf16 else "fp32"), out["bf16" if bf16 else "fp32"], flush=True)
    _merge("overhead", {"batches": args.batches, "batch_size": 128, "reps": args.reps,
                        "method": "alternating float/w4a4 passes over the same batches in one process", **out})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["float", "w4a4", "overhead"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QROBUST_NO_PROGRESS", "1")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.stage == "float":
        args.epochs, args.lr = args.epochs or 18, args.lr or 0.2
        stage_float(args)
    elif args.stage == "w4a4":
        args.epochs, args.lr = args.epochs or 5, args.lr or 0.01
        stage_w4a4(args)
    else:
        stage_overhead(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
