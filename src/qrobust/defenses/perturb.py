"""Training-time adversarial perturbations: the one small L∞ loop every adversarial recipe shares.

Evaluation attacks (:mod:`qrobust.attacks`) always run the model in eval mode and pay for a clean forward
pass to skip samples that are already wrong — the right choices for measuring robustness, the wrong ones
inside a training step, where every extra pass is paid on every batch. This module crafts the way the
reference training codes do (Madry et al.'s PGD-AT, Wong et al.'s FGSM-RS):

* **mode** — ``"train"`` (default): the model stays in training mode, so batch-norm normalises the
  perturbed batch with its own statistics exactly as the training forward that follows will. Unlike the
  reference codes, the crafting passes do *not* update BN running statistics (their momentum is set to 0
  for the duration), so the statistics used at test time come from the training forwards only.
  ``"eval"``: running statistics and no dropout while crafting (TRADES's official code crafts this way);
* **parameters** stop requiring grad while crafting, so each backward computes the input gradient only
  (no weight gradients), which is what makes a crafting step cheaper than a training step;
* **gradients** through quantizers are the straight-through ones training uses (the current
  :func:`qrobust.quant.gradient_mode`); ``float_copy=True`` crafts on the float surrogate instead
  (every quantizer disabled, :func:`qrobust.quant.quantization_disabled`);
* **randomness** comes from torch's global CPU generator (moved to the model's device afterwards), which
  :func:`qrobust.fit` seeds from its ``seed`` and restores on resume: runs are reproducible from the fit
  seed and a resumed run draws the same numbers as an uninterrupted one;
* **the threat model** — every iterate is clipped to the ε-ball and to [0, 1] by :func:`clip_linf`, the
  two clamps of :func:`qrobust.attacks.project` without its ulp-exactness loop (which synchronises with
  the device on every call; training does not need ‖δ‖∞ ≤ ε to the last bit).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
>>> x, y = torch.rand(2, 4), torch.tensor([0, 2])
>>> x_adv = linf_perturb(net, x, ce_per_sample(y), eps=0.1, alpha=0.125, steps=1, start="uniform")
>>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all()) and bool(net[1].weight.requires_grad)
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.losses import margin_loss
from qrobust.errors import ConfigError
from qrobust.quant.modes import quantization_disabled

CRAFT_MODES = ("train", "eval")
STARTS = ("uniform", "normal", "none")

#: ``loss_fn(logits) -> (N,)`` per-sample loss that the perturbation ascends
PerSampleLoss = Callable[[torch.Tensor], torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (crafting passes must not go through
    DDP, whose reducer expects every forward to be followed by a weight backward)."""
    return getattr(model, "module", model) if isinstance(model, (nn.parallel.DistributedDataParallel,
                                                                   nn.DataParallel)) else model


def check_mode(mode: str) -> str:
    if mode not in CRAFT_MODES:
        raise ConfigError(f"craft_mode must be one of {CRAFT_MODES}, got {mode!r}")
    return mode


@contextmanager
def crafting(model: nn.Module, *, mode: str = "train", float_copy: bool = False) -> Iterator[nn.Module]:
    """The model prepared for crafting (see the module docstring); every flag restored afterwards."""
    check_mode(mode)
    net = unwrap(model)
    modes = [(m, m.training) for m in net.modules()]
    grads = [(p, p.requires_grad) for p in net.parameters()]
    bns = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
           for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        if mode == "eval":
            net.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        for m, _, _ in bns:
            m.momentum = 0.0  # batch statistics are used, running statistics stay as they are
        with quantization_disabled(net) if float_copy else nullcontext(net), torch.enable_grad():
            yield net
    finally:
        for m, training in modes:
            m.training = training
        for p, req in grads:
            p.requires_grad_(req)
        for m, mom, tracked in bns:
            m.momentum = mom
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def clip_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_adv`` clipped to the L∞ ε-ball around ``x`` and to [0, 1].

    >>> clip_linf(torch.tensor([0.9, 0.1, -0.5]), torch.tensor([0.5, 0.5, 0.05]), 0.1)
    tensor([0.6000, 0.4000, 0.0000])
    """
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def random_delta(x: torch.Tensor, eps: float, kind: str = "uniform") -> torch.Tensor:
    """A random start: uniform in the ε-cube, ``0.001·N(0, 1)`` (TRADES's start) or zeros, drawn from the
    global CPU generator."""
    if kind == "uniform":
        d = (torch.rand(x.shape, dtype=torch.float32) * 2 - 1) * eps
    elif kind == "normal":
        d = 0.001 * torch.randn(x.shape, dtype=torch.float32)
    elif kind == "none":
        return torch.zeros_like(x)
    else:
        raise ConfigError(f"start must be one of {STARTS}, got {kind!r}")
    return d.to(device=x.device, dtype=x.dtype)


def ce_per_sample(y: torch.Tensor) -> PerSampleLoss:
    """Cross-entropy of the true labels, per sample."""
    return lambda logits: F.cross_entropy(logits, y, reduction="none")


def cw_per_sample(y: torch.Tensor) -> PerSampleLoss:
    """The Carlini–Wagner margin ``max_{j≠y} z_j − z_y``, per sample."""
    return lambda logits: margin_loss(logits, y)


def input_gradient(net: nn.Module, x: torch.Tensor, loss_fn: PerSampleLoss) -> torch.Tensor:
    """∇ₓ Σᵢ loss_fn(net(x))ᵢ, taken on a net already prepared by :func:`crafting`."""
    xg = x.detach().requires_grad_(True)
    loss = loss_fn(net(xg))
    if not loss.requires_grad:  # nothing differentiable between x and the loss
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(loss.float().sum(), xg)
    return torch.nan_to_num(g.detach(), nan=0.0)


def linf_perturb(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: PerSampleLoss,
    *,
    eps: float,
    alpha: float,
    steps: int,
    start: str | torch.Tensor = "uniform",
    mode: str = "train",
    float_copy: bool = False,
) -> torch.Tensor:
    """``x_adv`` after ``steps`` signed-gradient ascent steps of size ``alpha`` on ``loss_fn``, each projected
    onto the L∞ ε-ball around ``x`` and onto [0, 1]; ``start`` is a random-start kind or a given δ.

    ``steps=1, alpha=1.25·eps, start="uniform"`` is FGSM-RS; ``steps=k, alpha=eps/4`` PGD-k. Returns a
    detached tensor; the model's parameters, modes and BN statistics are left as they were.
    """
    x = x.detach()
    delta = start.to(x) if isinstance(start, torch.Tensor) else random_delta(x, eps, start)
    x_adv = clip_linf(x + delta, x, eps)
    with crafting(model, mode=mode, float_copy=float_copy) as net:
        for _ in range(steps):
            g = input_gradient(net, x_adv, loss_fn)
            x_adv = clip_linf(x_adv + alpha * g.sign(), x, eps)
    return x_adv.detach()
