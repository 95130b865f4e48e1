"""The full-scale CIFAR-10 runs of issue #13: ResNet-20, the full 50,000-image training set, ε = 8/255.

    python bench/bench_cifar_full.py plan                         # the commands, and which are done
    python bench/bench_cifar_full.py train w4a4-fgsm-rs           # one run (continues a stopped one)
    python bench/bench_cifar_full.py eval w4a4-fgsm-rs --n 1000   # standard suite (continues a stopped one)
    python bench/bench_cifar_full.py evalq w4a4-fgsm-rs --n 500   # quantized suite, transfer from float-fgsm-rs
    python bench/bench_cifar_full.py card w4a4-fgsm-rs            # the zoo entry, from that evaluation
    python bench/bench_cifar_full.py keep w4a4-fgsm-rs            # copy its state into bench/results/cifar_full/
    python bench/bench_cifar_full.py summary                      # bench/results/cifar_full.json
    python bench/bench_cifar_full.py fit --n 1000                 # APGD-CE on training vs test images, each run

Every stage is a plain `qrobust` command (printed before it runs, recorded in the results), so a user can run
the same thing by hand, and a stopped stage continues where it stopped: training with `--resume` from its
last epoch checkpoint, evaluation with `--resume` from its state file. A run takes 2 h on two idle CPU threads
of an AVX2 machine (8.4 min per FGSM-RS epoch of ResNet-20 w4a4, fp32), three times that when another job
shares the cores (then one thread is faster). With ``--bf16`` on a CPU with AVX512-BF16, two runs side by side
on one thread each: an epoch of w4a4 takes 4 min (FGSM-RS), 2–2.5 min (ODG-Q), 4.5–5 min (PGD-AT-2), so a
15-epoch run is 0.6–1.2 h; the 1,000-image standard-suite evaluation (fp32) about 1 h. On a GPU the same
commands pick CUDA: for a lent device machine, copy ../shared/data/cifar10-jpeg.tar.gz (20 MB) into a folder
of the checkout that .git/info/exclude ignores, carry it, and pass --data-dir. Run folders go to ``--runs`` (default
bench/runs/cifar_full, not committed: the `card` stage copies a finished checkpoint into the zoo).

A machine whose scratch space does not outlive the session loses an unfinished run with it: ``keep NAME``
copies what a run needs to continue (config.json, metrics.jsonl, final.safetensors or else the newest epoch
checkpoint, refused above 2 MB: 2.2 MB for ResNet-20 with its optimizer state, so in practice a finished
run; a wider network's model, 2.8 MB for WRN-16-2, is refused too: train it with --runs on storage that
outlives the machine, such as ../shared/runs) and its evaluation's state file into
bench/results/cifar_full/NAME/, to be committed; ``train``/``eval``/``card`` copy a kept run back into
``--runs`` when it is not there, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from _keep import KEPT_RUNS, copy_file, run_files, show

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cifar_full.json"
KEPT = HERE / "results" / "cifar_full"

#: name -> (bits or None for float, `qrobust train` objective flags); 15 epochs, one-cycle, peak lr 0.2
RECIPES: dict[str, tuple[str | None, list[str]]] = {
    "w4a4-fgsm-rs": ("w4a4", ["--objective", "fgsm-rs", "--co-guard", "restore"]),
    "float-fgsm-rs": (None, ["--objective", "fgsm-rs", "--co-guard", "restore"]),
    # the natural baseline, and the natural parent of the layerwise and threats studies on CIFAR-10
    "float-natural": (None, ["--objective", "ce"]),
    "w4a4-odgq": ("w4a4", ["--objective", "odgq", "--schedule", "onecycle"]),
    "float-odgq": (None, ["--objective", "odgq", "--schedule", "onecycle"]),
    # the precision between them (the issue's "w8a8 if time allows"): how much of w4a4's loss is the bit-width
    "w8a8-odgq": ("w8a8", ["--objective", "odgq", "--schedule", "onecycle"]),
    "w4a4-pgd-at-2": ("w4a4", ["--objective", "pgd-at", "--train-steps", "2", "--train-alpha", "4/255",
                               "--schedule", "onecycle"]),
    # the PGD-AT float parent: the robust parent of the layerwise study (#12) and w4a4-pgd-at-2's transfer source
    "float-pgd-at-2": (None, ["--objective", "pgd-at", "--train-steps", "2", "--train-alpha", "4/255",
                              "--schedule", "onecycle"]),
    "dq-w4a4-fgsm-rs": ("w4a4", ["--objective", "dq", "--base", "fgsm-rs", "--beta", "3e-4",
                                 "--objective-options", '{"bn": "fold"}', "--co-guard", "restore"]),
    # fine-tunes of a robust float run (``@NAME``: that run's folder as --init; its activation clips calibrated on
    # 256 training images): the cost of a w4a4 model is then the parent's training plus this
    "w4a4-ft-pgd-at-2": ("w4a4", ["--init", "@float-fgsm-rs", "--calib", "256", "--objective", "pgd-at",
                                  "--train-steps", "2", "--train-alpha", "4/255", "--schedule", "cosine"]),
}
def init_of(name: str) -> str | None:
    """The run a fine-tune recipe starts from (its ``--init @NAME``), else None."""
    flags = RECIPES[name][1]
    return flags[flags.index("--init") + 1][1:] if "--init" in flags else None


#: per-recipe epochs and peak lr where they differ from EPOCHS, LR (a fine-tune starts near its optimum)
SETTINGS: dict[str, dict[str, float]] = {"w4a4-ft-pgd-at-2": {"epochs": 4, "lr": 0.01}}
EPOCHS, LR = 15, 0.2
#: the epochs control (NAME-eE: recipe NAME trained for E epochs instead of EPOCHS, one-cycle over all of them):
#: every 15-epoch robust run is as robust on its training images as on test ones (the `fit` stage), so it
#: underfits; whether a longer run pays or the model's capacity is the limit, these tell apart (ODG-Q: the
#: cheapest epoch)
for _epochs in (8, 30):
    RECIPES[f"w4a4-odgq-e{_epochs}"] = RECIPES["w4a4-odgq"]
    SETTINGS[f"w4a4-odgq-e{_epochs}"] = {"epochs": _epochs}
#: per-recipe architecture where it is not ResNet-20. The capacity control (NAME-ARCH: recipe NAME, same 15
#: epochs, on a wider network): WRN-16-4 has 10x ResNet-20's parameters (2.75 M vs 0.27 M); an ODG-Q epoch
#: on one CPU thread (bf16, w4a4, another job on the other core) takes 9.6 min against ResNet-20's 2.2, so the
#: 15 epochs take about 2.4 h. WRN-16-2 (0.69 M parameters, 2.5x ResNet-20's) is the step between, and the
#: one a 2-hour budget could pay for
ARCH: dict[str, str] = {"w4a4-odgq-wrn-16-4": "wrn-16-4", "w4a4-odgq-wrn-16-2": "wrn-16-2"}
for _name in ARCH:
    RECIPES[_name] = RECIPES["w4a4-odgq"]


def arch_of(name: str) -> str:
    """The architecture recipe ``name`` trains (a fine-tune: its --init's)."""
    return ARCH.get(init_of(name) or name, "resnet20")


def run_dir(runs: Path, name: str) -> Path:
    return runs / f"cifar10-{arch_of(name)}-{name}"


def _data(data_dir: str | None) -> list[str]:
    return ["--data-dir", data_dir] if data_dir else []


def train_command(runs: Path, name: str, epochs: int | None = None, data_dir: str | None = None,
                  bf16: bool = False) -> list[str]:
    bits, flags = RECIPES[name]
    flags = [str(run_dir(runs, f[1:])) if f.startswith("@") else f for f in flags]
    own = SETTINGS.get(name, {})
    epochs = epochs or int(own.get("epochs", EPOCHS))
    model = [] if init_of(name) else ["--model", arch_of(name)]  # a fine-tune's architecture is its --init's
    cmd = ["qrobust", "train", "--dataset", "cifar10", *_data(data_dir), *model,
           *(["--bits", bits] if bits else []), *flags, "--epochs", str(epochs), "--lr", str(own.get("lr", LR)),
           *(["--bf16"] if bf16 else []), "--keep-checkpoints", "2", "--seed", "0", "--out", str(run_dir(runs, name))]
    return cmd


def eval_command(runs: Path, name: str, n: int, data_dir: str | None = None) -> list[str]:
    return ["qrobust", "eval", str(run_dir(runs, name)), "--dataset", "cifar10", *_data(data_dir), "--n", str(n),
            "--suite", "standard", "--out", str(eval_dir(runs, name, n)), "--resume"]


def eval_dir(runs: Path, name: str, n: int, suite: str = "standard") -> Path:
    return Path(str(run_dir(runs, name)) + ("-eval" if suite == "standard" else "-evalq") + str(n))


def parent_of(name: str) -> str:
    """The float run a quantized run is compared with (the transfer attack's source): a fine-tune's --init,
    else the float run trained with the same recipe (float-X for w4a4-X), else float-fgsm-rs."""
    if init_of(name):
        return init_of(name)  # a fine-tune's parent is the run it started from
    # an epochs or capacity control's twin is its recipe's (for the capacity control a ResNet-20: transfer
    # across architectures)
    twin = "float-" + re.sub(r"-(e\d+|wrn-\d+-\d+)$", "", name.split("-", 1)[1])
    return twin if twin in RECIPES else "float-fgsm-rs"


def evalq_command(runs: Path, name: str, n: int, data_dir: str | None = None) -> list[str]:
    """The `quantized` suite — straight-through and float-surrogate APGD-CE/APGD-T, Square, SPSA, and transfer
    from the float twin — on the first ``n`` test images."""
    return ["qrobust", "eval", str(run_dir(runs, name)), "--dataset", "cifar10", *_data(data_dir), "--n", str(n),
            "--suite", "quantized", "--parent", str(run_dir(runs, parent_of(name))),
            "--out", str(eval_dir(runs, name, n, "quantized")), "--resume"]


def keep(runs: Path, name: str, n: int) -> list[Path]:
    """Copy the files run ``name`` (and its ``n``-image evaluation) needs to continue into KEPT/name, the
    evaluation's files naming the run as runs/... instead of this machine's path."""
    src, dst = run_dir(runs, name), KEPT / name
    if not (src / "config.json").exists():
        raise SystemExit(f"keep: {src} is not a run folder (no config.json): train it first")
    files = run_files(src)
    evals = [eval_dir(runs, name, n)] + sorted(src.parent.glob(src.name + "-evalq*"))
    for ev in evals:
        files += [ev / f for f in ("eval-state.json", "report.json", "report.md") if (ev / f).exists()]
    if dst.exists():
        shutil.rmtree(dst)
    kept = []
    for f in files:
        if not f.exists():
            continue
        rel = f.relative_to(src) if f.is_relative_to(src) else Path(f.parent.name[len(src.name) + 1:]) / f.name
        copy_file(f, dst / rel, f"{runs.resolve()}/", KEPT_RUNS)
        kept.append(dst / rel)
    for report in sorted(dst.glob("eval*/report.json")):
        # the plot report.md shows, drawn again from the kept report (titled runs/..., not this machine's path)
        from qrobust.report import plot_accuracy, plot_name

        data = json.loads(report.read_text(encoding="utf-8"))
        kept.append(plot_accuracy(data, report.parent / plot_name(data)))
    return kept


def restore(runs: Path, name: str, n: int) -> None:
    """Copy a kept run back into ``runs`` if the run folder is not there."""
    src, dst = KEPT / name, run_dir(runs, name)
    if (dst / "config.json").exists() or not (src / "config.json").exists():
        return
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix != ".png"):
        rel = f.relative_to(src)
        target = Path(f"{dst}-{rel.parts[0]}") / rel.name if rel.parts[0].startswith("eval") else dst / rel
        prefix = f"cifar10-{arch_of(name)}-"
        copy_file(f, target, f"{KEPT_RUNS}{prefix}", f"{runs.resolve()}/{prefix}")
    print(f"restored {name} from {src} into {dst}", flush=True)


