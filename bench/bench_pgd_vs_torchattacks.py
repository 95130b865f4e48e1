"""PGD-20 robust-accuracy evaluation of ResNet-20 on 1,000 CIFAR-10 (JPEG) test images: qrobust vs torchattacks.

    python bench/bench_pgd_vs_torchattacks.py [--ckpt bench/runs/resnet20-float] [--n 1000] [--eps 8]

Same model, same images, same batch size, same machine and thread count; each library runs in its own fresh
subprocess (so peak memory is its own), alternating, twice. Writes bench/results/pgd_vs_torchattacks.json.
qrobust's speed comes from per-sample early stopping: a point that is misclassified, or already fooled, is
not attacked further, so the cost falls as the batch gets broken; the robust accuracy is the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(lib: str, ckpt: str, n: int, eps: float, batch: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import qrobust
    from qrobust.data import load_dataset

    model = qrobust.load(ckpt)
    x, y = load_dataset("cifar10", "test").tensors(n=n)
    alpha, steps = 2 / 255, 20
    if lib == "qrobust":
        from qrobust.attacks import PGD

        attack = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True, seed=0)
    else:
        import torchattacks

        torch.manual_seed(0)
        attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    correct = 0
    clean = 0
    for i in range(0, n, batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        xa = attack(xb, yb)
        with torch.no_grad():
            correct += (model(xa).argmax(1) == yb).sum().item()
            clean += (model(xb).argmax(1) == yb).sum().item()
    elapsed = time.perf_counter() - t0
    return {"lib": lib, "robust_acc": correct / n, "clean_acc": clean / n, "time_s": elapsed,
            "ms_per_image": 1000 * elapsed / n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_attack_mb": rss0 / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(HERE / "runs" / "resnet20-float"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eps", type=float, default=8.0, help="L∞ ε on the 0–255 scale")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--worker", choices=["qrobust", "torchattacks"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.n, args.eps / 255, args.batch, args.threads)))
        return 0
    runs = []
    for rep in range(args.reps):
        for lib in ("torchattacks", "qrobust"):
            out = subprocess.run([sys.executable, __file__, "--worker", lib, "--ckpt", args.ckpt, "--n", str(args.n),
                                  "--eps", str(args.eps), "--batch", str(args.batch), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["rep"] = rep
            runs.append(r)
            print(r, flush=True)
    best = {lib: min(r["time_s"] for r in runs if r["lib"] == lib) for lib in ("qrobust", "torchattacks")}
    acc = {lib: [r["robust_acc"] for r in runs if r["lib"] == lib] for lib in ("qrobust", "torchattacks")}
    result = {
        "task": f"PGD-20 (eps={args.eps:g}/255, alpha=2/255, random start) on ResNet-20, {args.n} CIFAR-10 (JPEG) "
                "test images",
        "checkpoint": Path(args.ckpt).name, "batch_size": args.batch, "torch_threads": args.threads,
        "best_time_s": best, "speedup_qrobust_over_torchattacks": best["torchattacks"] / best["qrobust"],
        "robust_acc": acc, "peak_rss_mb": {lib: max(r["peak_rss_mb"] for r in runs if r["lib"] == lib)
                                           for lib in ("qrobust", "torchattacks")},
        "runs": runs}
    from qrobust.utils import atomic_write_text

    name = "pgd_vs_torchattacks" + ("" if args.eps == 8 else f"_eps{args.eps:g}")
    atomic_write_text(HERE / "results" / f"{name}.json", json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("best_time_s", "speedup_qrobust_over_torchattacks", "robust_acc")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
