"""Transfer, gradient alignment and value shift across precisions (Bernhard et al. 2019's measures), one run.

    python bench/bench_precisions.py                              # digits, ≈ 1 min
    python bench/bench_precisions.py --dataset mnist --n 500      # full MNIST small_cnn, a few minutes

One float model (ReLU6) and its w8a8 / w4a4 / w2a2 / binary copies fine-tuned quantization-aware from it; PGD-20 with
straight-through gradients crafted on each, scored on each (the transfer matrix, on the points both models of a
pair classify correctly); per-sample input-gradient cosine between the float model and each quantized one; the
per-layer quantization value shift. Writes bench/results/precisions_DATASET.json, the heat map and the
alignment histogram beside it.
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
SETUP = {"digits": ("digits_cnn", 0.1, 15, 3, 0.05), "mnist": ("small_cnn", 0.2, 2, 1, 0.05)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="digits", choices=sorted(SETUP))
    p.add_argument("--bits", default="8,4,2,1", help="1 = binary (sign activations, 8-bit first/last layer)")
    p.add_argument("--n", type=int, default=300, help="test images")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QROBUST_NO_PROGRESS", "1")
    from qrobust.analysis import gradient_alignment, plot_alignment, transfer_matrix, value_shift
    from qrobust.attacks import PGD
    from qrobust.data import load_dataset
    from qrobust.models import build_model
    from qrobust.quant import quantize
    from qrobust.studies.odgq import spec_for_bits
    from qrobust.training import fit
    from qrobust.utils import atomic_write_text

    arch, eps, float_epochs, q_epochs, lr = SETUP[args.dataset]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    train, test = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    info = train.info
    m = build_model(arch, in_channels=info.input_shape[0], input_size=info.input_shape[1], mean=info.mean,
                    std=info.std, activation="relu6")
    fit(m, train, epochs=float_epochs, lr=lr)
    models = {"float": m.eval()}
    for b in (int(v) for v in args.bits.split(",")):
        q = quantize(m, spec_for_bits(b))
        fit(q, train, epochs=q_epochs, lr=lr / 5)
        models[f"w{b}a{b}"] = q.eval()
    x, y = test.tensors(n=args.n)
    tm = transfer_matrix(models, x, y, eps=eps, attack_kwargs={"steps": 20})
    align = {f"float vs {k}": gradient_alignment(m, q, x, y) for k, q in models.items() if k != "float"}
    shift = {}
    for k, q in models.items():
        if k == "float":
            continue
        adv = PGD(q, eps=eps, steps=20, seed=0)(x, y)
        shift[k] = value_shift(q, x, adv)
    out = HERE / "results" / f"precisions_{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    tm.plot(out / "transfer_matrix.png", title=f"{info.display_name}: robust accuracy (%) under PGD-20 transfer, "
                                              f"ε = {eps:g}")
    plot_alignment(align, out / "gradient_alignment.png",
                   title=f"{info.display_name}: input-gradient cosine, float vs quantized ({arch})")
    res = {"dataset": args.dataset, "model": arch, "eps": eps, "n": int(x.shape[0]),
           "epochs": {"float": float_epochs, "quantized_fine_tune": q_epochs},
           "transfer": tm.to_dict(),
           "alignment_median": {k: float(v.nanmedian()) for k, v in align.items()},
           "alignment_nan": {k: int(v.isnan().sum()) for k, v in align.items()},
           "value_shift": shift, "wall_time_s": time.perf_counter() - t0}
    atomic_write_text(HERE / "results" / f"precisions_{args.dataset}.json", json.dumps(res, indent=1) + "\n")
    for s_name, row in zip(tm.names, tm.robust):
        print(f"{s_name:>6} → " + "  ".join(f"{t}:{100 * v:5.1f}" for t, v in zip(tm.names, row)))
    print("alignment (median cosine):", {k: round(v, 3) for k, v in res["alignment_median"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
