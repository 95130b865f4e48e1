"""qrobust's 2×2 max pool against ``nn.MaxPool2d`` in the work a small CNN does, measured side by side.

    python bench/bench_pool.py                                  # small_cnn w4a4 on MNIST, one thread
    python bench/bench_pool.py --out bench/results/pool_speed.json

Two copies of one small_cnn (MNIST, 100 batches of float training, then w4a4) differ only in their pooling modules:
``nn.MaxPool2d(2)`` and :class:`qrobust.models.layers.MaxPool2d` (the models' default). Each task — inference
(no gradient), a training step, a PGD-10 attack and a 300-query Square attack — runs on both, interleaved
round by round on the same real MNIST test images, and is reported as the median over rounds of
(nn time / ours), with a check that both copies give identical outputs, gradients and adversarial examples.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from qrobust import __version__
from qrobust.attacks import PGD, Square
from qrobust.data import load_dataset
from qrobust.models import build_model
from qrobust.models.layers import MaxPool2d
from qrobust.quant import quantize
from qrobust.training import fit


def with_nn_pools(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose qrobust max pools are plain ``nn.MaxPool2d`` of the same settings."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MaxPool2d):
                setattr(parent, name, nn.MaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation,
                                                   ceil_mode=child.ceil_mode))
    return twin


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="MNIST test images per task")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = load_dataset("mnist", "test").tensors(n=args.n)
    train = load_dataset("mnist", "train")
    float_model = build_model("small_cnn", in_channels=1, input_size=28, mean=train.info.mean, std=train.info.std)
    fit(float_model, train, epochs=1, lr=0.05, max_batches=100)  # robust enough that attacks have work to do
    ours = quantize(float_model, "w4a4")
    models = {"nn.MaxPool2d": with_nn_pools(ours), "qrobust MaxPool2d": ours}

    def infer(m):
        with torch.no_grad():
            return m.eval()(x)

    def train_step(m):
        m.train()
        m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x[:128]), y[:128]).backward()
        return torch.cat([q.grad.flatten() for q in m.parameters() if q.grad is not None])

    def pgd(m):
        return PGD(m, eps=0.3, alpha=0.075, steps=10, seed=0)(x, y)

    def square(m):
        return Square(m, eps=0.3, n_queries=300, seed=0)(x, y)

    tasks = {"inference": infer, "training step": train_step, "pgd-10": pgd, "square-300": square}
    times: dict[str, dict[str, list[float]]] = {t: {k: [] for k in models} for t in tasks}
    identical = {}
    for task, fn in tasks.items():
        results = {}
        for k, m in models.items():  # warm-up, and the outputs to compare
            results[k] = fn(m)
        identical[task] = bool(torch.equal(*results.values()))
        for _ in range(args.rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                fn(m)
                times[task][k].append(time.perf_counter() - t0)
        print(f"{task}: nn {statistics.median(times[task]['nn.MaxPool2d']):.3f} s, ours "
              f"{statistics.median(times[task]['qrobust MaxPool2d']):.3f} s, identical {identical[task]}",
              flush=True)
    speedup = {t: statistics.median(a / b for a, b in zip(v["nn.MaxPool2d"], v["qrobust MaxPool2d"]))
               for t, v in times.items()}
    out = {
        "model": "small_cnn w4a4 (MNIST, 100 float training batches)", "n": args.n, "rounds": args.rounds,
        "threads": args.threads, "speedup_nn_over_ours": speedup, "identical": identical,
        "median_s": {t: {k: statistics.median(s) for k, s in v.items()} for t, v in times.items()},
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "qrobust_version": __version__,
    }
    print(json.dumps({"speedup": speedup, "identical": identical}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
