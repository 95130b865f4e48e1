"""The ``qrobust`` command: a thin shell over the library's public functions.

Usage errors exit 2 with one line on stderr; a missing or corrupt dataset/checkpoint exits 1 with one line.
The command never does something other than asked without saying so: flags that contradict each other (or a
run being resumed) are refused, ε defaults to the dataset's customary threat model (:data:`DEFAULT_EPS`) and
every run states the ε it uses, ``--out`` is checked for writability before any work, ``--seed`` makes a
training bit-for-bit reproducible, and ``qrobust eval`` records its progress so that ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qrobust import checkpoint, zoo
from qrobust._version import __version__
from qrobust.analysis.allocation import DEFAULT_CANDIDATES, METHODS, allocate, check_clips
from qrobust.analysis.amplification import amplification_report
from qrobust.analysis.lipschitz import format_lipschitz_table, lipschitz_table
from qrobust.attacks import ATTACKS, make_attack
from qrobust.checkpoint import check_fits as check_model_fits
from qrobust.data import available_datasets, load_dataset
from qrobust.defenses import OverfitGuard, make_objective
from qrobust.errors import ConfigError, QrobustError
from qrobust.evaluation import RobustnessReport, evaluate, reverify
from qrobust.export import (
    DeployedModel,
    format_onnx_description,
    load_packed,
    load_twin,
    read_onnx_metadata,
    save_packed,
    to_onnx,
)
from qrobust.export.graph import WEIGHT_DTYPES
from qrobust.models import build_model
from qrobust.quant import (
    QuantSpec,
    describe,
    format_description,
    is_quantized,
    quantize,
    quantize_as_saved,
    size_totals,
)
from qrobust.report import save_adversarial_examples
from qrobust.studies.demo import run_demo
from qrobust.studies.harness import (
    DEFAULT_MODEL,
    available_studies,
    get_study,
    load_results,
    render_results,
    run_study,
    save_figure,
    study_of,
)
from qrobust.training import FitConfig, close_process_group, fit, process_group
from qrobust.utils import atomic_write_bytes, default_device, eval_mode, model_device, seed_everything

log = logging.getLogger("qrobust")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage otherwise)
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


#: the customary threat model of each dataset — the ε of its robustness literature and leaderboards (L∞: MNIST
#: 0.3 as in Madry et al., Fashion-MNIST 0.1, CIFAR-10/SVHN 8/255; the 8×8 digits 0.1; L2: MNIST 2, CIFAR-10
#: 0.5 as in RobustBench). What ``train``'s adversarial objectives, ``eval`` and ``attack`` use without an ε;
#: a dataset without an entry needs the ε given.
DEFAULT_EPS: dict[str, dict[str, float]] = {
    "Linf": {"digits": 0.1, "mnist": 0.3, "fashion-mnist": 0.1, "cifar10": 8 / 255, "svhn": 8 / 255},
    "L2": {"mnist": 2.0, "cifar10": 0.5},
}

#: epoch checkpoints ``qrobust train`` keeps unless ``--keep-checkpoints`` says otherwise
KEEP_CHECKPOINTS = 3

EPS_RULE = (
    "a plain number is on the 0–255 pixel scale (8 = 8/255; values between 0 and 1 are refused as ambiguous), "
    "a fraction with a slash is ε itself (8/255, 0.3/1)"
)


# ------------------------------------------------------------------------------------------- helpers
def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer ≥ ``minimum`` (``--n 0`` is a usage error, not an empty run)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (``--budget 0`` or ``nan`` is a usage error, not a failed solve)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def eps_text(eps: float, norm: str = "Linf") -> str:
    """``8/255 (0.0314)`` for L∞, ``0.5`` for L2: how the CLI states the ε it uses."""
    if norm != "Linf":
        return f"{eps:g}"
    return f"{eps * 255:.4g}/255 ({eps:.4g})"


def default_eps(dataset: str, norm: str, flag: str) -> float:
    """The customary ε of ``dataset`` under ``norm`` (:data:`DEFAULT_EPS`); a usage error where there is none."""
    eps = DEFAULT_EPS.get(norm, {}).get(dataset)
    if eps is None:
        example = f"{flag} 8 for 8/255" if norm == "Linf" else f"{flag} 0.5"
        raise UsageError(f"qrobust: {dataset} has no customary {norm} ε: pass {flag} (e.g. {example})")
    return eps


def check_out(path: Path, flag: str = "--out") -> Path:
    """Before any work: ``path`` must be a folder, or a place where one can be made, that this process can write."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"qrobust: {flag} {path} is a file: give a folder (it is created if missing)")
    base = path
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"qrobust: {flag} {path} cannot be created: {base} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise UsageError(f"qrobust: {flag} {path} is not writable ({e.strerror or e}): choose another folder") from e
    return path


def parse_bits(text: str) -> str:
    """``"4"`` → ``"w4a4"``; ``"w4a4"``/``"w1a32"``/``"32"`` pass through (validated by QuantSpec)."""
    t = text.strip().lower()
    if t.isdigit():
        return f"w{t}a{t}"
    return t


def load_data(args: argparse.Namespace, split: str):
    ds = load_dataset(
        args.dataset,
        split,
        root=args.data_dir,
        download=getattr(args, "download", False),
        cache_dir=getattr(args, "cache_dir", None),
    )
    n = getattr(args, f"n_{split}", None)
    if n is not None and n < len(ds):
        ds = ds.subset(n, seed=getattr(args, "seed", 0))
    return ds


def calibration_set(train: Any, n: int, seed: int, dataset: str) -> tuple[Any, Any]:
    """``--calib N``: the (x, y) tensors of ``n`` training images drawn with ``seed``; more than the split holds is
    a one-line error (quantize and a train --init fine-tune share it)."""
    if n > len(train):
        raise UsageError(f"qrobust: --calib {n} exceeds the {len(train)} training images of {dataset}: give at most "
                         f"{len(train)}")
    return train.subset(n, seed=seed).tensors()


def build_for_data(args: argparse.Namespace, train_ds) -> Any:
    """The model the run asks for: from ``--init`` (fine-tuning) or built fresh for the dataset."""
    spec = QuantSpec.parse(parse_bits(args.bits)) if args.bits else None
    if spec is not None:
        spec = spec.with_options(
            **{
                k: v
                for k, v in {
                    "weight_scheme": args.weight_scheme,
                    "act_scheme": args.act_scheme,
                    "first_layer_bits": args.first_last_bits,
                    "last_layer_bits": args.first_last_bits,
                }.items()
                if v is not None
            }
        )
    if args.init:
        model = checkpoint.load(args.init).train()
        if spec is not None and getattr(model, "qrobust_spec", None):
            raise ConfigError(f"--init {args.init} is already quantized; fine-tune from a float checkpoint")
        arch = getattr(model, "qrobust_arch", None) or {}
        for flag, asked, own in (("--model", args.model, arch.get("name")),
                                 ("--activation", args.activation, arch.get("kwargs", {}).get("activation"))):
            if asked is not None and own is not None and asked != own:
                raise UsageError(f"qrobust: --init {args.init} is a {own} checkpoint ({flag} {own}) and sets the "
                                 f"architecture: drop {flag} {asked}, or train a {asked} from scratch without --init")
        check_model_fits(model, train_ds.info, f"--init {args.init}")
    else:
        info = train_ds.info
        model = build_model(
            args.model or DEFAULT_MODEL[args.dataset],
            num_classes=info.num_classes,
            in_channels=info.input_shape[0],
            input_size=info.input_shape[1],
            activation=args.activation or "relu",
            mean=list(info.mean),
            std=list(info.std),
        )
    if spec is not None and not spec.is_float:
        # from scratch, the model learns with the spec's clips: only a trained float parent (--init) can lose
        # accuracy to them, and only then is the range warning true
        if args.init:
            calib = None
            if args.calib:
                calib = calibration_set(train_ds, args.calib, args.seed, args.dataset)[0]
                log.info("activation clips calibrated on %d training images of the --init model", len(calib))
            model = quantize(model, spec, inplace=True, calibrate=calib)
        else:
            model = quantize_as_saved(model, spec)
    return model


