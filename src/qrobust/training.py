"""One training loop for every recipe: objectives plug in, runs resume after a kill, DDP when launched so.

``fit(model, train, objective=...)`` knows only the :class:`~qrobust.defenses.objectives.Objective` protocol:
``objective(model, x, y) -> loss`` (or ``(loss, logits)``) and its hooks, which default to no-ops:
``on_epoch_start(epoch)``, ``set_batch_view(view)`` (called before each step with the loader's
:class:`~qrobust.data.BatchView` — dataset indices and augmentation — or None), ``state_dict()``/
``load_state_dict()`` (saved with every epoch checkpoint) and ``callback(record, model)``. A plain callable
is wrapped. Natural training, the Defensive-Quantization penalty, adversarial training and ODG-Q are all
objectives.

A run folder (``out=``) holds::

    config.json                  what was run (fit settings, architecture, quantization, dataset …)
    metrics.jsonl                one JSON line per finished epoch
    checkpoints/epoch_NNN.safetensors   weights + optimizer + RNG state, written atomically every epoch
    final.safetensors            the trained weights (what ``qrobust.load(out)`` returns)

``resume=True`` continues from the newest readable epoch checkpoint and ends with the same number of
epochs and a complete ``metrics.jsonl`` as an uninterrupted run; a call whose settings differ from the run's
(architecture, quantization, fit settings other than ``keep_checkpoints``/``eval_batch_size``, objective,
metadata) is refused with the differences named, before anything is rewritten. A finished run that has no
epoch checkpoints left (only ``final.safetensors``, as a kept copy holds it) is reused as it is, not trained
again. Epoch checkpoints are ordered by their number (``checkpoint.epoch_checkpoints``), and
``keep_checkpoints=N`` keeps the newest N.

Before the objective's loss can fail deep inside torch, labels are checked against the model's outputs (the
first forward tells how many); a NaN or infinite loss stops the run with :class:`TrainingDiverged`.

Under ``torchrun --nproc_per_node=N`` the same call trains with DistributedDataParallel (gloo on CPU,
nccl on GPU); only rank 0 writes files. A process group that ``fit`` opened, ``fit`` also closes: at
interpreter exit, so that later ``fit`` calls of the same process reuse it (re-creating torchrun's default
group after destroying it hangs now and then in its rendezvous); :func:`close_process_group` closes it
sooner. One the caller opened is the caller's to close.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qrobust import checkpoint as ckpt
from qrobust.data.inputs import as_batches, check_label_range
from qrobust.defenses.objectives import Objective, make_objective, split_output
from qrobust.errors import CheckpointError, ConfigError, InputError
from qrobust.utils import (
    atomic_write_text,
    bf16_is_fast,
    default_device,
    eval_mode,
    model_device,
    progress,
    seed_everything,
)

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "constant")
#: the largest learning rate FitConfig accepts: anything above diverges at the first step
MAX_LR = 10.0
#: FitConfig fields that a resumed run may change: they do not change what is trained
RESUME_MAY_CHANGE = ("keep_checkpoints", "eval_batch_size")


class TrainingDiverged(ConfigError, FloatingPointError):
    """The training loss became NaN or infinite: the settings (usually the learning rate) make it diverge."""


@dataclass
class FitConfig:
    """Settings of one training run (all JSON-serialisable; recorded in ``config.json``)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of the run
    gamma: float = 0.1
    seed: int = 0
    augment: bool | None = None  # None: the dataset's standard augmentation if it has one
    bf16: bool = False
    channels_last: bool = False
    grad_clip: float | None = None
    max_batches: int | None = None  # per epoch; for smoke tests and budgeted benchmarks
    keep_checkpoints: int | None = None  # keep the newest N epoch checkpoints (None or 0: all)
    eval_batch_size: int = 512

    def validate(self) -> FitConfig:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be ≥ 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.lr > MAX_LR:
            raise ConfigError(f"lr={self.lr:g} is absurd (any step that large diverges at once): give a learning "
                              f"rate ≤ {MAX_LR:g}, e.g. 0.1 for SGD or 1e-3 for AdamW")
        if self.max_batches is not None and (isinstance(self.max_batches, bool) or not isinstance(
                self.max_batches, int) or self.max_batches < 1):
            raise ConfigError(f"max_batches must be a positive integer (batches per epoch) or None for all, got "
                              f"{self.max_batches!r}")
        if self.keep_checkpoints is not None and (isinstance(self.keep_checkpoints, bool) or not isinstance(
                self.keep_checkpoints, int) or self.keep_checkpoints < 0):
            raise ConfigError(f"keep_checkpoints must be an integer ≥ 0 (0 or None: keep all), got "
                              f"{self.keep_checkpoints!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be ≥ 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ConfigError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None


# ------------------------------------------------------------------------------------------- schedule
def lr_at(cfg: FitConfig, progress_frac: float) -> float:
    """Learning rate at a point of the run (0 = first step, 1 = end), warmup included."""
    t = min(max(progress_frac, 0.0), 1.0)
    warm = cfg.warmup_epochs / cfg.epochs
    if cfg.schedule == "onecycle":
        peak = warm if warm > 0 else 0.3
        if t < peak:
            return cfg.lr * (0.04 + 0.96 * t / peak)
        return cfg.lr * max(0.0, (1.0 - t) / (1.0 - peak))
    if warm > 0 and t < warm:
        return cfg.lr * (t / warm)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        u = (t - warm) / (1.0 - warm) if warm < 1 else 1.0
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * u))
    # step
    return cfg.lr * cfg.gamma ** sum(t >= m for m in cfg.milestones)


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; no weight decay on biases, norms and quantizer scalars."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# ------------------------------------------------------------------------------------------- data
@torch.no_grad()
def accuracy(model: nn.Module, data: Any, *, batch_size: int = 512, max_batches: int | None = None) -> float:
    """Clean top-1 accuracy of ``model`` (put in eval mode, restored afterwards) on ``data``."""
    device = model_device(model)
    correct = total = 0
    with eval_mode(model):
        for i, (x, y) in enumerate(as_batches(data, batch_size, shuffle=False, augment=False, seed=0)):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------------- state
