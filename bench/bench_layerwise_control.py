"""Why does the Lipschitz criterion of the layerwise study (#12) not rank ResNet-20's layers? A control that tells
the explanations apart, on the study's own measurements.

    python bench/bench_layerwise_control.py            # reads bench/results/layerwise_cifar10.json, ~5 min
    python bench/bench_layerwise_control.py --results bench/results/layerwise_mnist.json

The criterion is ``c_l(s) = T_l · ‖ΔW_l(s)‖_op · E‖h_{l−1}(x+δ)‖`` with ``T_l`` a Lipschitz bound of the rest of
the network after layer ``l``. On CIFAR-10 it ranks the settings *of one layer* well (their ``T_l`` is shared) but
not the layers against each other. Candidate explanations, each with the criterion that would fix it:

* the bound ``T_l`` is the culprit — a product of per-layer operator norms, loose by orders of magnitude that
  grow with depth. Controls: ``T_l`` = the residual-aware bound (:func:`qrobust.analysis.lipschitz.
  downstream_lipschitz`), and ``T_l`` = the *local* gain of the rest of the network at the adversarial
  calibration points (the spectral norm of its Jacobian, per sample by power iteration, averaged) — a
  data-dependent Lipschitz constant, no longer a bound;
* the first-order logit change itself is the wrong proxy for the adversarial loss. Control: the measured logit
  change ``E‖f_s(x+δ) − f(x+δ)‖₂`` of the network with that one layer quantized (what the bound bounds);
* no depth weighting at all: ``T_l`` = 1.

Each is scored by Spearman's ρ against the study's measured adversarial-loss increase (PGD-10 on its
consistency images): over all single-layer settings, and across layers at each fixed (bits, clip). Results:
bench/results/layerwise_control_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import qrobust
from qrobust.analysis.allocation import _inputs_outputs, _q_error, local_gain
from qrobust.analysis.lipschitz import conv_spectral_norm, downstream_lipschitz, lipschitz_table, matrix_spectral_norm
from qrobust.attacks import PGD
from qrobust.data import load_dataset
from qrobust.models.introspect import weight_layers
from qrobust.quant import QuantSpec, quantize

HERE = Path(__file__).resolve().parent


def rho(a: list[float], b: list[float]) -> float:
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(HERE / "results" / "layerwise_cifar10.json"))
    ap.add_argument("--natural", default="zoo:cifar10-resnet20-float-natural")
    ap.add_argument("--adversarial", default="zoo:cifar10-resnet20-float-fgsm-rs")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-gain", type=int, default=64, help="calibration images for the local gain")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = json.loads(Path(args.results).read_text())
    s = res["settings"]
    eps, dataset = s["eps"], s["dataset"]
    cx, cy = load_dataset(dataset, "train").subset(s["n_calib"], seed=s["seed"]).tensors()
    parents = {"natural": args.natural, "pgd-at": args.adversarial}
    t0 = time.perf_counter()
    out: dict = {"results": Path(args.results).name, "parents": parents, "eps": eps, "n_calib": len(cy),
                 "n_gain": args.n_gain, "by_parent": {}}
    for p, src in parents.items():
        net = qrobust.load(src).eval()
        layers = weight_layers(net)
        x_adv = PGD(net, eps=eps, steps=s["budget"]["calib_steps"], seed=s["seed"])(cx, cy)
        ins, _ = _inputs_outputs(net, layers, x_adv)
        rows = lipschitz_table(net)
        body = [r for r in rows if r["kind"] != "network"]
        names = [r["name"] for r in body]
        residual = downstream_lipschitz(net, rows=rows)
        with torch.no_grad():
            f_adv = net(x_adv)
        tails = {}
        for n, m in layers:
            tails[n] = {"product": math.prod(r["lipschitz"] for r in body[names.index(n) + 1:]),
                        "residual": residual[n], "local": local_gain(net, m, x_adv[:args.n_gain], seed=0)}
        settings = res["consistency"][p]["settings"]
        crit: dict[str, list[float]] = {k: [] for k in ("product", "residual", "local", "none", "logit_change")}
        mods = dict(layers)
        for st in settings:
            n, m = st["layer"], mods[st["layer"]]
            d = _q_error(m.weight.detach(), st["bits"], st["clip_ratio"])
            op = conv_spectral_norm(m, tuple(ins[n].shape[1:]), 30, weight=d) if isinstance(m, torch.nn.Conv2d) \
                else matrix_spectral_norm(d)
            local = op * float(ins[n].flatten(1).norm(dim=1).mean())
            for k in ("product", "residual", "local"):
                crit[k].append(tails[n][k] * local)
            crit["none"].append(local)
            ov = {"weight_bits": st["bits"], **({"weight_clip": st["clip_ratio"]} if st["clip_ratio"] != 1.0 else {})}
            q = quantize(net, QuantSpec(weight_bits=32, act_bits=32, overrides={n: ov})).eval()
            with torch.no_grad():
                crit["logit_change"].append(float((q(x_adv) - f_adv).norm(dim=1).mean()))
        measured = [st["loss_increase"] for st in settings]
        stored = [st["cost"]["lipschitz"] for st in settings]
        fixed = sorted({(st["bits"], st["clip"]) for st in settings})
        summary = {}
        for k, v in [("study (stored)", stored), *crit.items()]:
            across = [rho([v[i] for i, st in enumerate(settings) if (st["bits"], st["clip"]) == f],
                          [measured[i] for i, st in enumerate(settings) if (st["bits"], st["clip"]) == f])
                      for f in fixed]
            within = [rho([v[i] for i, st in enumerate(settings) if st["layer"] == n],
                          [measured[i] for i, st in enumerate(settings) if st["layer"] == n]) for n in mods]
            summary[k] = {"rho_all": rho(v, measured), "rho_across_layers_median": float(np.nanmedian(across)),
                          "rho_across_layers": dict(zip([f"{b}/{c}" for b, c in fixed], across)),
                          "rho_within_layer_median": float(np.nanmedian(within))}
            print(f"{p:8s} {k:15s} ρ all {summary[k]['rho_all']:+.2f}   across layers (median over "
                  f"{len(fixed)} settings) {summary[k]['rho_across_layers_median']:+.2f}   within a layer "
                  f"{summary[k]['rho_within_layer_median']:+.2f}", flush=True)
        out["by_parent"][p] = {"summary": summary,
                               "log10_tails": {n: {k: math.log10(v) for k, v in t.items()} for n, t in tails.items()}}
    out["wall_time_s"] = round(time.perf_counter() - t0, 1)
    dest = HERE / "results" / f"layerwise_control_{dataset}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest.relative_to(HERE.parent)} ({out['wall_time_s']} s)")


if __name__ == "__main__":
    main()
