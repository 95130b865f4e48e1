"""The typed base every attack derives from: one place for the bookkeeping, subclasses write only the math.

An attack is built once with its hyperparameters (keyword-only) and then called like torchattacks::

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10, seed=0)
    x_adv = atk(x, y)                 # untargeted
    x_adv = atk(x, y, target=t)       # targeted: push every sample towards class t[i]

:meth:`Attack.__call__` is final (a subclass that overrides it is refused at class creation). It owns:

* **validation** — ``x`` a finite float tensor ``N×…`` in [0, 1], ``y`` integer labels of shape ``(N,)`` in
  ``[0, num_classes)`` (known once the model has answered) → :class:`~qrobust.errors.InputError`; bad
  hyperparameters are refused earlier, at construction, with :class:`~qrobust.errors.ConfigError`;
* **model state** — every submodule is put in eval mode and every parameter stops requiring grad for the
  duration of the call; both are restored exactly afterwards (also when the attack raises);
* **device and dtype** — ``x`` and ``y`` travel to the model's device and parameter dtype; the result comes
  back on ``x``'s device and dtype;
* **randomness** — a private :class:`torch.Generator` seeded from ``seed`` at the start of *every* call, so a
  call is a pure function of ``(x, y, target)`` when ``seed`` is set; the global RNG is never touched;
* **the threat model** — every output passes through :func:`project` (ε-ball in the attack's norm, then
  [0, 1]) against the caller's own ``x`` in the caller's dtype, so ``lp_norm(x_adv − x) ≤ ε`` holds by
  construction whatever a subclass does; non-finite outputs are replaced by ``x``;
* **gradients** — ``gradients="ste"`` (the default: the quantizers' straight-through estimators as trained,
  and BPDA for a sample whose gradient they leave all zero — see :func:`qrobust.quant.attack_mode`),
  ``"bpda"`` (every quantizer, clipping included, is the identity backward), ``"native"`` (literal
  autograd: zero almost everywhere through rounding) or ``"surrogate"`` (gradients of
  ``surrogate`` if given, else of the same model inside :func:`qrobust.quant.quantization_disabled`; success
  and losses are always measured on the real model); ``eot_samples`` averages gradients over several
  forward passes for randomized models (Expectation over Transformation);
* **early stopping** (``early_stop=True``, the default, meant for evaluation) — samples the model already
  gets wrong are returned unchanged and never attacked; iterative attacks freeze a sample at its first
  successful adversarial and keep computing only on the rest; restarts run only on samples not yet fooled.
  With ``early_stop=False`` every sample is attacked for the full budget and the attack returns what the
  plain algorithm returns (for PGD: the last iterate, as torchattacks does).

Subclasses implement :meth:`Attack.perturb` ``(x, y) -> x_adv`` on tensors already on the model's device,
where ``y`` holds the *goal* labels (true labels when untargeted, targets when targeted), and use the
helpers :meth:`loss_and_grad`, :meth:`logits`, :meth:`is_success`, :meth:`project`, :attr:`todo`,
:attr:`is_targeted` and the random draws (:meth:`uniform`, :meth:`randn`, :meth:`rademacher`,
:meth:`randint`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

import torch
from torch import nn

from qrobust.errors import ConfigError, InputError
from qrobust.quant.modes import STE_FALLBACK, attack_mode, gradient_mode, quant_modules, quantization_disabled
from qrobust.utils import model_device_dtype
from qrobust.validation import check_choice, check_eps, check_int

log = logging.getLogger(__name__)

NORMS = ("Linf", "L2")
GRADIENTS = ("ste", "bpda", "native", "surrogate")
TARGET_MODES = ("random", "least-likely")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------- norms
def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of ``delta`` (``N×…`` → ``(N,)``) in ``"Linf"`` or ``"L2"``."""
    flat = delta.reshape(delta.shape[0], -1)
    if norm == "Linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    if norm == "L2":
        return flat.norm(p=2, dim=1)
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")


