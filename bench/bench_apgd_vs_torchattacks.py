"""APGD-CE against torchattacks' APGD on the models of tests/test_reference_attacks.py, seed by seed, with controls.

    python bench/bench_apgd_vs_torchattacks.py --models float    # ≈ 3 min on one thread (trains both models)
    python bench/bench_apgd_vs_torchattacks.py --models w4a4     # adds its rows to the same JSON

ε 0.15, 20 iterations, 1 restart, the first 200 MNIST test images, one small_cnn trained for one epoch on 12,000
training images and its w4a4 fine-tune (the test's recipe). Per seed, the robust image counts of

* ``torchattacks`` — which draws its random start only for the images the model classifies correctly;
* ``qrobust_unpaired`` — ours on all 200 (ours draws a start for every image, so after a misclassified image
  the same seed gives each image a different start than torchattacks gives it);
* ``qrobust`` — ours on the correctly classified images only (paired: the same start for each image);
* ``qrobust_no_early_stop`` — paired, every image attacked for all 20 iterations (torchattacks' way);
* ``qrobust_clamp`` — paired, with torchattacks' projection ``clamp(min(max(x', x − ε), x + ε), 0, 1)``, which
  in float32 can leave the ε-ball by an ulp where ours stays inside; ``clamp_disagrees`` counts the images
  where its outcome differs from torchattacks'.

Writes bench/results/apgd_vs_torchattacks.json (one entry per model; a run with ``--models`` keeps the others).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MNIST = HERE.parent / ".." / "shared" / "data" / "mnist"
OUT = HERE / "results" / "apgd_vs_torchattacks.json"


def _models() -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    from qrobust.data import load_dataset
    from qrobust.models import build_model
    from qrobust.quant import quantize
    from qrobust.training import fit

    train = load_dataset("mnist", "train", root=MNIST).subset(12000, seed=0)
    test = load_dataset("mnist", "test", root=MNIST)
    torch.manual_seed(0)
    m = build_model("small_cnn", in_channels=1, input_size=28, mean=list(train.info.mean), std=list(train.info.std))
    fit(m, train, epochs=1, batch_size=128, optimizer="adamw", lr=3e-3, schedule="onecycle")
    torch.manual_seed(0)
    q = quantize(m, "w4a4")
    fit(q, train, epochs=1, batch_size=128, optimizer="adamw", lr=1e-3, schedule="onecycle")
    x, y = test.tensors(n=200)
    return {"float": (m.eval(), x, y), "w4a4": (q.eval(), x, y)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="float,w4a4", help="comma-separated: float, w4a4")
    p.add_argument("--seeds", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    from _models import torchattacks_or_none

    torchattacks = torchattacks_or_none()
    if torchattacks is None:
        return 1
    from qrobust.attacks import APGD
    from qrobust.utils import atomic_write_text

    class ClampedAPGD(APGD):
        def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            assert self.eps is not None
            return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)

    def correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).argmax(1) == y

    settings = {"eps": 0.15, "n_iter": 20, "loss": "ce"}
    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    models = _models()
    for which in args.models.split(","):
        model, x_all, y_all = models[which]
        keep = correct(model, x_all, y_all)
        x, y = x_all[keep], y_all[keep]
        rows: dict[str, list[int]] = {k: [] for k in (
            "torchattacks", "qrobust_unpaired", "qrobust", "qrobust_no_early_stop", "qrobust_clamp", "clamp_disagrees")}
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            ref = torchattacks.APGD(model, eps=0.15, steps=20, loss="ce", n_restarts=1, seed=seed)
            r_ref = correct(model, ref(x, y).detach(), y)
            r_clamp = correct(model, ClampedAPGD(model, seed=seed, **settings)(x, y), y)
            rows["torchattacks"].append(int(r_ref.sum()))
            rows["qrobust_unpaired"].append(int(correct(model, APGD(model, seed=seed, **settings)(x_all, y_all),
                                                        y_all).sum()))
            rows["qrobust"].append(int(correct(model, APGD(model, seed=seed, **settings)(x, y), y).sum()))
            rows["qrobust_no_early_stop"].append(int(correct(
                model, APGD(model, seed=seed, early_stop=False, **settings)(x, y), y).sum()))
            rows["qrobust_clamp"].append(int(r_clamp.sum()))
            rows["clamp_disagrees"].append(int((r_clamp != r_ref).sum()))
        res[which] = {"images": int(x_all.shape[0]), "clean_correct": int(keep.sum()), "seeds": args.seeds,
                      **settings, "restarts": 1, "robust_images": rows,
                      "mean_robust_accuracy_%": {k: round(100 * sum(v) / len(v) / x_all.shape[0], 3)
                                                 for k, v in rows.items() if k != "clamp_disagrees"},
                      "seconds": round(time.perf_counter() - t0, 1), "threads": 1}
        print(which, json.dumps(res[which]["mean_robust_accuracy_%"]), "clamp_disagrees", rows["clamp_disagrees"])
    atomic_write_text(OUT, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