def trained_with_bf16(runs: Path, name: str, asked: bool) -> bool:
    """The run's own bf16 setting where it exists (a resume must match it), else what was asked."""
    cfg = run_dir(runs, name) / "config.json"
    if not cfg.exists():
        cfg = KEPT / name / "config.json"
    if not cfg.exists():
        return asked
    bf16 = bool(json.loads(cfg.read_text())["fit"]["bf16"])
    if bf16 != asked:
        print(f"note: {name} was started {'with' if bf16 else 'without'} --bf16; continuing it so", flush=True)
    return bf16


def _run(cmd: list[str]) -> int:
    print("$", shlex.join(cmd), flush=True)
    env = {**os.environ, "QROBUST_NO_PROGRESS": os.environ.get("QROBUST_NO_PROGRESS", "1")}
    return subprocess.call([sys.executable, "-m", "qrobust.cli", *cmd[1:]], env=env)


def paired(runs: Path, names: list[str], n: int) -> dict[str, dict]:
    """Every pair of evaluated runs, compared sample by sample on the same ``n`` test images (exact McNemar on
    the per-sample worst case: robust under one run only)."""
    import torch

    from qrobust.studies.harness import paired_test

    masks = {}
    for name in names:
        r = json.loads((eval_dir(runs, name, n) / "report.json").read_text())
        masks[name] = torch.tensor([c == "1" for c in r["results"][0]["robust"]])
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            t = paired_test(masks[a], masks[b])
            out[f"{a} vs {b}"] = {"robust_a": int(masks[a].sum()), "robust_b": int(masks[b].sum()),
                                  "only_a": t["only_a"], "only_b": t["only_b"], "p": t["p"]}
    return out


