"""Deployment bench: size on disk, agreement, throughput and robustness of exported models (docs/deploy.md).

    python bench/bench_export.py            # ≈ 35 min on this 2-core machine (loaded), one thread
    python bench/bench_export.py --quick    # a smoke run (tiny budgets), results not written

* small_cnn on MNIST: a float model (one epoch on 6,000 training images), w8a8 and w4a4 by post-training
  quantization with calibrated clips; per precision: size on disk (float checkpoint, fake-quant checkpoint,
  ONNX fp32, ONNX integer, packed), the export's agreement with the fake-quant model on 2,000 test images,
  test accuracy of each, throughput and the re-verification (Square, SPSA, transfer from the twin, DIVA) of
  the deployed graph next to its simulation on the same points.
* ResNet-20 on CIFAR-10 (JPEG): the zoo's adversarially trained (FGSM-RS, 15 epochs) models — w8a8 by
  post-training quantization of the float one, w4a4 the quantization-aware one as it ships; the same
  measurements, agreement and accuracy on 1,000 test images, re-verification at ε = 8/255 on 100 of them;
  and each with its residual additions quantized to 8 bits (``add_bits=8``, "+add8"), the graph on which
  onnxruntime runs every convolution but the first and every addition on integers; and w8a8+add8 exported
  with int8 weights everywhere ("-int8w", ``--weight-dtype int8``: exact on CPUs with VNNI, not the default).

Throughput: images per second at batch 1 and 256 of onnxruntime on the integer graph, onnxruntime on the
fp32 graph, torch fp32 and torch fake-quant, *interleaved* in one process (each round times every engine once,
the median of 7 rounds is reported), one intra-op thread everywhere, so the load of other jobs on the
machine hits all engines alike. Results: bench/results/export_mnist_small_cnn.json and
bench/results/export_cifar10_resnet20.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
log = logging.getLogger("bench_export")


def _machine() -> dict[str, Any]:
    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "vnni": _has_vnni(), "load_average": os.getloadavg()}


def _has_vnni() -> bool | None:
    """Whether this CPU has VNNI (u8·s8 dot products without int16 saturation); None where it cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _throughput(engines: dict[str, Any], x: torch.Tensor, *, iters: int, rounds: int) -> dict[str, float]:
    """Median images/s of each engine over ``rounds`` interleaved rounds of ``iters`` calls on batch ``x``."""
    per: dict[str, list[float]] = {k: [] for k in engines}
    with torch.no_grad():
        for fn in engines.values():
            fn(x)  # warm-up
        for _ in range(rounds):
            for name, fn in engines.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn(x)
                per[name].append(iters * x.shape[0] / (time.perf_counter() - t0))
    return {k: round(statistics.median(v), 1) for k, v in per.items()}


