"""The ``qrobust`` command: a thin shell over the library's public functions.

Usage errors exit 2 with one line on stderr; a missing or corrupt dataset/checkpoint exits 1 with one line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from qrobust import checkpoint
from qrobust._version import __version__
from qrobust.analysis.amplification import amplification_report
from qrobust.analysis.lipschitz import format_lipschitz_table, lipschitz_table
from qrobust.attacks import ATTACKS, make_attack
from qrobust.data import available_datasets, load_dataset
from qrobust.defenses import OverfitGuard, make_objective
from qrobust.errors import ConfigError, QrobustError
from qrobust.evaluation import evaluate
from qrobust.models import build_model
from qrobust.quant import QuantSpec, describe, format_description, quantize
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
from qrobust.training import FitConfig, close_process_group, fit

log = logging.getLogger("qrobust")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage otherwise)
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------------- helpers
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
    else:
        info = train_ds.info
        model = build_model(
            args.model or DEFAULT_MODEL[args.dataset],
            num_classes=info.num_classes,
            in_channels=info.input_shape[0],
            input_size=info.input_shape[1],
            activation=args.activation,
            mean=list(info.mean),
            std=list(info.std),
        )
    if spec is not None and not spec.is_float:
        model = quantize(model, spec, inplace=True)
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
def cmd_train(args: argparse.Namespace) -> int:
    train_ds = load_data(args, "train")
    test_ds = load_data(args, "test")
    model = build_for_data(args, train_ds)
    options = {}
    if args.objective_options:
        try:
            options = json.loads(args.objective_options)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--objective-options must be JSON, e.g. '{{\"label_smoothing\": 0.1}}': {e}") from e
    flags = {
        "beta": args.beta,
        "base": args.base,
        "steps": args.train_steps,
        "eps": None if args.train_eps is None else args.train_eps / 255,
        "alpha": None if args.train_alpha is None else args.train_alpha / 255,
    }
    options = {**{k: v for k, v in flags.items() if v is not None}, **options}  # explicit JSON options win
    objective = make_objective(args.objective, **options)
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
        augment=False if args.no_augment else None,
        warmup_epochs=args.warmup_epochs,
    )
    out = Path(args.out or f"runs/{args.dataset}-{model.qrobust_arch['name']}-{args.bits or 'float'}")
    callbacks = []
    if args.co_guard:
        callbacks.append(
            OverfitGuard(test_ds, eps=getattr(objective, "eps", 8 / 255), action=args.co_guard, seed=args.seed)
        )
    result = fit(
        model,
        train_ds,
        test=test_ds,
        objective=objective,
        config=cfg,
        out=out,
        resume=args.resume,
        metadata={"dataset": args.dataset, "init": args.init, "n_train": len(train_ds)},
        callbacks=callbacks,
    )
    last = result.history[-1] if result.history else {}
    print(f"trained {out}: test accuracy {last.get('test_acc', float('nan')):.4f} after {last.get('epoch', 0)} epochs")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    model = checkpoint.load(args.checkpoint)
    meta = model.qrobust_meta
    print(f"{args.checkpoint}: {meta['arch']['name']}  spec={meta.get('spec') and meta['spec'].get('name')}")
    user = meta.get("metadata", {})
    for key in ("dataset", "n_train"):
        if key in user:
            print(f"  {key}: {user[key]}")
    hist = user.get("history") or []
    if hist and "test_acc" in hist[-1]:
        print(f"  test accuracy: {hist[-1]['test_acc']:.4f} (epoch {hist[-1]['epoch']})")
    print(format_description(describe(model)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(out=Path(args.out), quick=args.quick, seed=args.seed)
    return 0


def parse_eps(text: str, norm: str) -> list[float]:
    """``--eps``: comma-separated; for L∞ on the 0–255 pixel scale (``8`` → 8/255), for L2 the norm itself
    in [0, 1]-pixel space (``0.5``)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise UsageError(f"qrobust: --eps must be numbers separated by commas, got {text!r}") from e
    if not values:
        raise UsageError("qrobust: --eps needs at least one value")
    if norm == "Linf":
        bad = [v for v in values if not 0 <= v <= 255]
        if bad:
            raise UsageError(f"qrobust: --eps for L∞ is on the 0–255 pixel scale, got {bad} (e.g. --eps 8 for 8/255)")
        return [v / 255 for v in values]
    return values