FIGURE = HERE / "results" / "cifar_full.png"
#: the issue's targets for the w4a4 model: worst case and clean accuracy (%)
TARGET_ROBUST, TARGET_CLEAN = 35.0, 65.0


def plot_summary(summary: dict[str, dict], path: Path = FIGURE) -> Path:
    """Each evaluated run's clean accuracy and standard-suite worst case (1,000 test images) as paired bars,
    sorted by the worst case, with the issue's w4a4 targets as lines and each run's training time beside it."""
    from qrobust.figures import new_figure, save_figure

    runs = sorted((n for n in summary if n != "paired"), key=lambda n: summary[n]["robust_accuracy"])
    fig = new_figure((7.6, 0.42 * len(runs) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    for i, name in enumerate(runs):
        r = summary[name]
        clean, robust = 100 * r["clean_accuracy"], 100 * r["robust_accuracy"]
        minutes = r.get("train_time_with_init_s", r["train_time_s"]) / 60
        color = "tab:gray" if name.startswith("float") else "tab:blue"
        ax.barh(i + 0.2, clean, height=0.38, color=color, alpha=0.35)
        ax.barh(i - 0.2, robust, height=0.38, color=color)
        box = {"facecolor": "white", "edgecolor": "none", "pad": 0.3}
        ax.text(clean + 0.8, i + 0.2, f"{clean:.1f}", va="center", fontsize=7, bbox=box, zorder=3)
        ax.text(robust + 0.8, i - 0.2, f"{robust:.1f} · {minutes:.0f} min", va="center", fontsize=7, bbox=box,
                zorder=3)
    ax.axvline(TARGET_ROBUST, color="tab:red", ls="--", lw=1, label=f"w4a4 target: worst case ≥ {TARGET_ROBUST:.0f} %")
    ax.axvline(TARGET_CLEAN, color="tab:red", ls=":", lw=1, label=f"w4a4 target: clean ≥ {TARGET_CLEAN:.0f} %")
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels([f"{arch_of(n)} {n}" if arch_of(n) != "resnet20" else n for n in runs], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_ylim(-0.7, len(runs) - 0.3)
    ax.set_xlabel("accuracy on the first 1,000 CIFAR-10 test images (%): dark = standard-suite worst case "
                  "(· training time), light = clean", fontsize=8)
    ax.set_title("Full-scale CIFAR-10 runs, L∞ ε = 8/255 (blue: quantized, gray: float)", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=7, frameon=False)
    return save_figure(fig, path)


FIT_RESULTS = HERE / "results" / "cifar_full_fit.json"


def fit_gap(runs: Path, names: list[str], n: int, data_dir: str | None = None, threads: int = 1
            ) -> dict[str, dict]:
    """Clean and APGD-CE (the standard suite's first attack, its settings) accuracy of each finished run on the
    first ``n`` training images (not augmented) and the first ``n`` test images, same seed: a model that is
    robust on the images it was trained on but not on new ones overfits (robust overfitting: more data or
    regularization helps); one that is as little robust on both underfits (more capacity or epochs help)."""
    import time

    import torch

    import qrobust
    from qrobust.data import load_dataset

    torch.set_num_threads(threads)
    kw = {"root": data_dir} if data_dir else {}
    split = {s: load_dataset("cifar10", s, **kw).tensors(n) for s in ("train", "test")}
    done = json.loads(FIT_RESULTS.read_text()) if FIT_RESULTS.exists() else {}
    for name in names:
        if name in done and done[name].get("n") == n:
            continue
        restore(runs, name, n)
        path = run_dir(runs, name) / "final.safetensors"
        if not path.exists():
            print(f"fit: {name} is not trained, skipped", flush=True)
            continue
        model = qrobust.load(path).eval()
        row: dict = {"n": n, "attack": "apgd-ce (standard suite settings), eps 8/255, seed 0"}
        for s, (x, y) in split.items():
            t = time.perf_counter()
            rep = qrobust.evaluate(model, (x, y), suite=["apgd-ce"], eps=8 / 255, diagnostics=False,
                                   dataset="cifar10", model_name=name)
            row[s] = {"clean": round(rep.clean_accuracy, 4), "apgd_ce": round(rep.robust_accuracy, 4),
                      "time_s": round(time.perf_counter() - t, 1)}
        row["robust_gap_train_minus_test"] = round(row["train"]["apgd_ce"] - row["test"]["apgd_ce"], 4)
        done[name] = row
        FIT_RESULTS.write_text(json.dumps(done, indent=2) + "\n")
        print(f"fit {name}: train clean {row['train']['clean']:.1%} apgd-ce {row['train']['apgd_ce']:.1%} | "
              f"test clean {row['test']['clean']:.1%} apgd-ce {row['test']['apgd_ce']:.1%}", flush=True)
    return done


def _done(path: Path) -> bool:
    return (path / "final.safetensors").exists() or (path / "report.json").exists()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["plan", "train", "eval", "evalq", "card", "keep", "summary", "fit"])
    p.add_argument("name", nargs="?", choices=sorted(RECIPES))
    p.add_argument("--runs", default=str(HERE / "runs" / "cifar_full"))
    p.add_argument("--n", type=int, default=1000, help="test images for the evaluation (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default: the recipe's, {EPOCHS} for training from scratch)")
    p.add_argument("--bf16", action="store_true",
                   help="train under bfloat16 autocast (1.9x faster where the CPU has AVX512-BF16 or AMX)")
    p.add_argument("--threads", type=int, default=1,
                   help="fit: torch threads (default 1; 2 on an otherwise idle two-core machine)")
    p.add_argument("--data-dir", default=None, help="where cifar10-jpeg.tar.gz is (default: qrobust's search)")
    args = p.parse_args()
    runs = Path(args.runs)
    if args.stage in ("train", "eval", "evalq", "card", "keep") and not args.name:
        p.error(f"{args.stage} needs a run name: one of {', '.join(sorted(RECIPES))}")
    if args.stage == "keep":
        show(keep(runs, args.name, args.n), HERE.parent)
        return 0
    if args.stage == "fit":
        fit_gap(runs, [args.name] if args.name else [n for n in RECIPES if n != "w4a4-ft-pgd-at-2"], args.n,
                args.data_dir, args.threads)
        return 0
    if args.stage in ("train", "eval", "evalq", "card"):
        restore(runs, args.name, args.n)
    if args.stage == "evalq":
        if args.name.startswith("float"):
            p.error("evalq is for a quantized run: its transfer attack comes from the float twin")
        restore(runs, parent_of(args.name), args.n)
        if not (run_dir(runs, parent_of(args.name)) / "final.safetensors").exists():
            raise SystemExit(f"evalq {args.name}: its float twin {parent_of(args.name)} is not trained (no "
                             f"{run_dir(runs, parent_of(args.name))}/final.safetensors): train it first")
        return _run(evalq_command(runs, args.name, args.n, args.data_dir))
    if args.stage == "plan":
        for name in RECIPES:
            stages = ((train_command(runs, name, args.epochs, args.data_dir, args.bf16), run_dir(runs, name),
                       KEPT / name),
                      (eval_command(runs, name, args.n, args.data_dir), eval_dir(runs, name, args.n),
                       KEPT / name / f"eval{args.n}"))
            for cmd, out, kept in stages:
                state = "done" if _done(out) else "kept" if _done(kept) else "todo"
                print(f"[{state}] {shlex.join(cmd)}")
        return 0
    if args.stage == "train":
        parent = init_of(args.name)
        if parent:
            restore(runs, parent, args.n)
            if not (run_dir(runs, parent) / "final.safetensors").exists():
                raise SystemExit(f"train {args.name}: it fine-tunes {parent}, which is not trained (no "
                                 f"{run_dir(runs, parent)}/final.safetensors): train it first")
        cmd = train_command(runs, args.name, args.epochs, args.data_dir,
                            trained_with_bf16(runs, args.name, args.bf16))
        if (run_dir(runs, args.name) / "config.json").exists():
            cmd.append("--resume")
        return _run(cmd)
    if args.stage == "eval":
        return _run(eval_command(runs, args.name, args.n, args.data_dir))
    if args.stage == "card":
        cmd = ["qrobust", "zoo", "card", str(run_dir(runs, args.name)), "--report",
               str(eval_dir(runs, args.name, args.n)), "--name", f"cifar10-{arch_of(args.name)}-{args.name}",
               "--command", shlex.join(train_command(Path("runs"), args.name, args.epochs,
                                                     bf16=trained_with_bf16(runs, args.name, args.bf16)))]
        return _run(cmd)
    summary = {}
    for name in RECIPES:
        restore(runs, name, args.n)
        rep = eval_dir(runs, name, args.n) / "report.json"
        metrics = run_dir(runs, name) / "metrics.jsonl"
        if not rep.exists():
            continue
        r = json.loads(rep.read_text())
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.exists() else []
        summary[name] = {
            "train_command": shlex.join(train_command(Path("runs"), name, args.epochs,
                                                      bf16=trained_with_bf16(runs, name, args.bf16))),
            "eval_command": shlex.join(eval_command(Path("runs"), name, args.n)),
            "epochs": len(history), "train_time_s": round(sum(h["epoch_time_s"] for h in history), 1),
            "clean_accuracy": r["clean_acc"], "robust_accuracy": r["results"][0]["robust_accuracy"],
            "attacks": {a["label"]: a["robust_accuracy_after"] for a in r["results"][0]["attacks"]},
            "attack_time_s": {a["label"]: round(a["time_s"], 1) for a in r["results"][0]["attacks"]},
            "eval_time_s": round(r["wall_time_s"], 1), "n_eval": r["n_examples"], "flags": r.get("flags", []),
        }
        parent = init_of(name)
        if parent and (run_dir(runs, parent) / "metrics.jsonl").exists():  # what the w4a4 model cost in all
            ph = [json.loads(line) for line in (run_dir(runs, parent) / "metrics.jsonl").read_text().splitlines()
                  if line.strip()]
            summary[name]["init"] = parent
            summary[name]["train_time_with_init_s"] = round(summary[name]["train_time_s"]
                                                            + sum(h["epoch_time_s"] for h in ph), 1)
        for q in sorted(runs.glob(run_dir(runs, name).name + "-evalq*")):
            if (q / "report.json").exists():
                rq = json.loads((q / "report.json").read_text())
                summary[name]["quantized_suite"] = {
                    "eval_command": shlex.join(evalq_command(Path("runs"), name, rq["n_examples"])),
                    "n_eval": rq["n_examples"], "clean_accuracy": rq["clean_acc"],
                    "robust_accuracy": rq["results"][0]["robust_accuracy"],
                    "attacks": {a["label"]: a["robust_accuracy_after"] for a in rq["results"][0]["attacks"]},
                    "own_robust_accuracy": {a["label"]: a.get("own_robust_accuracy")
                                            for a in rq["results"][0]["attacks"]},
                    "attack_time_s": {a["label"]: round(a["time_s"], 1) for a in rq["results"][0]["attacks"]},
                    "eval_time_s": round(rq["wall_time_s"], 1), "flags": rq.get("flags", []),
                }
    summary["paired"] = paired(runs, [n for n in summary], args.n)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS.relative_to(HERE.parent)} and {plot_summary(summary).relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