def unit_l2(g: torch.Tensor) -> torch.Tensor:
    """``g / ‖g‖₂`` per sample, safe for tiny gradients (rescaled by their max first, so squares of a
    saturated softmax's 1e-30-sized gradients do not underflow to a zero norm); zero stays zero."""
    flat = g.reshape(g.shape[0], -1)
    m = flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    flat = flat / m
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat.reshape(g.shape)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, *, eps: float | None, norm: str | None) -> torch.Tensor:
    """Project ``x_adv`` onto the ε-ball around ``x`` in ``norm``, then onto [0, 1].

    The result satisfies ``lp_norm(result − x, norm) ≤ eps`` as computed in ``x``'s dtype (float rounding is
    corrected: a coordinate or sample that would land a rounding error outside is pulled back). Clamping to
    [0, 1] after the ball never leaves it, since ``x`` itself lies in [0, 1]. ``eps=None`` (or
    ``norm=None``) clamps to [0, 1] only.

    >>> import torch
    >>> x = torch.full((1, 4), 0.5)
    >>> project(torch.tensor([[0.9, 0.1, 0.52, 2.0]]), x, eps=0.1, norm="Linf")
    tensor([[0.6000, 0.4000, 0.5200, 0.6000]])
    """
    x_adv = x_adv.to(dtype=x.dtype)
    if eps is None or norm is None:
        return x_adv.clamp(0.0, 1.0)
    # ε as the largest value of x's dtype not above the Python float, so "≤ ε" holds in both
    e = torch.tensor(eps, dtype=x.dtype, device=x.device)
    if float(e) > eps:
        e = torch.nextafter(e, torch.zeros_like(e))
    eps = float(e)
    delta = x_adv - x
    if norm == "Linf":
        out = (x + delta.clamp(-eps, eps)).clamp(0.0, 1.0)
        for _ in range(4):  # rounding of x + δ may overshoot by an ulp: step those coordinates towards x
            over = (out - x).abs() > eps
            if not bool(over.any()):
                break
            out = torch.where(over, torch.nextafter(out, x), out)
        return out
    if norm == "L2":
        n = lp_norm(delta, "L2")
        scale = torch.where(n > eps, eps / n.clamp_min(1e-30), torch.ones_like(n))
        out = (x + delta * _view(scale, x)).clamp(0.0, 1.0)
        for k in range(4):  # float rounding can leave the norm a hair above ε: shrink those samples again
            n = lp_norm(out - x, "L2")
            over = n > eps
            if not bool(over.any()):
                return out
            shrink = torch.where(over, eps / n.clamp_min(1e-30) * (1.0 - 4e-7 * 4**k), torch.ones_like(n))
            out = (x + (out - x) * _view(shrink, x)).clamp(0.0, 1.0)
        over = lp_norm(out - x, "L2") > eps
        return torch.where(_view(over, x), x, out)
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")


def default_eps(eps: float | None, norm: str) -> float:
    """The customary ε when none is given: 8/255 in L∞, 0.5 in L2 (CIFAR-10 conventions)."""
    if eps is not None:
        return eps
    return 8 / 255 if norm == "Linf" else 0.5


def _renaming(init: Callable[..., None], cls: type) -> Callable[..., None]:
    """``init`` accepting ``cls.aliases`` (torchattacks' names) for its own keyword arguments."""

    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        for alias, own in cls.aliases.items():
            if alias in kwargs:
                if own in kwargs:
                    raise ConfigError(f"{type(self).__name__} got both {own}= and {alias}= (torchattacks' "
                                      f"name for it); give one")
                kwargs[own] = kwargs.pop(alias)
        init(self, *args, **kwargs)

    return wrapped


def _take(material: Any, idx: torch.Tensor) -> Any:
    if material is None:
        return None
    if isinstance(material, torch.Tensor):
        return material[idx]
    return tuple(_take(m, idx) for m in material)


# ------------------------------------------------------------------------------------------------ base
@dataclass
class _CallState:
    """What one call of an attack knows: built at the start of ``__call__``, dropped at its end."""

    generator: torch.Generator
    device: torch.device
    dtype: torch.dtype
    targeted: bool
    labels: torch.Tensor  # true labels on the device
    todo: torch.Tensor  # (N,) bool: samples the attack should work on
    clean_logits: torch.Tensor
    stats: dict[str, int] = field(default_factory=dict)