def _eval_data(args: argparse.Namespace, model) -> tuple[Any, str]:
    """The test split of --dataset (default: the dataset the checkpoint was trained on), first --n samples."""
    meta = getattr(model, "qrobust_meta", {}).get("metadata", {})
    args.dataset = args.dataset or meta.get("dataset")
    if not args.dataset:
        raise UsageError("qrobust: the checkpoint does not name its dataset: pass --dataset")
    ds = load_data(args, "test")
    x, y = ds.tensors(n=args.n)
    return (x, y), args.dataset


def cmd_eval(args: argparse.Namespace) -> int:
    model = checkpoint.load(args.checkpoint)
    data, dataset = _eval_data(args, model)
    parent = checkpoint.load(args.parent) if args.parent else None
    options = _json_option(args.attack_options, "--attack-options")
    report = evaluate(
        model,
        data,
        suite=args.suite,
        eps=parse_eps(args.eps, args.norm),
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
    )
    out = Path(args.out or Path(args.checkpoint).with_suffix("").as_posix() + f"-eval-{args.suite}")
    report.save(out)
    print(report.summary())
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    model = checkpoint.load(args.checkpoint)
    (x, y), dataset = _eval_data(args, model)
    eps = parse_eps(args.eps, args.norm)
    if len(eps) != 1:
        raise UsageError("qrobust: attack takes one --eps value")
    options = {
        "eps": eps[0],
        "gradients": args.gradients,
        "seed": args.seed,
        **_json_option(args.attack_options, "--attack-options"),
    }
    if args.norm != "Linf":
        options["norm"] = args.norm
    cls = ATTACKS.get(args.attack.lower())
    if cls is not None and "alpha" in inspect.signature(cls.__init__).parameters and "alpha" not in options:
        options["alpha"] = eps[0] / 4  # a step that can cross the ε-ball in the default number of steps
    attack = make_attack(args.attack, model, **options)
    x_adv = attack(x, y)
    with torch.no_grad():
        pred_clean, pred_adv = model(x).argmax(1), model(x_adv).argmax(1)
    out = Path(args.out or f"{Path(args.checkpoint).with_suffix('').as_posix()}-{args.attack}")
    meta = {
        "checkpoint": str(args.checkpoint),
        "dataset": dataset,
        "attack": args.attack,
        "settings": attack.config() if hasattr(attack, "config") else options,
    }
    paths = save_adversarial_examples(x, x_adv, y, pred_clean, pred_adv, out, metadata=meta)
    fooled = ((pred_clean == y) & (pred_adv != y)).sum().item()
    print(
        f"{args.attack} at eps={args.eps} ({args.norm}): clean {(pred_clean == y).float().mean().item():.4f}, "
        f"adversarial {(pred_adv == y).float().mean().item():.4f}; fooled {fooled} of {int((pred_clean == y).sum())} "
        f"correctly classified"
    )
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
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
    first = next(iter(models.values()))
    (x, y), _ = _eval_data(args, first)
    out = Path(args.out or "amplification")
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
    "eps255_list": lambda text, flag: parse_eps(text, "Linf"),
    "eps255": lambda text, flag: parse_eps(text, "Linf")[0],
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
    t.add_argument("--activation", default="relu", choices=["relu", "relu6"])
    t.add_argument("--bits", default=None, help="quantization, e.g. w4a4, w1a32, 4 (= w4a4); default float")
    t.add_argument("--weight-scheme", default=None, help="dorefa|uniform|uniform_per_channel|lsq|binary")
    t.add_argument("--act-scheme", default=None, help="clip|pact")
    t.add_argument("--first-last-bits", type=int, default=None, help="bits of the first and last layer (e.g. 8 or 32)")
    t.add_argument("--objective", default="ce", help="training objective (default: ce)")
    t.add_argument("--objective-options", default=None, help="JSON options of the objective")
    t.add_argument("--beta", type=float, default=None, help="dq: orthogonality-penalty β; trades: TRADES β")
    t.add_argument("--base", default=None, help="dq: the objective the penalty is added to (ce, pgd-at, trades, …)")
    t.add_argument("--train-eps", type=float, default=None, help="adversarial objectives: ε on the 0–255 scale")
    t.add_argument("--train-alpha", type=float, default=None, help="adversarial objectives: step on the 0–255 scale")
    t.add_argument("--train-steps", type=int, default=None, help="adversarial objectives: attack steps")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    t.add_argument("--lr", type=float, default=0.05)
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
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--no-augment", action="store_true", help="disable the dataset's standard augmentation")
    t.add_argument("--n-train", type=int, default=None, help="train on a random subset of this size")
    t.add_argument("--n-test", type=int, default=None, help="evaluate on a random subset of this size")
    t.add_argument("--max-batches", type=int, default=None, help="at most this many batches per epoch")
    t.add_argument("--init", default=None, help="start from this float checkpoint (quantization-aware fine-tuning)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    t.add_argument("--out", default=None, help="run folder (default: runs/DATASET-MODEL-BITS)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("describe", help="per-layer quantization table of a checkpoint")
    s.add_argument("checkpoint", help="checkpoint file or run folder")
    s.set_defaults(func=cmd_describe)

    def _attack_target_args(a: argparse.ArgumentParser) -> None:
        a.add_argument("checkpoint", help="checkpoint file or run folder")
        _add_data_args(a, default=None)
        a.add_argument("--n", type=int, default=1000, help="number of test images (default: %(default)s)")
        a.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
        a.add_argument(
            "--gradients",
            default="ste",
            choices=["ste", "native", "surrogate"],
            help="gradients through quantizers: ste = straight-through/BPDA (default)",
        )
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--attack-options", default=None, help="JSON, e.g. '{\"steps\": 50}'")
        a.add_argument("--out", default=None, help="output folder")

    e = sub.add_parser("eval", help="robustness report of a checkpoint (attacks, worst case, diagnostics)")
    _attack_target_args(e)
    e.add_argument("--suite", default="standard", help="quick | standard | quantized (default: %(default)s)")
    e.add_argument(
        "--eps",
        default="8",
        help="ε, comma-separated for a sweep; L∞ on the 0–255 scale (8 = 8/255), "
        "L2 as the norm of [0, 1] pixels (default: %(default)s)",
    )
    e.add_argument("--parent", default=None, help="float parent checkpoint (transfer attack in the quantized suite)")
    e.add_argument("--n-queries", type=int, default=None, help="Square's query budget (default 5000)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--no-diagnostics", action="store_true", help="skip the gradient-masking checks")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("attack", help="craft adversarial examples and save them with a PNG grid")
    _attack_target_args(a)
    a.set_defaults(n=16)
    a.add_argument("--attack", default="pgd", help="attack name (fgsm, pgd, apgd-ce, square, cw, …)")
    a.add_argument("--eps", default="8", help="ε; L∞ on the 0–255 scale (default: %(default)s)")
    a.set_defaults(func=cmd_attack)

    an = sub.add_parser("analyze", help="look inside models: Lipschitz constants, error amplification")
    an.add_argument("what", choices=["lipschitz", "amplification"])
    an.add_argument("checkpoints", nargs="+", help="checkpoint(s); amplification compares several models")
    _add_data_args(an, default=None)
    an.add_argument("--iters", type=int, default=50, help="lipschitz: power-iteration steps")
    an.add_argument("--n", type=int, default=256, help="amplification: test images")
    an.add_argument("--eps", default="2,4,8", help="amplification: L∞ ε list on the 0–255 scale")
    an.add_argument("--attack", default="pgd", choices=["pgd", "fgsm"])
    an.add_argument("--steps", type=int, default=10)
    an.add_argument("--bits", type=int, default=None, help="bucket grid for float models (default: the model's)")
    an.add_argument("--alpha", type=float, default=None, help="clip level α of that grid (default 6)")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--out", default=None)
    an.set_defaults(func=cmd_analyze)

    _add_study_parsers(sub)
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