def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"__optim__/{pid}/{k}"] = v
            else:
                state_meta.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def _optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("__optim__/"):
            _, pid, key = k.split("/", 2)
            state.setdefault(int(pid), {})[key] = v
    for pid, st in meta.get("state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _flatten_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Tensors of a nested objective state go to ``tensors`` under ``prefix/path``; the rest stays as JSON."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {str(k): _flatten_state(v, f"{prefix}/{k}", tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_flatten_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(state)]
    return state


def _unflatten_state(doc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(doc, dict):
        if set(doc) == {"__tensor__"}:
            return tensors[doc["__tensor__"]]
        return {k: _unflatten_state(v, tensors) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_unflatten_state(v, tensors) for v in doc]
    return doc


def _epoch_path(out: Path, epoch: int) -> Path:
    return out / "checkpoints" / f"epoch_{epoch:03d}.safetensors"


def _save_epoch(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    epoch: int,
    history: list,
    run_meta: dict,
    keep: int | None,
    objective: Objective,
) -> None:
    tensors = dict(model.state_dict())
    opt_tensors, opt_meta = _optimizer_to_tensors(opt)
    tensors.update(opt_tensors)
    tensors["__rng__/torch"] = torch.get_rng_state()
    # a stateful objective (ODG-Q's carried perturbations) is saved with the epoch, so a resume continues it
    obj_state = _flatten_state(objective.state_dict(), "__objective__", tensors)
    meta = {
        "arch": getattr(model, "qrobust_arch", None),
        "spec": getattr(model, "qrobust_spec", None),
        "metadata": {**run_meta, "epoch": epoch},
        "training_state": {"epoch": epoch, "history": history, "optimizer": opt_meta, "objective": obj_state},
    }
    ckpt.save_tensors(_epoch_path(out, epoch), tensors, meta)
    if keep:
        for old in ckpt.epoch_checkpoints(out)[:-keep]:  # by epoch number: epoch_1000 is newer than epoch_999
            old.unlink(missing_ok=True)


def _latest_state(out: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest readable epoch checkpoint of a run folder (a corrupt newest one falls back to the one before)."""
    for p in reversed(ckpt.epoch_checkpoints(out)):
        try:
            return ckpt.read_tensors(p)
        except CheckpointError as e:
            log.warning("skipping unreadable checkpoint %s: %s", p, e)
    return None


def _plain(value: Any) -> Any:
    """``value`` as the JSON a checkpoint stores it (tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


def _differences(before: Any, now: Any, where: str) -> list[str]:
    """``where: before → now`` for every leaf setting that differs (dicts compared key by key)."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for k in sorted(set(before) | set(now), key=str)
                for d in _differences(before.get(k), now.get(k), f"{where}.{k}" if where else str(k))]
    if before == now:
        return []

    def short(v: Any) -> str:  # a whole spec or objective by its name
        return repr(v["name"]) if isinstance(v, dict) and "name" in v else repr(v)

    return [f"{where} {short(before)} → {short(now)}"]


def _resume_conflicts(stored: dict, current: dict) -> list[str]:
    """What a resumed call asks for that differs from the run it continues (architecture, quantization, fit
    settings, objective and run metadata); the fields of :data:`RESUME_MAY_CHANGE` are free."""
    stored, current = _plain(stored), _plain(current)
    for d in (stored, current):
        d.pop("epoch", None)
        for k in RESUME_MAY_CHANGE:
            (d.get("fit") or {}).pop(k, None)
    return _differences(stored, current, "")


def _refuse_conflicts(out: Path, stored: dict, run_meta: dict, model: nn.Module) -> None:
    """Refuse to resume the run in ``out`` (recorded as ``stored``) with this call's settings where they differ."""
    conflicts = _resume_conflicts(
        stored, {**run_meta, "arch": getattr(model, "qrobust_arch", None), "spec": getattr(model, "qrobust_spec", None)}
    )
    if conflicts:
        raise ConfigError(
            f"{out} was started with other settings than this call's ({'; '.join(conflicts)}): "
            f"resume with the settings it was started with (see {out / 'config.json'}) or "
            "choose another output folder"
        )


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"label {int(y.min())} is negative; labels must be 0…{num_classes - 1}")
    check_label_range(y, num_classes)


def _write_metrics(out: Path, history: list[dict]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


# ------------------------------------------------------------------------------------------- DDP
_opened = {"group": False, "failed": False}  # the process group fit opened, and whether a fit in it failed


def _dist_open() -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1) unless one is open; a group opened
    here is closed at interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not _opened["group"]:
            atexit.register(_close_opened_group)
        _opened["group"] = True


def _close_opened_group() -> None:
    if _opened["group"]:
        close_process_group(barrier=not _opened["failed"])


def _dist_ranks() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """Join the process group torchrun describes, as ``fit`` does, for one distributed call → ``(rank,
    world_size)`` (``(0, 1)`` outside torchrun). A group opened here stays open until interpreter exit (see
    the module docstring); a failure inside marks it, so that exit closes it without the barrier."""
    _dist_open()
    try:
        yield _dist_ranks()
    except BaseException:
        _opened["failed"] = True  # the other ranks may never reach a closing barrier
        raise


def close_process_group(*, barrier: bool | None = None) -> None:
    """Leave the open process group (if any) together: a barrier, then destroy it (a no-op without one).

    Exiting with it open let a rank abort in gloo's teardown ("terminate called without an active
    exception") while the machine was loaded. ``barrier=False`` after a failure: the other ranks may never
    reach the barrier, and torchrun ends them when this one exits. ``None`` (the default): the barrier unless
    a ``fit`` or an evaluation in this process failed.
    """
    if barrier is None:
        barrier = not _opened["failed"]
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------- fit
def fit(
    model: nn.Module,
    train: Any,
    *,
    test: Any = None,
    objective: Any = "ce",
    config: FitConfig | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    metadata: dict[str, Any] | None = None,
    callbacks: list[Callable[[dict, nn.Module], Any]] | None = None,
    **overrides: Any,
) -> FitResult:
    """Train ``model`` on ``train`` with ``objective``; returns the trained model and the per-epoch history.

    ``config`` (or keyword overrides of :class:`FitConfig` fields) sets the optimisation; ``out`` is the run
    folder (checkpoints every epoch, ``metrics.jsonl``, ``final.safetensors``); ``resume`` continues there.
    A callback ``cb(record, model)`` runs after each epoch on rank 0 and may add keys to ``record`` or
    return ``"stop"`` to end training early. Under torchrun, a process group opened here is closed at exit
    (see the module docstring).
    """
    _dist_open()
    try:
        return _fit(
            model, train, test=test, objective=objective, config=config, out=out, resume=resume, device=device,
            metadata=metadata, callbacks=callbacks, **overrides,
        )  # fmt: skip
    except BaseException:
        _opened["failed"] = True  # the other ranks may never reach a closing barrier
        raise


def _fit(
    model: nn.Module,
    train: Any,
    *,
    test: Any,
    objective: Any,
    config: FitConfig | None,
    out: str | os.PathLike | None,
    resume: bool,
    device: str | torch.device | None,
    metadata: dict[str, Any] | None,
    callbacks: list[Callable[[dict, nn.Module], Any]] | None,
    **overrides: Any,
) -> FitResult:
    cfg = dataclasses.replace(config or FitConfig(), **overrides) if overrides else (config or FitConfig())
    cfg.validate()
    obj = make_objective(objective)
    rank, world = _dist_ranks()
    device = torch.device(device) if device is not None else default_device()
    out_path = Path(out) if out is not None else None
    history: list[dict[str, Any]] = []
    start_epoch = 0
    seed_everything(cfg.seed)

    if cfg.bf16 and not bf16_is_fast(device):
        log.warning(
            "bf16 autocast was asked for, but this %s has no native bfloat16 units (%s): bf16 is emulated here "
            "and runs several times slower than float32 (a ResNet-20 step 10× slower on an AVX2 CPU); training "
            "in bf16 as asked — drop bf16 (--bf16) for speed",
            device.type, torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device,
        )
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)

    run_meta = {
        "fit": cfg.to_dict(),
        "objective": obj.config(),
        **(metadata or {}),
    }
    if out_path is not None:
        existing = ckpt.epoch_checkpoints(out_path) if out_path.exists() else []
        if existing and not resume:
            raise ConfigError(
                f"{out_path} already holds a run ({len(existing)} epoch checkpoints): pass "
                "resume=True (--resume) to continue it, or choose another output folder"
            )
        if resume:
            state = _latest_state(out_path) if existing else None
            final = out_path / ckpt.FINAL_NAME
            if state is None and final.is_file():
                # a finished run without its epoch checkpoints (a kept copy: bench/_keep.py): its final weights
                # and history are the run, reused as they are (no optimizer state is left to train on with)
                tensors, meta = ckpt.read_tensors(final)
                stored = dict(meta.get("metadata") or {})
                history = list(stored.pop("history", None) or [])
                _refuse_conflicts(
                    out_path, {**stored, "arch": meta.get("arch"), "spec": meta.get("spec")}, run_meta, model
                )
                ckpt.load_state_into(model, tensors, source=f"finished run {final}")
                start_epoch = cfg.epochs
                log.info("%s is a finished run (%s, no epoch checkpoints): reusing it", out_path, final.name)
                if rank == 0:
                    _write_metrics(out_path, history)
            elif state is None:
                log.warning("nothing to resume in %s: starting from scratch", out_path)
            else:
                tensors, meta = state
                ts = meta["training_state"]
                _refuse_conflicts(
                    out_path,
                    {**meta.get("metadata", {}), "arch": meta.get("arch"), "spec": meta.get("spec")},
                    run_meta,
                    model,
                )
                ckpt.load_state_into(
                    model, {k: v for k, v in tensors.items() if not k.startswith("__")}, source="resume checkpoint"
                )
                _optimizer_from_tensors(opt, tensors, ts["optimizer"])
                torch.set_rng_state(tensors["__rng__/torch"])
                if ts.get("objective") is not None:
                    obj.load_state_dict(_unflatten_state(ts["objective"], tensors))
                start_epoch, history = ts["epoch"], ts["history"]
                log.info("resuming %s after epoch %d", out_path, start_epoch)
                if rank == 0:
                    _write_metrics(out_path, history)

    if out_path is not None and rank == 0:
        # the run ends in ckpt.save: whatever would stop it (metadata that is not JSON, a state dict it
        # cannot store) fails here, before any training
        ckpt.check_saveable(model, **run_meta, history=[])
        atomic_write_text(
            out_path / "config.json",
            json.dumps(
                {
                    **run_meta,
                    "arch": getattr(model, "qrobust_arch", None),
                    "spec": getattr(model, "qrobust_spec", None),
                },
                indent=2,
                default=str,
            ),
        )

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    batches = as_batches(
        train, cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed, rank=rank, world_size=world
    )
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    if cfg.max_batches is not None and n_batches is not None:
        n_batches = min(n_batches, cfg.max_batches)
    total_steps = cfg.epochs * (n_batches or 1)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    # labels must index the model's outputs: the first forward tells how many there are (a hook, so the check
    # comes before the objective's loss fails deep inside torch); every later batch is checked against that
    labels: dict[str, Any] = {"y": None, "classes": None}

    def learn_classes(_module: nn.Module, _inputs: Any, output: Any) -> None:
        hook.remove()  # once: the first forward of the run
        if isinstance(output, torch.Tensor) and output.ndim == 2:
            labels["classes"] = int(output.shape[1])
            if labels["y"] is not None:
                _check_labels(labels["y"], labels["classes"])

    hook = model.register_forward_hook(learn_classes)
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        obj.on_epoch_start(epoch)
        net.train()
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        it = progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", total=n_batches)
        for i, (x, y) in enumerate(it):
            if cfg.max_batches is not None and i >= cfg.max_batches:
                break
            step = epoch * (n_batches or 1) + i
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step / total_steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            obj.set_batch_view(getattr(batches, "batch_view", None))  # per-sample state (ODG-Q's bank)
            labels["y"] = y
            if labels["classes"] is not None:
                _check_labels(y, labels["classes"])
            with autocast:
                loss, logits = split_output(obj(net, x, y))
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"the training loss became {loss.item()} at epoch {epoch + 1}, batch {i}: "
                    "lower the learning rate or check the data"
                )
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            if logits is not None:
                correct += (logits.detach().argmax(1) == y).sum().item()
        loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], world, device)
        if seen == 0:
            raise InputError(
                f"epoch {epoch + 1} had no training samples: the training data gave no batches; give data with "
                "at least one sample (and max_batches ≥ 1)"
            )
        elapsed = time.perf_counter() - t0
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "lr": opt.param_groups[0]["lr"],
            "epoch_time_s": elapsed,
            "images_per_s": seen / elapsed if elapsed > 0 else None,
        }
        stop = False
        if rank == 0:
            if test is not None:
                record["test_acc"] = accuracy(model, test, batch_size=cfg.eval_batch_size)
            # an objective may report per-epoch numbers of its own (ODG-Q's domain losses)
            for cb in [obj.callback, *(callbacks or [])]:
                if cb(record, model) == "stop":
                    stop = True
            history.append(record)
            log.info(
                "epoch %d/%d  loss %.4f  train %.4f%s  %.1fs",
                epoch + 1,
                cfg.epochs,
                record["train_loss"],
                record["train_acc"],
                f"  test {record['test_acc']:.4f}" if "test_acc" in record else "",
                elapsed,
            )
            if out_path is not None:
                _save_epoch(out_path, model, opt, epoch + 1, history, run_meta, cfg.keep_checkpoints, obj)
                _write_metrics(out_path, history)
        if world > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            log.warning("training stopped early after epoch %d by a callback", epoch + 1)
            break
    hook.remove()

    model.eval()
    if out_path is not None and rank == 0:
        ckpt.save(model, out_path / ckpt.FINAL_NAME, **run_meta, history=history)
    return FitResult(model=model, history=history, out=out_path)