def _accuracy(fn: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([fn(xb).argmax(1) for xb in x.split(256)])
    return round(float((pred == y).float().mean()), 4)


def _engines(fp32: torch.nn.Module, onnx_fp32: Any, quantized: dict[str, tuple[torch.nn.Module, Any]]) -> dict:
    def ort(session: Any) -> Any:
        return lambda xb: session.run(["logits"], {"input": xb.numpy()})[0]

    engines = {"onnxruntime fp32": ort(onnx_fp32), "torch fp32": fp32}
    for spec, (fq, session) in quantized.items():
        engines[f"onnxruntime int ({spec})"] = ort(session)
        if not spec.endswith("-int8w"):  # an -int8w export's fake-quant model is the one it was exported beside
            engines[f"torch fake-quant ({spec})"] = fq
    return engines


def _export_all(model, quantized_models: dict[str, torch.nn.Module], agree_x, tmp: Path, *, held_out=None,
                min_agreement: float | None = None, weight_dtypes: dict[str, str] | None = None):
    """Export the float ``model`` (ONNX fp32) and each quantized model (ONNX integer, fake-quant and packed
    checkpoints): sizes on disk, agreement on ``agree_x`` (the calibration images the export checks itself on
    and fits its int32 biases to) and on ``held_out`` images; → (sizes, per-spec results,
    {spec: (model, session)}, the fp32 session)."""
    from qrobust import checkpoint
    from qrobust.export import measure_agreement, onnx_session, save_packed, to_onnx
    from qrobust.quant import quantize

    sizes: dict[str, Any] = {}
    checkpoint.save(model, tmp / "float.safetensors")
    sizes["float checkpoint (safetensors)"] = (tmp / "float.safetensors").stat().st_size
    fp32 = to_onnx(quantize(model, "float"), tmp / "fp32.onnx", calib=agree_x)
    sizes["onnx fp32"] = fp32.info["onnx_bytes"]
    out: dict[str, Any] = {}
    quantized = {}
    for spec, q in quantized_models.items():
        q = q.eval()
        kw = {} if min_agreement is None else {"min_agreement": min_agreement}
        kw["weight_dtype"] = (weight_dtypes or {}).get(spec, "auto")
        res = to_onnx(q, tmp / f"{spec}.onnx", calib=agree_x, **kw)
        checkpoint.save(q, tmp / f"{spec}.safetensors")
        packed = save_packed(q, tmp / f"{spec}.packed.safetensors")
        out[spec] = {"agreement": res.info["agreement"],
                     "size_bytes": {"fake-quant checkpoint": (tmp / f"{spec}.safetensors").stat().st_size,
                                    "onnx integer": res.info["onnx_bytes"], "packed": packed.stat().st_size},
                     "low_bit_storage": res.info["low_bit_storage"], "weight_dtype": kw["weight_dtype"]}
        quantized[spec] = (q, onnx_session(res.path))
        if held_out is not None:
            agree = measure_agreement(q, quantized[spec][1], held_out)
            out[spec]["held_out_agreement"] = {k: agree[k] for k in ("n", "agreement", "disagreements",
                                                                      "max_abs_logit_diff", "mean_abs_logit_diff")}
    return sizes, out, quantized, onnx_session(fp32.path)


def bench_mnist(args, tmp: Path) -> dict[str, Any]:
    from qrobust.data import load_dataset
    from qrobust.models import build_model
    from qrobust.quant import quantize
    from qrobust.training import fit

    train = load_dataset("mnist", "train").subset(2000 if args.quick else 6000, seed=0)
    test = load_dataset("mnist", "test")
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, input_size=28, mean=list(train.info.mean),
                        std=list(train.info.std))
    t0 = time.perf_counter()
    fit(model, train, epochs=1, lr=0.05, batch_size=128, seed=0)
    train_s = time.perf_counter() - t0
    log.info("mnist: float model trained in %.0f s", train_s)
    model.eval()
    x, y = test.tensors(500 if args.quick else 2000)
    specs = ("w8a8", "w4a4")
    calib = train.tensors(512)[0]
    sizes, per_spec, quantized, onnx_fp32 = _export_all(
        model, {spec: quantize(model, spec, calibrate=calib) for spec in specs}, x, tmp,
        held_out=test.tensors(1000 if args.quick else 4000)[0][len(x):])
    result: dict[str, Any] = {
        "model": "small_cnn", "dataset": "MNIST (6,000 training images, 1 epoch; test: first 2,000)",
        "float_train_s": round(train_s, 1), "float_test_accuracy": _accuracy(model, x, y),
        "size_bytes": sizes, "precisions": per_spec,
    }
    _test_accuracy(per_spec, quantized, x, y)
    log.info("mnist: exported and measured sizes/agreement")
    engines = _engines(model, onnx_fp32, quantized)
    rounds = 2 if args.quick else 7
    t0 = time.perf_counter()
    result["throughput_images_per_s"] = {
        "batch 1": _throughput(engines, x[:1], iters=20 if args.quick else 100, rounds=rounds),
        "batch 256": _throughput(engines, x[:256], iters=1 if args.quick else 2, rounds=rounds),
    }
    log.info("mnist: throughput in %.0f s", time.perf_counter() - t0)
    eps, n = 0.1, (40 if args.quick else 100)
    result["reverify"] = {"eps": eps, "n": n, "note": "a naturally trained model: ε = 0.1 (not MNIST's customary "
                          "0.3, where every model here is at 0 %) so the comparison has points to compare"}
    _reverify(result["reverify"], quantized, model, x[:n], y[:n], tmp, eps=eps,
              n_queries=100 if args.quick else 200, dataset="mnist")
    return result


def _test_accuracy(per_spec: dict[str, Any], quantized: dict[str, tuple[torch.nn.Module, Any]],
                   x: torch.Tensor, y: torch.Tensor) -> None:
    for spec, (q, session) in quantized.items():
        per_spec[spec]["test_accuracy"] = {
            "torch fake-quant": _accuracy(q, x, y),
            "onnxruntime int": _accuracy(lambda xb, s=session: torch.from_numpy(
                s.run(["logits"], {"input": xb.numpy()})[0]), x, y)}


def _reverify(out: dict[str, Any], quantized: dict[str, tuple[torch.nn.Module, Any]], parent: torch.nn.Module,
              x: torch.Tensor, y: torch.Tensor, tmp: Path, *, eps: float, n_queries: int, dataset: str) -> None:
    """Deployed graph vs its fake-quant twin under the deployed suite (Square, SPSA, transfer, DIVA)."""
    from qrobust.evaluation import reverify
    from qrobust.export import DeployedModel

    for spec, (q, _) in quantized.items():
        t0 = time.perf_counter()
        comp = reverify(DeployedModel(tmp / f"{spec}.onnx"), q, (x, y), eps=eps, parent=parent,
                        n_queries=n_queries, spsa_steps=5, spsa_samples=32, steps=10, dataset=dataset)
        out[spec] = {"rows": comp.rows, "flags": comp.flags, "time_s": round(time.perf_counter() - t0, 1)}
        log.info("%s: reverify %s in %.0f s", dataset, spec, time.perf_counter() - t0)