def _add_data_args(p: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    p.add_argument(
        "--dataset", default=default, choices=available_datasets(), help="dataset name (default: %(default)s)"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="where the dataset lives (default: search $QROBUST_DATA, ./data, ../shared/data)",
    )
    p.add_argument("--download", action="store_true", help="download mnist/fashion-mnist/cifar10/svhn if missing")
    p.add_argument(
        "--cache-dir", default=None, help="decoded-array cache (default: $QROBUST_CACHE or ~/.cache/qrobust)"
    )


# ------------------------------------------------------------------------------------------- commands
def _objective_eps(objective: Any) -> float | None:
    """The training ε of an adversarial objective (also as the base of a sum such as dq's); None otherwise."""
    for o in (objective, getattr(objective, "main", None)):
        eps = getattr(o, "eps", None)
        if isinstance(eps, float):
            return eps
    return None


def make_train_objective(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The objective ``--objective`` names with its options — flags and ``--objective-options`` must agree —
    trained at ``--train-eps`` or, for an adversarial objective, at the dataset's customary ε; plus what the
    run records about that ε."""
    options = _json_option(args.objective_options, "--objective-options")
    flags = {
        "beta": args.beta,
        "base": args.base,
        "steps": args.train_steps,
        "eps": None if args.train_eps is None else parse_eps(args.train_eps, "Linf", "--train-eps", one=True),
        "alpha": None if args.train_alpha is None else parse_eps(args.train_alpha, "Linf", "--train-alpha", one=True),
    }
    names = {"beta": "--beta", "base": "--base", "steps": "--train-steps", "eps": "--train-eps",
             "alpha": "--train-alpha"}
    for k, v in flags.items():
        if v is not None and k in options and options[k] != v:
            raise UsageError(f"qrobust: {names[k]} and --objective-options set {k} to different values ({v!r} vs "
                             f"{options[k]!r}): give it once")
    options = {**{k: v for k, v in flags.items() if v is not None}, **options}
    objective = make_objective(args.objective, **options)
    eps = _objective_eps(objective)
    if eps is None:
        return objective, {}
    if "eps" in options:
        source = "--train-eps" if flags["eps"] is not None else "--objective-options"
    else:
        eps = default_eps(args.dataset, "Linf", "--train-eps")
        objective = make_objective(args.objective, **options, eps=eps)
        source = f"the customary L∞ ε of {args.dataset}"
    log.info("training at ε = %s (L∞), %s", eps_text(eps), source)
    return objective, {"train_eps": eps, "train_eps_source": source}


def _check_calib(args: argparse.Namespace) -> None:
    """``--calib N`` calibrates a fine-tune's activation clips: it needs --init and quantized activations."""
    if not args.calib:
        return
    if args.calib < 0:
        raise UsageError(f"qrobust: --calib must be a number of images ≥ 0, got {args.calib}")
    if not args.init:
        raise UsageError("qrobust: --calib calibrates the activation clips of a fine-tune from a float model: add "
                         "--init CKPT, or drop --calib (a model trained from scratch learns with the spec's clips)")
    spec = QuantSpec.parse(parse_bits(args.bits)) if args.bits else None
    if spec is None or spec.act_bits >= 32:
        raise UsageError(f"qrobust: --calib sets activation clips, but --bits {args.bits or 'float'} leaves the "
                         "activations float: quantize them (e.g. --bits w4a4) or drop --calib")


def cmd_train(args: argparse.Namespace) -> int:
    objective, eps_meta = make_train_objective(args)  # its settings are checked before any data is read
    _check_calib(args)
    if args.out:
        check_out(Path(args.out))
    train_ds = load_data(args, "train")
    test_ds = load_data(args, "test")
    seed_everything(args.seed)  # before the model is built: its initial weights come from the seed too
    model = build_for_data(args, train_ds)
    out = check_out(Path(args.out or f"runs/{args.dataset}-{model.qrobust_arch['name']}-{args.bits or 'float'}"))
    cfg = FitConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        # a recipe's usual schedule (FGSM-RS: one-cycle) unless --schedule says otherwise
        schedule=args.schedule or objective.recommended_fit.get("schedule", "cosine"),
        seed=args.seed,
        bf16=args.bf16,
        channels_last=args.channels_last,
        max_batches=args.max_batches,
        keep_checkpoints=args.keep_checkpoints or None,
        augment=False if args.no_augment else None,
        warmup_epochs=args.warmup_epochs,
    )
    callbacks = []
    if args.co_guard:
        guard_eps = eps_meta.get("train_eps") or default_eps(args.dataset, "Linf", "--train-eps")
        callbacks.append(OverfitGuard(test_ds, eps=guard_eps, action=args.co_guard, seed=args.seed))
    result = fit(
        model,
        train_ds,
        test=test_ds,
        objective=objective,
        config=cfg,
        out=out,
        resume=args.resume,
        metadata={"dataset": args.dataset, "init": args.init, "n_train": len(train_ds), **eps_meta,
                  **({"calib": args.calib} if args.calib else {})},
        callbacks=callbacks,
    )
    last = result.history[-1] if result.history else {}
    print(f"trained {out}: test accuracy {last.get('test_acc', float('nan')):.4f} after {last.get('epoch', 0)} epochs")
    return 0


def _describe_export(path: Path) -> bool:
    """``describe`` of an export (an ONNX file or a packed checkpoint); False for a plain checkpoint."""
    if path.suffix.lower() == ".onnx":
        print(f"{path}: ONNX export")
        print(format_onnx_description(read_onnx_metadata(path)))
        return True
    if path.is_file() and checkpoint.read_metadata(path).get("packed"):
        model = load_packed(path)
        totals = size_totals(describe(model))
        size = path.stat().st_size
        print(f"{path}: packed low-bit checkpoint, {model.qrobust_meta['arch']['name']} "
              f"spec={model.qrobust_spec.get('name')}")
        print(f"  size on disk: {size:,} bytes vs {totals['float_bits'] / 8:,.0f} bytes of float32 parameters "
              f"({totals['float_bits'] / 8 / size:.2f}x smaller)")
        print(format_description(describe(model)))
        return True
    return False


def cmd_describe(args: argparse.Namespace) -> int:
    if _describe_export(Path(args.checkpoint)):
        return 0
    model = checkpoint.load(args.checkpoint)
    meta = model.qrobust_meta
    print(f"{args.checkpoint}: {meta['arch']['name']}  spec={meta.get('spec') and meta['spec'].get('name')}")
    user = meta.get("metadata", {})
    for key in ("dataset", "n_train"):
        if key in user:
            print(f"  {key}: {user[key]}")
    alloc = user.get("allocation")
    if isinstance(alloc, dict) and "bits" in alloc:
        print(f"  allocation: {alloc.get('method')} at a budget of {alloc.get('budget'):g} average bits per weight "
              f"({alloc.get('average_bits', float('nan')):.3g} reached): "
              + ", ".join(f"{k} {v}" + ("" if (alloc.get("clip") or {}).get(k, "max") == "max" else
                                       f" (clip {alloc['clip'][k]} {alloc['clip_ratio'][k]:.3g})")
                          for k, v in alloc["bits"].items())
              + (f"; fine-tuned {alloc['qat']['epochs']} epoch(s) with {alloc['qat']['objective']}"
                 if alloc.get("qat") else ""))
    hist = user.get("history") or []
    if hist and "test_acc" in hist[-1]:
        print(f"  test accuracy: {hist[-1]['test_acc']:.4f} (epoch {hist[-1]['epoch']})")
    print(format_description(describe(model)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"qrobust: --out {out} is a folder: give the file to write (model.onnx, model.safetensors)")
    check_out(out.parent if str(out.parent) else Path("."))
    model = checkpoint.load(args.checkpoint)
    if not is_quantized(model):
        raise UsageError(f"qrobust: {args.checkpoint} is a float model: export a quantized one (qrobust train "
                         "--bits …, or qrobust quantize)")
    user = model.qrobust_meta.get("metadata", {})
    if args.add_bits is not None:
        model, twin = _quantize_additions_for_export(args, model, out, user)
        user = {**user, "derived_from": str(args.checkpoint), "add_bits": args.add_bits}
    if args.format == "packed":
        path = save_packed(model, out, **user, exported_from=str(args.checkpoint))
        size = path.stat().st_size
        flt = size_totals(describe(model))["float_bits"] / 8
        print(f"packed {args.checkpoint} to {path}: {size:,} bytes vs {flt:,.0f} bytes in float32 "
              f"({flt / size:.2f}x smaller)")
        return 0
    args.dataset = args.dataset or user.get("dataset")
    if not args.dataset:
        raise UsageError("qrobust: the checkpoint does not name its dataset: pass --dataset (the agreement check "
                         "needs its images)")
    ds = load_data(args, "test")
    check_model_fits(model, ds.info, f"checkpoint {args.checkpoint}")
    x, _ = ds.tensors(n=args.calib)
    source = twin if args.add_bits is not None else args.checkpoint
    src = {"checkpoint": str(source), "sha256": model.qrobust_meta.get("sha256"),
           "header_sha256": model.qrobust_meta.get("header_sha256"), "dataset": args.dataset}
    res = to_onnx(model, out, calib=x, source=src, weight_dtype=args.weight_dtype)
    a = res.info["agreement"]
    print(f"exported {args.checkpoint} to {res.path} ({res.info['onnx_bytes']:,} bytes): agrees with the fake-quant "
          f"model on {a['agreement']:.2%} of {a['n']} {args.dataset} test images; metadata also in {res.sidecar}")
    return 0


def _quantize_additions_for_export(args: argparse.Namespace, model: Any, out: Path, user: dict) -> tuple[Any, Path]:
    """``export --add-bits B``: the model with its residual additions quantized (calibrated on --calib training
    images), saved beside the export as the fake-quant twin it is checked against — a different function from
    the checkpoint, so the change in test accuracy is said before anything is exported."""
    from qrobust.quant import quantize_additions

    args.dataset = args.dataset or user.get("dataset")
    if not args.dataset:
        raise UsageError("qrobust: the checkpoint does not name its dataset: pass --dataset (--add-bits calibrates "
                         "on its training images)")
    train = load_dataset(args.dataset, "train", root=args.data_dir, download=getattr(args, "download", False),
                         cache_dir=getattr(args, "cache_dir", None))
    check_model_fits(model, train.info, f"checkpoint {args.checkpoint}")
    xc, _ = calibration_set(train, min(args.calib, len(train)), 0, args.dataset)
    derived = quantize_additions(model.eval(), args.add_bits, calibrate=xc).eval()
    xt, yt = load_data(args, "test").tensors(n=args.calib)
    with torch.no_grad():
        before = torch.cat([model(b).argmax(1) for b in xt.split(256)])
        after = torch.cat([derived(b).argmax(1) for b in xt.split(256)])
    acc0, acc1 = (before == yt).float().mean().item(), (after == yt).float().mean().item()
    changed = (before != after).float().mean().item()
    twin = out.with_name(f"{out.stem}.add{args.add_bits}.safetensors")
    checkpoint.save(derived, twin, **{**user, "derived_from": str(args.checkpoint), "add_bits": args.add_bits})
    derived = checkpoint.load(twin).eval()  # with the digests the export's source names
    log.warning("export --add-bits %d: the residual additions are quantized — a different function from %s: test "
                "accuracy %.2f%% → %.2f%%, %.2f%% of %d predictions changed; its fake-quant model is %s — evaluate "
                "that (or the export) before deploying, not the original", args.add_bits, args.checkpoint,
                100 * acc0, 100 * acc1, 100 * changed, len(yt), twin)
    return derived, twin


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(out=check_out(Path(args.out)), quick=args.quick, seed=args.seed)
    return 0


def _eps_value(part: str, flag: str) -> tuple[float, bool]:
    """One ``--eps`` item → (number, whether it was written as a fraction ``a/b``)."""
    num, slash, den = part.partition("/")
    try:
        value = float(num) / float(den) if slash else float(part)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"qrobust: {flag} must be numbers separated by commas (8, 8/255), got {part!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"qrobust: {flag} must be finite numbers, got {part!r}")
    return value, bool(slash)


def parse_eps(text: str, norm: str, flag: str = "--eps", *, one: bool = False) -> Any:
    """``--eps``, comma-separated for a sweep. L∞: a plain number is on the 0–255 pixel scale (``8`` → 8/255),
    a fraction with a slash is ε itself (``8/255``, ``0.3/1``); a plain number strictly between 0 and 1 is
    refused — ``0.1`` could mean 0.1/255 or 0.1. L2: the norm itself in [0, 1]-pixel space (``0.5``, ``128/255``).
    ``one=True``: exactly one value, returned as a float."""
    parts = [v.strip() for v in text.split(",") if v.strip()]
    if not parts:
        raise UsageError(f"qrobust: {flag} needs at least one value")
    values = []
    for part in parts:
        v, fraction = _eps_value(part, flag)
        if v < 0:
            raise UsageError(f"qrobust: {flag} must be ≥ 0, got {part}")
        if norm == "Linf" and fraction:
            if v > 1:
                raise UsageError(f"qrobust: {flag} {part} = {v:g} exceeds 1, the whole [0, 1] pixel range")
        elif norm == "Linf":
            if v > 255:
                raise UsageError(f"qrobust: {flag} for L∞ is on the 0–255 pixel scale, got {part} "
                                 f"(e.g. {flag} 8 for 8/255)")
            if 0 < v < 1:
                raise UsageError(
                    f"qrobust: {flag} {part} is ambiguous: plain numbers are on the 0–255 pixel scale, where it "
                    f"would be {part}/255; write a fraction of the pixel range with a slash ({flag} {part}/1 for "
                    f"ε = {part}, or {flag} 8/255) or a value ≥ 1 on the 0–255 scale ({flag} {v * 255:g})"
                )
            v = v / 255
        values.append(v)
    if one:
        if len(values) != 1:
            raise UsageError(f"qrobust: {flag} takes one value, got {text!r}")
        return values[0]
    return values


def _eps_for(args: argparse.Namespace, dataset: str, given: list[float] | None) -> list[float]:
    """``--eps`` as given (parsed before any work), else the dataset's customary ε — said in a log line."""
    if given is not None:
        eps = given
        source = "--eps"
    else:
        eps = [default_eps(dataset, args.norm, "--eps")]
        source = f"the customary {args.norm} ε of {dataset}; pass --eps to choose"
    log.info("ε = %s (%s), %s", ", ".join(eps_text(e, args.norm) for e in eps), args.norm, source)
    return eps


def _eval_data(args: argparse.Namespace, model) -> tuple[Any, str]:
    """The test split of --dataset (default: the dataset the checkpoint was trained on), first --n samples."""
    meta = getattr(model, "qrobust_meta", {}).get("metadata", {})
    args.dataset = args.dataset or meta.get("dataset")
    if not args.dataset:
        raise UsageError("qrobust: the checkpoint does not name its dataset: pass --dataset")
    ds = load_data(args, "test")
    name = getattr(args, "checkpoint", None) or args.checkpoints[0]
    check_model_fits(model, ds.info, f"checkpoint {name}")
    x, y = ds.tensors(n=args.n)
    return (x, y), args.dataset


#: attack settings that a flag of ``eval``/``attack`` owns: ``--attack-options`` may not set them
FLAG_SETTINGS = {"eps": "--eps", "norm": "--norm", "seed": "--seed"}


def _refuse_flag_settings(options: dict, where: str, owned: dict[str, str]) -> None:
    for key, flag in owned.items():
        if key in options:
            raise UsageError(f"qrobust: {where} sets {key}, which {flag} sets: give it as {flag}, not in the JSON")


def eval_attack_options(text: str | None) -> dict[str, dict]:
    """``eval --attack-options``: a JSON object mapping attacks of the suite to their settings."""
    options = _json_option(text, "--attack-options")
    for label, kw in options.items():
        if not isinstance(kw, dict):
            raise UsageError(
                "qrobust: eval's --attack-options maps attacks of the suite to their settings, e.g. "
                f"'{{\"apgd-ce\": {{\"n_iter\": 50}}}}'; got {label!r}: {json.dumps(kw)}"
            )
        _refuse_flag_settings(kw, f"--attack-options {label!r}", FLAG_SETTINGS)
    return options


EVAL_STATE = "eval-state.json"


def _out_stem(ckpt: str) -> str:
    """The default output folder's stem for a checkpoint argument (``zoo:NAME`` → ``NAME``)."""
    return ckpt[len(zoo.PREFIX):] if zoo.is_zoo_name(ckpt) else Path(ckpt).with_suffix("").as_posix()


def cmd_eval_deployed(args: argparse.Namespace) -> int:
    """``qrobust eval model.onnx``: the re-verification suite on the deployed graph and on its twin."""
    out = check_out(Path(args.out or Path(args.checkpoint).with_suffix("").as_posix() + "-reverify"))
    if args.suite != "standard" or args.attack_options or args.resume or args.gradients != "ste":
        raise UsageError("qrobust: eval of an ONNX export runs the re-verification suite (square, spsa, transfer from "
                         "the fake-quant twin, diva) on the graph and on its twin: --suite, --attack-options, "
                         "--gradients and --resume do not apply; set --n-queries, --n, --eps")
    given_eps = None if args.eps is None else parse_eps(args.eps, args.norm)
    if args.norm != "Linf":
        raise UsageError("qrobust: the re-verification suite is L∞ (SPSA and DIVA are): use --norm Linf")
    deployed = DeployedModel(args.checkpoint)
    twin = load_twin(deployed, args.twin)
    parent = checkpoint.load(args.parent) if args.parent else None
    data, dataset = _eval_data(args, deployed)
    eps = _eps_for(args, dataset, given_eps)
    comparison = reverify(deployed, twin, data, eps=eps, parent=parent, n_queries=args.n_queries or 1000,
                          seed=args.seed, batch_size=args.batch_size, model_name=str(args.checkpoint),
                          dataset=dataset)
    comparison.save(out)
    print(comparison.summary())
    for flag in comparison.flags:
        print(f"  gap: {flag}")
    print(f"report: {out / 'deployed.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if str(args.checkpoint).lower().endswith(".onnx"):
        return cmd_eval_deployed(args)
    if args.twin:
        raise UsageError("qrobust: --twin is for evaluating an ONNX export (model.onnx)")
    with process_group() as (rank, world):  # under torchrun: the ranks share the work, rank 0 writes
        return _cmd_eval(args, rank, world)


def _cmd_eval(args: argparse.Namespace, rank: int, world: int) -> int:
    out = check_out(Path(args.out or _out_stem(args.checkpoint) + f"-eval-{args.suite}"))
    options = eval_attack_options(args.attack_options)
    given_eps = None if args.eps is None else parse_eps(args.eps, args.norm)
    state = out / EVAL_STATE
    if state.exists() and not args.resume:
        raise UsageError(f"qrobust: {out} holds an interrupted evaluation ({state}): pass --resume to continue it, "
                         "or delete that file to start over")
    if args.resume and not state.exists():
        log.warning("nothing to resume in %s: evaluating from the start", out)
    if world > 1:
        dist.barrier()  # every rank has looked for an interrupted state before rank 0 writes one
    if rank != 0:  # the ranks log the same lines: rank 0's are enough
        logging.getLogger("qrobust").setLevel(logging.WARNING)
    device = default_device()  # the GPU where there is one (under torchrun, the rank's own)
    model = checkpoint.load(args.checkpoint, map_location=device)
    data, dataset = _eval_data(args, model)
    eps = _eps_for(args, dataset, given_eps)
    parent = checkpoint.load(args.parent, map_location=device) if args.parent else None
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate(
        model,
        data,
        suite=args.suite,
        eps=eps,
        norm=args.norm,
        gradients=args.gradients,
        batch_size=args.batch_size,
        seed=args.seed,
        parent=parent,
        n_queries=args.n_queries,
        attack_kwargs=options or None,
        diagnostics=not args.no_diagnostics,
        model_name=str(args.checkpoint),
        dataset=dataset,
        state_path=state,  # progress after every batch: a killed run continues with --resume
    )
    if rank != 0:
        return 0
    report.save(out)
    state.unlink(missing_ok=True)
    print(report.summary())
    print(f"report: {out / 'report.md'}")
    return 0


def _train_time(log_path: str) -> float:
    """``--train-log``: a run folder or its ``metrics.jsonl`` → the training time it records."""
    p = Path(log_path)
    p = p / "metrics.jsonl" if p.is_dir() else p
    try:
        history = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UsageError(f"qrobust: --train-log {log_path}: cannot read a metrics.jsonl there ({e})") from e
    return zoo.train_time_from(history)


#: ``zoo card`` flags that set the evaluation, which ``--report`` brings along instead (flag -> argparse dest)
REPORT_OWNS = {"--suite": "suite", "--eps": "eps", "--n": "n", "--norm": "norm", "--gradients": "gradients",
               "--seed": "seed", "--n-queries": "n_queries", "--batch-size": "batch_size", "--out": "out"}
#: the share of clean predictions a report may disagree on with the checkpoint it is said to be of (float
#: rounding on another machine moves a borderline image or two; another checkpoint moves percents)
REPORT_CLEAN_TOLERANCE = 0.005


def _report_of(args: argparse.Namespace, model) -> RobustnessReport:
    """``zoo card --report``: the saved evaluation, checked to be of this checkpoint on these images — its
    per-sample clean correctness is recomputed on the first ``n`` test images of its dataset."""
    report = RobustnessReport.load(args.report)
    if args.dataset is not None and args.dataset != report.dataset:
        raise UsageError(f"qrobust: --dataset {args.dataset} but the report {args.report} is on {report.dataset}: "
                         "drop --dataset")
    if len(report.clean) != report.n:
        raise UsageError(f"qrobust: the report {args.report} does not record per-sample clean results (written by "
                         "an older qrobust?): evaluate again without --report")
    args.dataset, args.n = report.dataset, report.n
    (x, y), _ = _eval_data(args, model)
    with eval_mode(model), torch.no_grad():
        device = model_device(model)
        ok = torch.cat([model(x[i:i + 256].to(device)).argmax(1).cpu() == y[i:i + 256]
                        for i in range(0, len(y), 256)])
    differ = sum(int(a) != int(b) for a, b in zip(ok.tolist(), report.clean))
    if differ > REPORT_CLEAN_TOLERANCE * report.n:
        raise UsageError(f"qrobust: the report {args.report} is not of this checkpoint on these images: clean "
                         f"correctness differs on {differ} of {report.n} test images; evaluate the checkpoint "
                         "again (drop --report), or give the report it was evaluated in")
    if differ:
        log.warning("zoo card: the checkpoint's clean correctness differs from the report's on %d of %d images "
                       "(within %.1f %%: float rounding); the card keeps the report's numbers", differ, report.n,
                       100 * REPORT_CLEAN_TOLERANCE)
    return report


def cmd_zoo_card(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint and add it to the zoo: NAME.safetensors + the card NAME.json from the report."""
    with process_group() as (rank, world):  # under torchrun the evaluation is sharded, rank 0 writes
        folder = Path(args.zoo) if args.zoo else zoo.zoo_dir()
        card_path = folder / f"{args.name}.json"
        if card_path.exists() and not args.force:
            raise UsageError(f"qrobust: {card_path} exists: pass --force to replace the entry, or choose another "
                             "--name")
        report_dir = check_out(Path(args.out)) if args.out else None  # before any work
        src = checkpoint.resolve_checkpoint(args.checkpoint)
        meta = checkpoint.read_metadata(src)
        train_time = _train_time(args.train_log) if args.train_log else None
        if args.report is not None:
            given = [flag for flag, dest in REPORT_OWNS.items() if getattr(args, dest) is not None]
            if given:
                raise UsageError(f"qrobust: --report takes the evaluation and its settings from the report: drop "
                                 f"{', '.join(given)}")
        model = checkpoint.load(src, map_location=default_device())
        if args.report is not None:
            report = _report_of(args, model)
        else:
            args.norm, args.gradients = args.norm or "Linf", args.gradients or "ste"
            args.seed = 0 if args.seed is None else args.seed
            data, dataset = _eval_data(args, model)
            eps = _eps_for(args, dataset, None if args.eps is None else [parse_eps(args.eps, args.norm, one=True)])
            report = evaluate(model, data, suite=args.suite or "standard", eps=eps, norm=args.norm,
                              gradients=args.gradients, batch_size=args.batch_size or 256, seed=args.seed,
                              n_queries=args.n_queries, model_name=f"zoo:{args.name}", dataset=dataset)
        card = zoo.card_from_report(report.to_dict(), meta, name=args.name, command=args.command,
                                    train_time_s=train_time)
        if rank != 0:
            return 0
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / card["checkpoint"]
        if target.resolve() != src.resolve():
            atomic_write_bytes(target, src.read_bytes())
        zoo.write_card(card, folder)
        if report_dir is not None:
            report.save(report_dir)
        print(report.summary())
        print(f"zoo entry {args.name}: {target} ({target.stat().st_size / 1e6:.2f} MB) and {card_path}")
    return 0


def cmd_zoo_table(args: argparse.Namespace) -> int:
    print(zoo.markdown_table(zoo.cards(args.zoo)), end="")
    return 0


def _add_zoo_parsers(sub: Any, attack_target_args: Callable[[argparse.ArgumentParser], None]) -> None:
    z = sub.add_parser("zoo", help="the model zoo: add a checkpoint with its card, print the README table")
    zs = z.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", parser_class=_Parser, required=True)
    zoo_help = f"zoo folder (default: ${zoo.ENV}, else the repository's zoo/)"
    c = zs.add_parser("card", help="evaluate a checkpoint, copy it into the zoo and write its card NAME.json")
    attack_target_args(c)
    c.set_defaults(n=None)  # the whole test split unless --n says otherwise
    for action in c._actions:
        if action.dest == "n":
            action.help = "number of test images, the first of the test split (default: all of them)"
        elif action.dest == "out":
            action.help = "also save the full report (report.json/.md, plot) in this folder"
    c.add_argument("--name", required=True, help="zoo name, e.g. digits-digits_cnn-w4a4-pgd-at")
    c.add_argument("--command", required=True, help="the `qrobust train …` command that trained the checkpoint")
    c.add_argument("--train-log", default=None,
                   help="run folder or metrics.jsonl for the training time (default: the checkpoint's history)")
    c.set_defaults(norm=None, gradients=None, seed=None)  # None: not given (--report brings its own)
    c.add_argument("--suite", default=None, help="attack suite (default: standard)")
    c.add_argument("--eps", default=None, help="one ε, written like eval's (default: the dataset's customary ε)")
    c.add_argument("--n-queries", type=_positive_int, default=None, help="Square's query budget (default 5000)")
    c.add_argument("--batch-size", type=_positive_int, default=None, help="default 256")
    c.add_argument("--report", default=None,
                   help="make the card from this saved evaluation (the --out folder of `qrobust eval`, e.g. a long "
                        "one continued with --resume) instead of evaluating again; its per-sample clean results "
                        "are re-checked against the checkpoint")
    c.add_argument("--zoo", default=None, help=zoo_help)
    c.add_argument("--force", action="store_true", help="replace an existing entry of that name")
    c.set_defaults(func=cmd_zoo_card)
    t = zs.add_parser("table", help="print the Markdown table of the zoo's cards (for the README)")
    t.add_argument("--zoo", default=None, help=zoo_help)
    t.set_defaults(func=cmd_zoo_table)


def cmd_attack(args: argparse.Namespace) -> int:
    out = check_out(Path(args.out or f"{_out_stem(args.checkpoint)}-{args.attack}"))
    own = _json_option(args.attack_options, "--attack-options")
    _refuse_flag_settings(own, "--attack-options", {**FLAG_SETTINGS, "gradients": "--gradients"})
    given_eps = None if args.eps is None else [parse_eps(args.eps, args.norm, one=True)]
    model = checkpoint.load(args.checkpoint)
    (x, y), dataset = _eval_data(args, model)
    eps = _eps_for(args, dataset, given_eps)
    options = {"eps": eps[0], "gradients": args.gradients, "seed": args.seed, **own}
    if args.norm != "Linf":
        options["norm"] = args.norm
    cls = ATTACKS.get(args.attack.lower())
    if cls is not None and "alpha" in inspect.signature(cls.__init__).parameters and "alpha" not in options:
        options["alpha"] = eps[0] / 4  # a step that can cross the ε-ball in the default number of steps
    try:
        attack = make_attack(args.attack, model, **options)
    except TypeError as e:
        raise UsageError(f"qrobust: {args.attack} does not take these settings ({sorted(options)}): {e}") from e
    x_adv = attack(x, y)
    with torch.no_grad():
        pred_clean, pred_adv = model(x).argmax(1), model(x_adv).argmax(1)
    meta = {
        "checkpoint": str(args.checkpoint),
        "dataset": dataset,
        "attack": args.attack,
        "settings": attack.config() if hasattr(attack, "config") else options,
    }
    paths = save_adversarial_examples(x, x_adv, y, pred_clean, pred_adv, out, metadata=meta)
    fooled = ((pred_clean == y) & (pred_adv != y)).sum().item()
    print(
        f"{args.attack} at eps={eps_text(eps[0], args.norm)} ({args.norm}): clean "
        f"{(pred_clean == y).float().mean().item():.4f}, adversarial {(pred_adv == y).float().mean().item():.4f}; "
        f"fooled {fooled} of {int((pred_clean == y).sum())} correctly classified"
    )
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return 0


#: the methods whose cost needs adversarial calibration inputs (and so an ε)
ADVERSARIAL_METHODS = ("lipschitz", "lipschitz-local", "quanos")
ALLOCATION_FILES = ("allocation.json", "allocation.md")


def allocation_table(info: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per weight layer: its weight count, the bits and clipping chosen, its size in bits and the method's
    cost there."""
    by_name = {r["name"]: r for r in rows}
    return [{"layer": n, "type": by_name[n]["type"], "weights": info["sizes"][n], "bits": b, "clip": info["clip"][n],
             "clip_ratio": info["clip_ratio"][n], "size_bits": by_name[n]["size_bits"],
             "cost": info["costs"][n][info["setting"][n]]} for n, b in info["bits"].items()]


def allocation_markdown(meta: dict[str, Any], table: list[dict[str, Any]], totals: dict[str, Any]) -> str:
    lines = [f"# Per-layer bits of {meta['checkpoint']}", "",
             f"Method **{meta['method']}** at a budget of {meta['budget']:g} average bits per weight "
             f"({meta['average_bits']:.3g} reached), {meta['calib']} calibration images of {meta['dataset']}"
             + (f", ε = {eps_text(meta['eps'])}" if meta.get("eps") is not None else "")
             + f"; activations {'float' if meta['act_bits'] == 32 else str(meta['act_bits']) + ' bits'}. "
             f"Model size {totals['size_bits'] / 8192:.2f} KiB, {totals['compression']:.2f}× smaller than float32."
             + (f" Clipping rules tried per layer: {', '.join(meta['clips'])} (clip = the fraction of each channel's "
                "max|w| where the grid ends)." if meta.get("clips", ["max"]) != ["max"] else "")
             + (f" Then fine-tuned {meta['qat']['epochs']} epoch(s) with {meta['qat']['objective']} (lr "
                f"{meta['qat']['lr']:g}; run folder `qat/`)." if meta.get("qat") else ""), "",
             "| layer | type | weights | bits | clip | size (bits) | cost |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['type']} | {r['weights']:,} | {r['bits']} | {r['clip']} ({r['clip_ratio']:.3g}) "
              f"| {r['size_bits']:,} | {r['cost']:.4g} |" for r in table]
    return "\n".join(lines) + "\n"


def cmd_quantize(args: argparse.Namespace) -> int:
    from qrobust.utils import atomic_write_text

    out = check_out(Path(args.out))
    final = out / checkpoint.FINAL_NAME
    if final.exists():
        raise UsageError(f"qrobust: --out {out} already holds a checkpoint ({final}): choose another folder or "
                         "delete it")
    candidates = _int_list(args.candidates, "--candidates")
    if not candidates or any(not 2 <= b <= 8 for b in candidates):
        raise UsageError(f"qrobust: --candidates takes bit-widths from 2 to 8, got {args.candidates!r}")
    if args.budget < min(candidates):
        raise UsageError(f"qrobust: a --budget of {args.budget:g} average bits cannot be met with candidates "
                         f"{args.candidates} (the fewest is {min(candidates)}): raise it or add smaller candidates")
    if args.act_bits != 32 and not 2 <= args.act_bits <= 8:
        raise UsageError(f"qrobust: --act-bits must be 2–8, or 32 for float activations, got {args.act_bits}")
    clips = check_clips([c for c in args.clips.split(",") if c.strip()])
    if args.qat_epochs < 0:
        raise UsageError(f"qrobust: --qat-epochs must be ≥ 0 (0 = post-training only), got {args.qat_epochs}")
    given_eps = None if args.eps is None else parse_eps(args.eps, "Linf", one=True)
    needs_eps = args.method in ADVERSARIAL_METHODS or (args.qat_epochs > 0 and args.qat_objective == "pgd-at")
    if given_eps is not None and not needs_eps:
        raise UsageError(f"qrobust: --eps is used by --method {' or '.join(ADVERSARIAL_METHODS)} and by "
                         f"--qat-objective pgd-at only; drop it for --method {args.method}")
    model = checkpoint.load(args.checkpoint)
    if is_quantized(model) or getattr(model, "qrobust_spec", None):
        raise ConfigError(f"{args.checkpoint} is already quantized: give the float checkpoint it was trained from")
    meta = getattr(model, "qrobust_meta", {}).get("metadata", {})
    args.dataset = args.dataset or meta.get("dataset")
    if not args.dataset:
        raise UsageError("qrobust: the checkpoint does not name its dataset: pass --dataset")
    eps = None
    if needs_eps:
        eps = given_eps if given_eps is not None else default_eps(args.dataset, "Linf", "--eps")
    train = load_dataset(args.dataset, "train", root=args.data_dir, download=args.download, cache_dir=args.cache_dir)
    check_model_fits(model, train.info, f"checkpoint {args.checkpoint}")
    x, y = calibration_set(train, args.calib, args.seed, args.dataset)
    if eps is not None:
        log.info("adversarial calibration inputs at ε = %s (L∞), %s", eps_text(eps),
                 "--eps" if given_eps is not None else f"the customary L∞ ε of {args.dataset}; pass --eps to choose")
    model.eval()
    spec, info = allocate(model, x, y, budget=args.budget, method=args.method, act_bits=args.act_bits,
                          candidates=candidates, clips=clips, eps=eps if args.method in ADVERSARIAL_METHODS else None,
                          seed=args.seed)
    if args.act_bits != 32:
        log.info("activation clips calibrated on the %d calibration images", len(y))
    q = quantize(model, spec, calibrate=x if args.act_bits != 32 else None).eval()
    qat = None
    if args.qat_epochs:
        from qrobust.studies.layerwise import make_qat_objective

        cfg = FitConfig(epochs=args.qat_epochs, lr=args.qat_lr, batch_size=args.batch_size, seed=args.seed)
        log.info("quantization-aware fine-tune: %d epoch(s) of %s", args.qat_epochs, args.qat_objective)
        res = fit(q, train, objective=make_qat_objective(args.qat_objective, eps=eps, steps=args.qat_steps),
                  config=cfg, out=out / "qat", metadata={"dataset": args.dataset, "allocation": args.method})
        q = res.model.eval()
        last = res.history[-1] if res.history else {}
        qat = {"epochs": args.qat_epochs, "objective": args.qat_objective, "lr": args.qat_lr,
               "steps": args.qat_steps if args.qat_objective == "pgd-at" else None, "eps": eps,
               "train_accuracy": last.get("train_acc"), "run": str(out / "qat")}
    rows = describe(q)
    table = allocation_table(info, rows)
    totals = size_totals(rows)
    record = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "method": args.method,
              "budget": args.budget, "average_bits": info["average_bits"], "bits": info["bits"], "eps": eps,
              "calib": len(y), "act_bits": args.act_bits, "candidates": list(candidates), "clips": list(clips),
              "clip": info["clip"], "clip_ratio": info["clip_ratio"], "qat": qat, "seed": args.seed}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "allocation.json", json.dumps(
        {**record, "layers": table, "size_bits": totals["size_bits"], "float_bits": totals["float_bits"],
         "compression": totals["compression"]}, indent=1))
    atomic_write_text(out / "allocation.md", allocation_markdown(record, table, totals))
    checkpoint.save(q, final, **{**meta, "allocation": record})
    print(f"{args.method} allocation at a budget of {args.budget:g} average bits: {info['average_bits']:.3g} reached, "
          f"{totals['compression']:.2f}x smaller than float32")
    for r in table:
        clip = "" if r["clip"] == "max" else f" clip {r['clip']} ({r['clip_ratio']:.3g})"
        print(f"  {r['layer']:<24} {r['bits']} bits{clip}  {r['weights']:>9,} weights  cost {r['cost']:.4g}")
    if qat:
        print(f"fine-tuned {qat['epochs']} epoch(s) with {qat['objective']}: run folder {qat['run']}")
    print(f"quantized checkpoint: {final}\nper-layer table: {out / 'allocation.md'}  {out / 'allocation.json'}")
    return 0


def _json_option(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"qrobust: {flag} must be a JSON object: {e}") from e
    if not isinstance(value, dict):
        raise UsageError(f"qrobust: {flag} must be a JSON object, got {type(value).__name__}")
    return value


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.what == "lipschitz":
        model = checkpoint.load(args.checkpoints[0])
        print(f"{args.checkpoints[0]}: per-layer Lipschitz constants (spectral norms of the layers as operators)")
        print(format_lipschitz_table(lipschitz_table(model, iters=args.iters)))
        return 0
    models = {
        Path(c).with_suffix("").name if Path(c).is_file() else Path(c).name: checkpoint.load(c)
        for c in args.checkpoints
    }
    out = check_out(Path(args.out or "amplification"))
    first = next(iter(models.values()))
    (x, y), _ = _eval_data(args, first)
    amplification_report(
        models,
        x,
        y,
        eps_list=parse_eps(args.eps, "Linf"),
        out=out,
        attack=args.attack,
        steps=args.steps,
        bits=args.bits,
        alpha=args.alpha,
        seed=args.seed,
    )
    print(f"amplification: {out / 'amplification.json'}  {out / 'amplification.png'}")
    return 0


def _int_list(text: str, flag: str = "--bits") -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise UsageError(f"qrobust: {flag} takes integers separated by commas: {e}") from e


def _float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise UsageError(f"qrobust: {flag} takes numbers separated by commas, got {text!r}") from e


#: how ``qrobust study`` parses each kind of study option (:class:`qrobust.studies.harness.Option`):
#: ``(text, flag) → value``
STUDY_OPTION_TYPES: dict[str, Any] = {
    "str": lambda text, flag: text,
    "int": lambda text, flag: int(text),
    "float": lambda text, flag: float(text),
    "int_list": _int_list,
    "float_list": _float_list,
    "str_list": lambda text, flag: tuple(text.split(",")),
    "eps255_list": lambda text, flag: parse_eps(text, "Linf", flag),
    "eps255": lambda text, flag: parse_eps(text, "Linf", flag, one=True),
    "json": lambda text, flag: _json_option(text, flag),
}


def _add_study_option(p: argparse.ArgumentParser, opt: Any) -> None:
    if opt.type == "flag":
        p.add_argument(opt.flag, dest=opt.dest, action="store_true", help=opt.help)
        return
    convert = STUDY_OPTION_TYPES[opt.type]

    def parse(text: str) -> Any:
        return convert(text, opt.flag)

    parse.__name__ = opt.type.split("_")[0]  # argparse names it in "invalid int value: 'x'"
    kw: dict[str, Any] = {"dest": opt.dest, "default": opt.default, "help": opt.help}
    if opt.choices:
        kw["choices"] = list(opt.choices)
    p.add_argument(opt.flag, type=parse, **kw)


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of :func:`~qrobust.studies.harness.run_study` that ``qrobust study NAME …`` asks for:
    every option of the study that was given (or has a default); the others keep the study's defaults."""
    args.out = args.out or f"runs/{args.name}-{args.dataset}"
    settings = {o.dest: getattr(args, o.dest) for o in get_study(args.name).cli_options()}
    return {k: v for k, v in settings.items() if v is not None}


def cmd_study(args: argparse.Namespace) -> int:
    run_study(args.name, **study_settings(args))
    print(f"study report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_study_render(args: argparse.Namespace) -> int:
    from qrobust.utils import atomic_write_text

    src = Path(args.results)
    text = render_results(src)
    out = args.out
    if out is None:
        out = src / "report.md" if src.is_dir() else src.with_name("report.md") if src.name == "results.json" else "-"
    if str(out) == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(Path(out), text)
        print(f"study report: {out}")
    if args.figures:
        results = load_results(src)
        folder = Path(out).parent if str(out) != "-" else (src if src.is_dir() else src.parent)
        for fname, fig in study_of(results).figures(results).items():
            print(f"figure: {save_figure(fig, folder / fname)}")
    return 0


def _add_study_parsers(sub: Any) -> None:
    """``qrobust study NAME``: one subcommand per registered study, its options declared in the study's file;
    ``qrobust study render``: a report re-rendered from its results."""
    st = sub.add_parser("study", help="the papers' experiments: " + ", ".join(available_studies()) + "; render",
                        description="Run one of the papers' experiments, or re-render a study's report.")
    studies = st.add_subparsers(dest="name", metavar="STUDY", parser_class=_Parser, required=True)
    for name in available_studies():
        study = get_study(name)
        sp = studies.add_parser(name, help=study.summary, description=study.summary)
        for opt in study.cli_options():
            _add_study_option(sp, opt)
        sp.set_defaults(func=cmd_study)
    r = studies.add_parser("render", help="re-render a study's report.md from its results JSON",
                           description="Re-render a study's report.md from its results JSON alone.")
    r.add_argument("results", help="a study's report folder, its results.json, or a bench/results/NAME.json")
    r.add_argument("--out", default=None,
                   help="where to write (default: report.md beside results.json; '-' or a NAME.json: stdout)")
    r.add_argument("--figures", action="store_true", help="also redraw the study's figures beside the report")
    r.set_defaults(func=cmd_study_render)


# ------------------------------------------------------------------------------------------- parser
def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qrobust", description="Build and verify adversarially robust quantized neural networks.")
    p.add_argument("--version", action="version", version=f"qrobust {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="the main job on the embedded digits data: float vs quantized under attack")
    d.add_argument("--out", default="qrobust-demo", help="report folder (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train or fine-tune a (quantized) model")
    _add_data_args(t)
    t.add_argument(
        "--model", default=None, help="architecture (default: per dataset, e.g. digits_cnn, small_cnn, resnet20)"
    )
    t.add_argument("--activation", default=None, choices=["relu", "relu6"], help="default: relu (or --init's)")
    t.add_argument("--bits", default=None, help="quantization, e.g. w4a4, w1a32, 4 (= w4a4); default float")
    t.add_argument("--weight-scheme", default=None, help="dorefa|uniform|uniform_per_channel|lsq|binary")
    t.add_argument("--act-scheme", default=None, help="clip|pact")
    t.add_argument("--first-last-bits", type=int, default=None, help="bits of the first and last layer (e.g. 8 or 32)")
    t.add_argument("--objective", default="ce", help="training objective (default: ce)")
    t.add_argument("--objective-options", default=None, help="JSON options of the objective")
    t.add_argument("--beta", type=float, default=None, help="dq: orthogonality-penalty β; trades: TRADES β")
    t.add_argument("--base", default=None, help="dq: the objective the penalty is added to (ce, pgd-at, trades, …)")
    t.add_argument(
        "--train-eps",
        default=None,
        help=f"adversarial objectives: the L∞ ε; {EPS_RULE} (default: the dataset's customary ε — digits 0.1, "
        "MNIST 0.3, Fashion-MNIST 0.1, CIFAR-10/SVHN 8/255 — stated in the log and config.json)",
    )
    t.add_argument("--train-alpha", default=None,
                   help="adversarial objectives: the attack step, written like --train-eps")
    t.add_argument("--train-steps", type=_positive_int, default=None, help="adversarial objectives: attack steps")
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate, in (0, 10] (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument(
        "--schedule",
        default=None,
        choices=["cosine", "onecycle", "step", "constant"],
        help="learning-rate schedule (default: the objective's usual one, else cosine)",
    )
    t.add_argument(
        "--co-guard",
        default=None,
        choices=["warn", "stop", "restore"],
        help="single-step recipes: watch for catastrophic overfitting (PGD vs FGSM accuracy on test images)",
    )
    t.add_argument("--warmup-epochs", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights, the data order and every random draw: the same seed, the same "
                   "weights bit for bit (default: %(default)s)")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--no-augment", action="store_true", help="disable the dataset's standard augmentation")
    t.add_argument("--n-train", type=_positive_int, default=None, help="train on a random subset of this size")
    t.add_argument("--n-test", type=_positive_int, default=None, help="evaluate on a random subset of this size")
    t.add_argument("--max-batches", type=_positive_int, default=None, help="at most this many batches per epoch")
    t.add_argument(
        "--keep-checkpoints",
        type=_count,
        default=KEEP_CHECKPOINTS,
        help="keep the newest N epoch checkpoints, 0 = all (default: %(default)s)",
    )
    t.add_argument("--init", default=None,
                   help="start from this float checkpoint (quantization-aware fine-tuning); it sets the architecture")
    t.add_argument("--calib", type=int, default=0,
                   help="with --init and quantized activations: set each activation's clip from the float model's "
                        "outputs on this many training images before fine-tuning (default 0: the spec's act_clip)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out after an interruption, with the settings it was started with")
    t.add_argument("--out", default=None, help="run folder (default: runs/DATASET-MODEL-BITS)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("describe", help="per-layer quantization table of a checkpoint or an export")
    s.add_argument("checkpoint", help="checkpoint file, run folder or zoo:NAME; an exported model.onnx or a packed "
                   "checkpoint")
    s.set_defaults(func=cmd_describe)

    ex = sub.add_parser("export", help="the quantized model as it ships: an ONNX integer graph or a packed checkpoint",
                        description="Export a quantized checkpoint (docs/deploy.md): --format onnx writes a QDQ "
                        "graph run by onnxruntime, checked against the fake-quant model on --calib test images "
                        "(refused below 99%% agreement); --format packed writes the weights at their bit-widths.")
    ex.add_argument("checkpoint", help="quantized checkpoint file or run folder")
    ex.add_argument("--format", choices=["onnx", "packed"], default="onnx", help="(default: %(default)s)")
    ex.add_argument("--out", required=True, help="file to write (model.onnx; model.safetensors for packed)")
    ex.add_argument("--calib", type=_positive_int, default=1000,
                    help="onnx: test images the agreement is measured on (default: %(default)s)")
    ex.add_argument("--add-bits", type=int, choices=range(2, 9), default=None, metavar="B",
                    help="quantize the residual additions' operands to B bits first (calibrated on --calib "
                    "training images), so that every convolution and addition runs on integers; a different "
                    "function, saved beside the export as OUT.addB.safetensors (docs/deploy.md)")
    ex.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="auto",
                    help="onnx: integer type of the weights (default: %(default)s — int8 after activations of at "
                    "most 7 bits, uint8 with zero point 128 after 8-bit ones, safe from the int16 saturation of "
                    "onnxruntime's u8·s8 kernels on x86 without VNNI; int8 everywhere is faster where the target "
                    "has VNNI or ARM dot-product kernels — docs/deploy.md)")
    _add_data_args(ex, default=None)
    ex.set_defaults(func=cmd_export)

    qz = sub.add_parser("quantize", help="per-layer weight bits under a size budget; saves the quantized model",
                        description="Allocate per-layer weight bit-widths of a float checkpoint under a budget of "
                        "average bits per weight (docs/layerwise.md), post-training, and save the quantized "
                        "checkpoint with its per-layer table.")
    qz.add_argument("checkpoint", help="float checkpoint file or run folder")
    qz.add_argument("--budget", type=_positive_float, required=True, help="average bits per weight, e.g. 4.0")
    qz.add_argument("--method", default="lipschitz", choices=list(METHODS),
                    help="allocation criterion (default: %(default)s)")
    qz.add_argument("--calib", type=_positive_int, default=256,
                    help="calibration images from the training split (default: %(default)s)")
    qz.add_argument("--candidates", default=",".join(map(str, DEFAULT_CANDIDATES)),
                    help="candidate weight bit-widths, 2–8 (default: %(default)s)")
    qz.add_argument("--eps", default=None,
                    help=f"lipschitz/quanos: the L∞ ε of the adversarial calibration inputs; {EPS_RULE} (default: "
                    "the dataset's customary ε)")
    qz.add_argument("--clips", default="max",
                    help="clipping rules per layer, chosen with the bits (no bit cost): max, mse, pQ (percentile), "
                    "e.g. max,mse,p99.9 (default: %(default)s, the max-|w| grid)")
    qz.add_argument("--qat-epochs", type=int, default=0,
                    help="quantization-aware fine-tune epochs after the allocation (default 0: post-training)")
    qz.add_argument("--qat-objective", default="pgd-at", choices=("natural", "pgd-at"),
                    help="the fine-tune's objective: natural (cross-entropy) or pgd-at at --eps (default: %(default)s)")
    qz.add_argument("--qat-lr", type=_positive_float, default=0.01, help="the fine-tune's learning rate (default: "
                    "%(default)s)")
    qz.add_argument("--qat-steps", type=_positive_int, default=7, help="PGD steps of the pgd-at fine-tune (default: "
                    "%(default)s)")
    qz.add_argument("--batch-size", type=_positive_int, default=128, help="the fine-tune's batch size (default: "
                    "%(default)s)")
    qz.add_argument("--act-bits", type=int, default=32,
                    help="activation bits, 2–8 (clips calibrated on the calibration images), 32 = float (default)")
    _add_data_args(qz, default=None)
    qz.add_argument("--seed", type=int, default=0, help="calibration subset, attacks and random allocation")
    qz.add_argument("--out", required=True, help="folder for final.safetensors and allocation.json/.md")
    qz.set_defaults(func=cmd_quantize)

    def _attack_target_args(a: argparse.ArgumentParser) -> None:
        a.add_argument("checkpoint", help="checkpoint file, run folder or zoo:NAME")
        _add_data_args(a, default=None)
        a.add_argument("--n", type=_positive_int, default=1000, help="number of test images (default: %(default)s)")
        a.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
        a.add_argument(
            "--gradients",
            default="ste",
            choices=["ste", "native", "surrogate"],
            help="gradients through quantizers: ste = straight-through/BPDA (default)",
        )
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--out", default=None, help="output folder (checked for writability before any work)")

    eps_help = (f"ε; L∞: {EPS_RULE}; L2: the norm of [0, 1] pixels (default: the dataset's customary ε — L∞: "
                "digits 0.1, MNIST 0.3, Fashion-MNIST 0.1, CIFAR-10/SVHN 8/255; L2: MNIST 2, CIFAR-10 0.5)")

    e = sub.add_parser("eval", help="robustness report of a checkpoint (attacks, worst case, diagnostics), or of an "
                       "ONNX export side by side with its fake-quant twin")
    _attack_target_args(e)
    e.add_argument("--suite", default="standard",
                   help="quick | standard | quantized (default: %(default)s, as for qrobust.evaluate)")
    e.add_argument("--eps", default=None, help=f"{eps_help}; comma-separated for a sweep")
    e.add_argument(
        "--attack-options",
        default=None,
        help="JSON mapping attacks of the suite to settings, e.g. '{\"apgd-ce\": {\"n_iter\": 50}}' "
        "(ε, norm and seed have their flags)",
    )
    e.add_argument(
        "--resume",
        action="store_true",
        help=f"continue an interrupted evaluation from OUT/{EVAL_STATE} (progress is recorded after every batch)",
    )
    e.add_argument("--parent", default=None, help="float parent checkpoint (transfer attack in the quantized suite; "
                   "DIVA's reference for an ONNX export)")
    e.add_argument("--twin", default=None, help="model.onnx: its fake-quant checkpoint (default: the one recorded in "
                   "the export)")
    e.add_argument("--n-queries", type=_positive_int, default=None, help="Square's query budget (default 5000)")
    e.add_argument("--batch-size", type=_positive_int, default=256)
    e.add_argument("--no-diagnostics", action="store_true", help="skip the gradient-masking checks")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("attack", help="craft adversarial examples and save them with a PNG grid")
    _attack_target_args(a)
    a.set_defaults(n=16)
    a.add_argument("--attack", default="pgd", help="attack name (fgsm, pgd, apgd-ce, square, cw, …)")
    a.add_argument("--eps", default=None, help=eps_help)
    a.add_argument("--attack-options", default=None,
                   help="JSON settings of the attack, e.g. '{\"steps\": 50}' (ε, norm, gradients and seed have "
                   "their flags)")
    a.set_defaults(func=cmd_attack)

    an = sub.add_parser("analyze", help="look inside models: Lipschitz constants, error amplification")
    an.add_argument("what", choices=["lipschitz", "amplification"])
    an.add_argument("checkpoints", nargs="+", help="checkpoint(s); amplification compares several models")
    _add_data_args(an, default=None)
    an.add_argument("--iters", type=int, default=50, help="lipschitz: power-iteration steps")
    an.add_argument("--n", type=_positive_int, default=256, help="amplification: test images")
    an.add_argument("--eps", default="2,4,8", help="amplification: L∞ ε list on the 0–255 scale")
    an.add_argument("--attack", default="pgd", choices=["pgd", "fgsm"])
    an.add_argument("--steps", type=int, default=10)
    an.add_argument("--bits", type=int, default=None, help="bucket grid for float models (default: the model's)")
    an.add_argument("--alpha", type=float, default=None, help="clip level α of that grid (default 6)")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--out", default=None)
    an.set_defaults(func=cmd_analyze)

    _add_study_parsers(sub)
    _add_zoo_parsers(sub, _attack_target_args)
    return p


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"qrobust: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except QrobustError as e:
        print(f"qrobust: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qrobust: interrupted", file=sys.stderr)
        return 130
    finally:
        close_process_group()  # fit closes the group it opens; this covers one left open by anything else


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