class Attack(ABC):
    """Base of every attack: ``__call__`` (final) does the bookkeeping, :meth:`perturb` the math.

    Common keyword arguments (subclasses add their hyperparameters, all keyword-only):

    * ``eps``/``norm`` — the threat model (``norm`` in ``("Linf", "L2")``; ``eps=None`` only where an attack
      is unbounded by design, e.g. CW-L2);
    * ``gradients`` — ``"ste"`` | ``"native"`` | ``"surrogate"`` (see the module docstring), ``surrogate`` an
      optional float model for ``"surrogate"``;
    * ``seed`` — ``None`` (fresh randomness each call) or an int (identical results for identical inputs);
    * ``eot_samples`` — forward/backward passes averaged per gradient;
    * ``early_stop`` — per-sample early stopping (default ``True``);
    * ``targeted`` — ``False``: untargeted unless ``target=`` is passed to the call; ``True``: every call must
      pass ``target=``; ``"random"`` or ``"least-likely"``: targets chosen per call (a uniformly random
      class other than the label, drawn from the attack's generator; or the clean model's least likely
      class) unless ``target=`` is passed;
    * ``allow_unbounded`` — for subclasses only: accept ``eps=None`` (an attack unbounded by design).

    The surrogate model must live on the same device as ``model``.
    """

    # What the attack is, declared by each attack in its own file and read from the class — by the suites
    # (before an attack is built) and by the diagnostics. A fact that depends on a setting is a read-only
    # property of the class that has the setting (PGD's ``randomized`` follows ``random_start``, APGD's
    # ``name`` its loss, Transfer's ``randomized`` its source attack); an instance never assigns one.

    #: the name reports and the registry use (a property where a setting picks the variant, e.g. APGD's loss)
    name: ClassVar[str] = "attack"
    #: never differentiates the attacked model (score-based, gradient-free or transfer): a suite does not hand
    #: it ``gradients=``, and the diagnostics count it on the black-box side of "black-box beats white-box"
    black_box: ClassVar[bool] = False
    #: whether the attack draws random numbers (then different seeds give different results)
    randomized: ClassVar[bool] = False
    #: one gradient step (FGSM-like): the single-step side of "single-step beats iterative"
    single_step: ClassVar[bool] = False
    #: whether ``target=`` may be passed (APGD-T chooses its own targets and refuses one)
    supports_targeted: ClassVar[bool] = True
    #: the reference the diagnostics reuse from a custom suite when it holds one: ``"fgsm"`` (the plain
    #: single-step attack) or ``"pgd"`` (the plain iterative one, rebuilt with twice the steps); else ``None``
    diagnostic_role: ClassVar[str | None] = None
    #: a suite's default label names the step count (``pgd-20``)
    steps_in_label: ClassVar[bool] = False
    #: torchattacks' names for settings this attack calls otherwise (``{"steps": "n_iter"}``): accepted as
    #: keywords and renamed, so code written for torchattacks runs unchanged; giving both is an error
    aliases: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in vars(cls):
            raise TypeError(
                f"{cls.__name__} overrides Attack.__call__, which is final: it owns validation, model "
                f"state and projection. Implement perturb(x, y) instead."
            )
        if cls.aliases and "__init__" in vars(cls):
            cls.__init__ = _renaming(cls.__init__, cls)  # type: ignore[method-assign]

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None,
        norm: str | None = "Linf",
        gradients: str = "ste",
        surrogate: nn.Module | None = None,
        seed: int | None = None,
        eot_samples: int = 1,
        early_stop: bool = True,
        targeted: bool | str = False,
        allow_unbounded: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if norm is not None:
            check_choice("norm", norm, NORMS)
        self.model = model
        self.norm = norm
        self.eps = check_eps(eps, norm, allow_none=allow_unbounded)
        self.gradients = check_choice("gradients", gradients, GRADIENTS)
        if surrogate is not None:
            if not isinstance(surrogate, nn.Module):
                raise ConfigError(f"surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")
            if gradients != "surrogate":
                raise ConfigError(
                    f"a surrogate model was given but gradients={gradients!r}; pass gradients='surrogate' "
                    f"to take gradients on it"
                )
        self.surrogate = surrogate
        if seed is not None:
            check_int("seed", seed, minimum=0)
        self.seed = seed
        self.eot_samples = check_int("eot_samples", eot_samples)
        if not isinstance(early_stop, bool):
            raise ConfigError(f"early_stop must be True or False, got {early_stop!r}")
        self.early_stop = early_stop
        if not isinstance(targeted, bool) and targeted not in TARGET_MODES:
            raise ConfigError(f"targeted must be True, False or one of {TARGET_MODES}, got {targeted!r}")
        if targeted is not False and not self.supports_targeted:
            raise ConfigError(f"{type(self).__name__} does not take targets; leave targeted=False")
        self.targeted = targeted
        self._state: _CallState | None = None
        #: counters of the last call: ``forward_passes`` and ``forward_samples`` (model calls and the samples
        #: they carried), ``gradients`` (per-sample gradients taken), ``zero_gradients`` (of those, exactly
        #: zero everywhere — a masking symptom), ``nan_gradients`` (NaN entries, zeroed)
        self.last_stats: dict[str, int] = {}

    # ------------------------------------------------------------------------------- the public call
    @final
    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples for ``(x, y)`` (towards ``target`` if given): same shape, device, dtype."""
        with torch.inference_mode(False):
            return self.__attack(x, y, target)

    def __attack(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        self._check_x(x)
        self._check_labels(y, x.shape[0], "y")
        if target is not None:
            if not self.supports_targeted:
                raise ConfigError(f"{type(self).__name__} chooses its own targets; call it without target=")
            self._check_labels(target, x.shape[0], "target")
        elif self.targeted is True:
            raise InputError(f"{type(self).__name__} was built with targeted=True: pass target= to the call")

        x_ref = x.detach().clone()
        if x.shape[0] == 0:
            return x_ref
        device, dtype = model_device_dtype(self.model, x.dtype)
        xd = x_ref.to(device=device, dtype=dtype)
        yd = y.detach().to(device=device, dtype=torch.long)
        if self.seed is not None:
            seed = self.seed
        else:
            seed = torch.Generator().seed()  # OS entropy: the global RNG stays untouched
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        stats = {"forward_passes": 0, "forward_samples": 0, "gradients": 0, "zero_gradients": 0,
                 "nan_gradients": 0}

        self._quantized = bool(quant_modules(self.model))
        if self.gradients == "surrogate" and self.surrogate is None and not self._quantized:
            log.warning("gradients='surrogate' on a model without quantizers: its surrogate is itself")
        with self._models_prepared(), torch.enable_grad(), self._gradient_context():
            self._state = _CallState(gen, device, dtype, False, yd, torch.ones(0), torch.ones(0), stats)
            try:
                clean = self.logits(xd)
                k = clean.shape[1]
                self._check_label_range(yd, k, "y")
                goal, targeted = yd, False
                if target is not None:
                    goal, targeted = target.detach().to(device=device, dtype=torch.long), True
                    self._check_label_range(goal, k, "target")
                elif self.targeted == "random":
                    goal, targeted = (yd + self.randint(1, k, yd.shape)) % k, True
                elif self.targeted == "least-likely":
                    goal, targeted = clean.argmin(dim=1), True
                st = self._state
                st.targeted, st.clean_logits = targeted, clean
                everyone = torch.ones_like(yd, dtype=torch.bool)
                st.todo = ~self.is_success(clean, goal) if self.early_stop else everyone
                if bool(st.todo.any()):
                    x_adv = self.perturb(xd, goal)
                    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != xd.shape:
                        raise RuntimeError(
                            f"{type(self).__name__}.perturb returned {getattr(x_adv, 'shape', type(x_adv))}, "
                            f"expected a tensor of shape {tuple(xd.shape)}"
                        )
                    x_adv = x_adv.detach()
                else:
                    x_adv = xd
                todo = st.todo
            finally:
                self.last_stats = dict(stats)
                self._state = None

        out = x_adv.to(device=x_ref.device, dtype=x_ref.dtype)
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            log.warning("%s produced %d non-finite values; they are replaced by the clean input",
                        type(self).__name__, int(bad.sum()))
            out = torch.where(bad, x_ref, out)
        if self.early_stop:
            keep = _view(todo.to(x_ref.device), x_ref)
            out = torch.where(keep, out, x_ref)
        return project(out, x_ref, eps=self.eps, norm=self.norm)

    # ------------------------------------------------------------------------------ the subclass part
    @abstractmethod
    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's math: ``x`` clean inputs on the model's device, ``y`` goal labels → ``x_adv``."""

    # --------------------------------------------------------------------------- helpers for perturb
    @property
    def state(self) -> _CallState:
        if self._state is None:
            raise RuntimeError("this helper is only available while the attack runs (inside perturb)")
        return self._state

    @property
    def is_targeted(self) -> bool:
        """Whether the current call is targeted (``y`` given to :meth:`perturb` are then the targets)."""
        return self.state.targeted

    @property
    def todo(self) -> torch.Tensor:
        """(N,) bool: samples to attack — under early stopping, those the model still gets right."""
        return self.state.todo.clone()

    @property
    def labels(self) -> torch.Tensor:
        """The true labels of the current call (equal to ``y`` of :meth:`perturb` when untargeted)."""
        return self.state.labels

    @property
    def generator(self) -> torch.Generator:
        return self.state.generator

    def uniform(self, shape: tuple[int, ...] | torch.Size, low: float = 0.0, high: float = 1.0
                ) -> torch.Tensor:
        st = self.state
        u = torch.rand(tuple(shape), generator=st.generator, device=st.device, dtype=st.dtype)
        return low + (high - low) * u

    def randn(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        st = self.state
        return torch.randn(tuple(shape), generator=st.generator, device=st.device, dtype=st.dtype)

    def rademacher(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Independent ±1 entries."""
        st = self.state
        r = torch.randint(0, 2, tuple(shape), generator=st.generator, device=st.device)
        return (2 * r - 1).to(st.dtype)

    def randint(self, low: int, high: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        st = self.state
        return torch.randint(low, high, tuple(shape), generator=st.generator, device=st.device)

    def is_success(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) bool: untargeted — the prediction differs from ``y``; targeted — it equals ``y``."""
        pred = logits.argmax(dim=1)
        return pred == y if self.state.targeted else pred != y

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Onto this attack's ε-ball around ``x`` and [0, 1]."""
        return project(x_adv, x, eps=self.eps, norm=self.norm)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the real model at ``x`` (no gradient; averaged over ``eot_samples`` passes)."""
        with torch.no_grad():
            out = self._forward(self.model, x)
            for _ in range(self.eot_samples - 1):
                out = out + self._forward(self.model, x)
        return out / self.eot_samples if self.eot_samples > 1 else out

    def loss_and_grad(
        self, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss, its gradient w.r.t. ``x_adv`` and the real model's logits (honours ``gradients``).

        ``loss_fn(logits, y) -> (N,)``. The gradient is that of ``loss_fn(...).sum()``, averaged over
        ``eot_samples`` passes, taken on the model in the current gradient mode, or on the surrogate under
        ``gradients="surrogate"`` — then the returned loss and logits come from separate passes through the
        real model, so success checks never trust the surrogate. NaN gradient entries are zeroed and counted
        in ``last_stats["nan_gradients"]``.
        """
        st = self.state
        x_adv = x_adv.detach()
        grad = torch.zeros_like(x_adv)
        loss_sum: torch.Tensor | None = None
        logits_sum: torch.Tensor | None = None
        for _ in range(self.eot_samples):
            xg = x_adv.clone().requires_grad_(True)
            if self.gradients == "surrogate":
                with self._surrogate_model() as net:
                    g = self._grad(loss_fn(self._forward(net, xg), y), xg)
                with torch.no_grad():
                    logits = self._forward(self.model, x_adv)
                    loss = loss_fn(logits, y)
            else:
                logits = self._forward(self.model, xg)
                loss_g = loss_fn(logits, y)
                g = self._grad(loss_g, xg)
                loss, logits = loss_g.detach(), logits.detach()
            grad += g
            loss_sum = loss if loss_sum is None else loss_sum + loss
            logits_sum = logits if logits_sum is None else logits_sum + logits
        if self.gradients == "ste" and self._quantized:
            # the clipped estimator is zero where every path saturates: those samples take BPDA's gradient
            zero = grad.reshape(grad.shape[0], -1).abs().amax(dim=1) == 0
            if bool(zero.any()):
                st.stats["bpda_fallbacks"] = st.stats.get("bpda_fallbacks", 0) + int(zero.sum())
                with gradient_mode(STE_FALLBACK):
                    g2 = torch.zeros_like(x_adv[zero])
                    for _ in range(self.eot_samples):
                        xz = x_adv[zero].clone().requires_grad_(True)
                        g2 += self._grad(loss_fn(self._forward(self.model, xz), y[zero]), xz)
                grad[zero] = g2
        st.stats["gradients"] += x_adv.shape[0]
        st.stats["zero_gradients"] += int((grad.reshape(grad.shape[0], -1).abs().amax(dim=1) == 0).sum())
        n = float(self.eot_samples)
        assert loss_sum is not None and logits_sum is not None
        if n > 1:
            grad, loss_sum, logits_sum = grad / n, loss_sum / n, logits_sum / n
        nan = torch.isnan(grad)
        if bool(nan.any()):
            st.stats["nan_gradients"] += int(nan.sum())
            grad = torch.nan_to_num(grad, nan=0.0)
        return loss_sum, grad, logits_sum

    def run_restarts(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        restarts: int,
        single_run: Callable[[torch.Tensor, torch.Tensor, Any, bool], tuple[
            torch.Tensor, torch.Tensor, torch.Tensor | None]],
        draw: Callable[[torch.Tensor], Any] | None = None,
    ) -> torch.Tensor:
        """The restart loop shared by the iterative attacks.

        ``draw(x)`` makes one restart's random material for the *whole* batch (a tensor, a tuple of
        tensors or ``None``), so a sample's randomness does not depend on which others are still attacked;
        ``single_run(x_sub, y_sub, material_sub, need_final)`` runs one attempt on a subset and returns
        ``(x_adv, success, loss)``. Under early stopping restarts run only on samples not yet fooled and a
        sample keeps the first attempt that fooled it; otherwise every restart runs on every sample, each
        keeping the attempt that fooled it first, or else its highest-loss one (``loss`` may be ``None``
        when ``need_final`` is False, i.e. with a single restart).
        """
        n = x.shape[0]
        todo = self.todo
        x_out = x.clone()
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        best = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
        for r in range(restarts):
            material = draw(x) if draw is not None else None
            run = todo & ~fooled if self.early_stop else todo
            idx = run.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_r, succ, loss = single_run(x[idx], y[idx], _take(material, idx), restarts > 1)
            if loss is None or r == 0:
                x_out[idx] = x_r
                fooled[idx] |= succ
                if loss is not None:
                    best[idx] = loss
                continue
            was = fooled[idx]
            take = (succ & ~was) | (~was & ~succ & (loss > best[idx]))
            sel = idx[take]
            x_out[sel] = x_r[take]
            fooled[sel] |= succ[take]
            best[sel] = loss[take]
        return x_out

    # ------------------------------------------------------------------------------------- internals
    def _grad(self, loss: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
        if loss.shape != (xg.shape[0],):
            raise RuntimeError(f"a loss function must return one value per sample, got {tuple(loss.shape)}")
        if not loss.requires_grad:  # the model's output does not depend on x differentiably
            return torch.zeros_like(xg)
        (g,) = torch.autograd.grad(loss.sum(), xg, allow_unused=True)
        return torch.zeros_like(xg) if g is None else g.detach()

    def _forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        out = net(x)
        st.stats["forward_passes"] += 1
        st.stats["forward_samples"] += x.shape[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise InputError(
                f"the model must return logits of shape (N, num_classes); for an input of shape "
                f"{tuple(x.shape)} it returned {getattr(out, 'shape', type(out).__name__)}"
            )
        if out.shape[1] < 2:
            raise InputError(f"the model returned {out.shape[1]} logit per sample; attacks need ≥ 2 classes")
        return out.to(st.dtype)

    @contextmanager
    def _surrogate_model(self) -> Iterator[nn.Module]:
        if self.surrogate is not None:
            with gradient_mode("estimator"):
                yield self.surrogate
        else:
            with quantization_disabled(self.model) as m:
                yield m

    def _gradient_context(self) -> Any:
        if self.gradients == "surrogate":
            return nullcontext()
        return gradient_mode(attack_mode(self.gradients))

    def _nets(self) -> list[nn.Module]:
        nets = [self.model]
        if self.surrogate is not None:
            nets.append(self.surrogate)
        return nets

    @contextmanager
    def _models_prepared(self) -> Iterator[None]:
        """Eval mode and frozen parameters for the duration; every flag restored exactly afterwards."""
        nets = self._nets()
        modes = [(m, m.training) for net in nets for m in net.modules()]
        grads = [(p, p.requires_grad) for net in nets for p in net.parameters()]
        try:
            for net in nets:
                net.eval()
            for p, _ in grads:
                p.requires_grad_(False)
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, req in grads:
                p.requires_grad_(req)

    @staticmethod
    def _check_x(x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}; use torch.as_tensor")
        if not x.is_floating_point():
            raise InputError(f"x must be a float tensor with pixels in [0, 1], got dtype {x.dtype}; divide "
                             f"uint8 images by 255")
        if x.dim() < 2:
            raise InputError(f"x must be a batch N×… (e.g. N×C×H×W), got shape {tuple(x.shape)}; add a batch "
                             f"dimension with x.unsqueeze(0)")
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise InputError("x contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(f"x must lie in [0, 1] (pixels; normalization belongs inside the model), got "
                             f"values in [{lo:.4g}, {hi:.4g}]")

    @staticmethod
    def _check_labels(y: Any, n: int, what: str) -> None:
        if not isinstance(y, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor of int64 labels, got {type(y).__name__}")
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise InputError(f"{what} must hold integer class indices (int64), got dtype {y.dtype}")
        if y.dim() != 1:
            raise InputError(f"{what} must have shape (N,), got {tuple(y.shape)}")
        if y.shape[0] != n:
            raise InputError(f"{what} has {y.shape[0]} labels but x has {n} samples: one label per sample")

    @staticmethod
    def _check_label_range(y: torch.Tensor, k: int, what: str) -> None:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise InputError(f"{what} must lie in [0, {k}) for a model with {k} classes, got values in "
                             f"[{int(y.min())}, {int(y.max())}]")

    # ---------------------------------------------------------------------------------- description
    def config(self) -> dict[str, Any]:
        """The attack's settings as plain data (for reports): name plus every keyword hyperparameter."""
        out: dict[str, Any] = {"attack": self.name}
        for cls in reversed(type(self).__mro__):
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name == "allow_unbounded":
                    continue
                v = getattr(self, p.name, None)
                if isinstance(v, float) and not math.isfinite(v):
                    out[p.name] = str(v)  # JSON has no infinity
                elif isinstance(v, (bool, int, float, str)) or v is None:
                    out[p.name] = v
                elif isinstance(v, (tuple, list)) and all(isinstance(e, (bool, int, float, str)) for e in v):
                    out[p.name] = list(v)
                elif isinstance(v, Attack):
                    out[p.name] = v.config()
        out["norm"] = self.norm
        out["attack"] = self.name
        return out

    def __repr__(self) -> str:
        cfg = self.config()
        cfg.pop("attack")
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if not isinstance(v, dict))
        return f"{type(self).__name__}({args})"