def bench_resnet(args, tmp: Path) -> dict[str, Any]:
    import qrobust
    from qrobust.data import load_dataset
    from qrobust.quant import quantize, quantize_additions

    float_name, w4_name = "zoo:cifar10-resnet20-float-fgsm-rs", "zoo:cifar10-resnet20-w4a4-fgsm-rs"
    model = qrobust.load(float_name).eval()
    w4a4 = qrobust.load(w4_name).eval()
    train = load_dataset("cifar10", "train").subset(1000, seed=0)
    test = load_dataset("cifar10", "test")
    x, y = test.tensors(256 if args.quick else 1000)
    calib = train.tensors()[0]
    # "+add8": the residual additions' operands quantized to 8 bits too (add_bits; docs/deploy.md), so that
    # onnxruntime runs every convolution but the first and every addition on integers — a different function,
    # whose accuracy and robustness are measured here like the others'
    w8_add8 = quantize(model, "w8a8,add_bits=8", calibrate=calib)
    # "-int8w": the same fake-quant model exported with int8 weights after its 8-bit activations too (--weight-dtype
    # int8): exact on a CPU with VNNI (this one) and faster, but saturating on x86 without VNNI, so not the default
    quantized_models = {"w8a8": quantize(model, "w8a8", calibrate=calib), "w4a4": w4a4, "w8a8+add8": w8_add8,
                        "w8a8+add8-int8w": w8_add8, "w4a4+add8": quantize_additions(w4a4, 8, calibrate=calib)}
    sizes, per_spec, quantized, onnx_fp32 = _export_all(model, quantized_models, x, tmp / "r",
                                                        held_out=test.tensors(2 * len(x))[0][len(x):],
                                                        weight_dtypes={"w8a8+add8-int8w": "int8"})
    _test_accuracy(per_spec, quantized, x, y)
    for spec in ("w8a8", "w4a4"):  # what quantizing the additions changed in the simulation itself
        with torch.no_grad():
            a = torch.cat([quantized[spec][0](b).argmax(1) for b in x.split(256)])
            b = torch.cat([quantized[f"{spec}+add8"][0](b).argmax(1) for b in x.split(256)])
        per_spec[f"{spec}+add8"]["predictions_changed_vs_float_additions"] = round(float((a != b).float().mean()), 4)
    log.info("resnet: exported and measured sizes/agreement")
    engines = _engines(model, onnx_fp32, quantized)
    rounds = 2 if args.quick else 7
    result: dict[str, Any] = {
        "model": f"resnet20, the zoo's FGSM-RS models: w8a8 = post-training quantization of {float_name} "
                 f"(clips calibrated on 1,000 training images), w4a4 = {w4_name} (quantization-aware); +add8: "
                 "the same with the residual additions' operands quantized to 8 bits (add_bits=8, ranges "
                 "calibrated on the same 1,000 images; w4a4+add8 by quantize_additions of the QAT model)",
        "dataset": f"CIFAR-10 (JPEG); agreement and accuracy on the first {len(y):,} test images",
        "float_test_accuracy": _accuracy(model, x, y),
        "size_bytes": sizes, "precisions": per_spec,
        "throughput_images_per_s": {
            "batch 1": _throughput(engines, x[:1], iters=5 if args.quick else 20, rounds=rounds),
            "batch 256": _throughput(engines, x[:256], iters=1, rounds=rounds),
        },
    }
    log.info("resnet: throughput measured")
    eps, n = 8 / 255, (16 if args.quick else 100)
    result["reverify"] = {"eps": eps, "n": n, "note": "ε = 8/255 on the first test images; budgets cut to fit "
                          "this machine (Square 300 queries, SPSA 5×32, transfer and DIVA 10 steps)"}
    # the -int8w variant is the w8a8+add8 fake-quant model again (only the kernels' weight type differs): its
    # agreement and throughput are measured above, its re-verification would repeat w8a8+add8's
    _reverify(result["reverify"], {k: v for k, v in quantized.items() if not k.endswith("-int8w")}, model,
              x[:n], y[:n], tmp / "r", eps=eps, n_queries=60 if args.quick else 300, dataset="cifar10")
    return result


def _speedups(result: dict[str, Any]) -> None:
    for batch, row in result["throughput_images_per_s"].items():
        base = row["torch fp32"]
        result.setdefault("speedup_vs_torch_fp32", {})[batch] = {k: round(v / base, 2) for k, v in row.items()}


def main() -> None:
    from qrobust.utils import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets, nothing written")
    p.add_argument("--only", choices=["mnist", "resnet"], default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "r").mkdir()
        for key, fn, name in (("mnist", bench_mnist, "export_mnist_small_cnn.json"),
                              ("resnet", bench_resnet, "export_cifar10_resnet20.json")):
            if args.only and args.only != key:
                continue
            t = time.perf_counter()
            result = fn(args, tmp)
            _speedups(result)
            result["machine"] = _machine()
            result["wall_time_s"] = round(time.perf_counter() - t, 1)
            text = json.dumps(result, indent=2)
            if args.quick:
                print(text)
            else:
                atomic_write_text(RESULTS / name, text + "\n")
                print(f"{name}: {result['wall_time_s']} s")
                print(json.dumps({"throughput": result["throughput_images_per_s"],
                                  "speedup": result["speedup_vs_torch_fp32"]}, indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
