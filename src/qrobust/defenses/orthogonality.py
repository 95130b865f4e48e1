"""Defensive Quantization (Lin, Gan & Han, ICLR 2019): keep every layer's Lipschitz constant near 1.

The penalty is ``β/2 · Σ_l ‖G_l − I‖²_F`` over the covered convolution and linear layers, where ``G_l`` is
the Gram matrix of the layer's weight reshaped to a matrix ``W`` of shape ``(m, n)`` — ``(c_out,
c_in/groups·k_h·k_w)`` for a convolution, ``(out, in)`` for a linear layer.

**Which Gram matrix.** ``G = W Wᵀ`` (m×m) when ``m ≤ n``, else ``G = Wᵀ W`` (n×n): always the *smaller*
one, which is cheaper and is the one that can actually reach the identity (a wide matrix can have
orthonormal rows, never orthonormal columns). The choice changes nothing but a constant:
``tr((WᵀW)²) = tr((WWᵀ)²)`` and ``tr(WᵀW) = tr(WWᵀ)``, so for *every* ``W``

    ‖WᵀW − I_n‖²_F − ‖WWᵀ − I_m‖²_F = n − m,

and both forms have the same gradient, ``∂/∂W [β/2 ‖WᵀW − I‖²_F] = 2β·W(WᵀW − I) = 2β·(WWᵀ − I)W``.
Values reported by :func:`orthogonality_error` are therefore 0 for a matrix with orthonormal rows (wide)
or columns (tall), where the larger Gram form would report ``√(n − m)``.

**Latent or quantized weights** (``weights=``). ``"latent"`` (default) penalises the float parameters the
optimizer updates; ``"quantized"`` penalises what a quantized layer computes with
(``layer.quantized_weight()``), the gradient reaching the latent weights through the quantizer's
straight-through estimator. Latent is the default because (1) in the paper's setting — activation-only
quantization — the two are the same tensor; (2) with the default per-channel uniform weight quantizer
the quantized weight is the latent one up to rounding, so the latent penalty controls the deployed
operator's norm while staying smooth (the quantized penalty's value jumps whenever a weight crosses a
rounding boundary); (3) it needs no extra quantizer pass. Use ``"quantized"`` for schemes whose output
scale is decoupled from the latent weight (DoReFa maps every weight into [−1, 1] whatever its scale), or
to regularise exactly the deployed weights.

**Layers** (``layers=``): ``"all"`` every convolution and linear layer; ``"hidden"`` all but the first
weight layer and the classifier (the last ``Linear``; the last weight layer when there is none); or a
list of module names (a name also covers the layers under it, e.g. ``"layer3"``).

**BatchNorm** (``bn=``). A BatchNorm after a convolution multiplies each output channel by
``γ/√(running_var + ε)`` and undoes any rescaling of the weights before it, so with ``bn="ignore"``
(default, the paper's formula) a network can satisfy the penalty by shrinking its weights while its BN gains
grow: on CIFAR-10 ResNet-20, β = 3e-2 cut the product of the conv norms 5,700× and the BN gains rose 150×.
``bn="fold"`` penalises the folded matrix ``diag(γ/σ)·W`` of each conv/linear layer with the BatchNorm that
follows it in module order (same channel count; the usual conv → BN pairing, and a pre-activation block's
next BN), so the penalty reaches the operator the network actually applies; the gradient flows to W and
γ (the running variance is a statistic, held constant).

**Cost.** The penalty is computed once per training step (as a regulariser of
:class:`~qrobust.defenses.objectives.Sum`), as one autograd node with a closed-form backward, batched:
layers whose reshaped weights have the same shape share one ``bmm`` forward and one backward. It costs
``2·Σ_l min(m,n)²·max(m,n)`` multiply-adds per step, independent of the batch size: measured 0.4–0.8 % of
a training step of ResNet-20 w4a4 at batch 128 (CPU); on the tiny ``digits_cnn`` at batch 64 about 20 %,
because its 64×512 ``fc1`` Gram matrix alone costs as much as ``fc1``'s forward pass over the batch.

>>> import torch
>>> from torch import nn
>>> lin = nn.Linear(4, 2, bias=False)
>>> with torch.no_grad():
...     _ = lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]))
>>> OrthogonalityPenalty(0.5)(lin).item()    # β/2 · (2² − 1)² = 0.25 · 9
2.25
>>> round(orthogonality_error(lin)["total"], 6)
3.0
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qrobust.defenses.objectives import Sum, make_objective, register_objective
from qrobust.errors import ConfigError
from qrobust.models.introspect import weight_layers

log = logging.getLogger(__name__)

__all__ = ["BN_CHOICES", "LAYER_CHOICES", "WEIGHT_CHOICES", "OrthogonalityPenalty", "dq_objective",
           "following_batchnorms", "orthogonality_error", "penalized_layers"]

LAYER_CHOICES = ("all", "hidden")
WEIGHT_CHOICES = ("latent", "quantized")
BN_CHOICES = ("ignore", "fold")


def following_batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight layer name: the BatchNorm that follows it}`` in module registration order, when the next
    BatchNorm after a conv/linear layer (before another weight layer) has as many features as the layer has
    outputs."""
    out: dict[str, nn.Module] = {}
    pending: tuple[str, int] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if pending is not None and m.num_features == pending[1]:
                out[pending[0]] = m
            pending = None
        elif isinstance(m, nn.modules.conv._ConvNd) or _is_linear(m):
            w = getattr(m, "weight", None)
            pending = (name, int(w.shape[0])) if isinstance(w, torch.Tensor) else None
    return out


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    """A BatchNorm's per-channel gain ``γ/√(running_var + ε)`` (γ = 1 without affine parameters)."""
    inv = torch.rsqrt(bn.running_var + bn.eps) if bn.running_var is not None else None
    if inv is None:
        raise ConfigError(f"bn='fold' needs BatchNorm running statistics; {bn} tracks none")
    return inv * bn.weight if bn.weight is not None else inv


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__.endswith("Linear")


def penalized_layers(model: nn.Module, layers: str | Sequence[str] = "all") -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs a penalty with this ``layers`` setting covers, in module order."""
    all_layers = weight_layers(model)
    if not all_layers and (_is_linear(model) or isinstance(model, nn.modules.conv._ConvNd)):
        all_layers = [("", model)]  # the model is itself one layer
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise ConfigError(
                f"layers must be one of {LAYER_CHOICES} or a list of module names, got {layers!r}"
            )
        if layers == "all" or not all_layers:
            return all_layers
        first = all_layers[0][0]
        linears = [n for n, m in all_layers if _is_linear(m)]
        last = linears[-1] if linears else all_layers[-1][0]
        return [(n, m) for n, m in all_layers if n not in (first, last)]
    names = [str(n) for n in layers]
    if not names:
        raise ConfigError("layers is an empty list; give module names such as ['conv2', 'fc1'], or 'all'")
    chosen = [(n, m) for n, m in all_layers if any(n == k or n.startswith(k + ".") for k in names)]
    unknown = [k for k in names if not any(n == k or n.startswith(k + ".") for n, _ in all_layers)]
    if unknown:
        raise ConfigError(
            f"layers {unknown} name no convolution or linear layer of this model (nor a prefix of one); "
            f"weight layers: {[n for n, _ in all_layers][:30]}"
        )
    return chosen


def _weight(module: nn.Module, weights: str, bn: nn.Module | None = None) -> torch.Tensor:
    """The layer's weight — latent parameter or the quantized weight it computes with — times the gain of
    the BatchNorm ``bn`` that follows it, if given."""
    w = module.quantized_weight() if weights == "quantized" and hasattr(module, "quantized_weight") else module.weight
    if bn is not None:
        w = w * _bn_scale(bn).to(w.dtype).reshape(-1, *([1] * (w.ndim - 1)))
    return w


def _matrix(module: nn.Module, weights: str, bn: nn.Module | None = None) -> torch.Tensor:
    """The layer's (possibly BN-folded) weight as an (m, n) matrix."""
    w = _weight(module, weights, bn)
    return w.reshape(w.shape[0], -1)


class _GramResidualSq(torch.autograd.Function):
    """``‖G − I‖²_F`` per matrix of a stack ``(k, m, n)``, G the smaller Gram matrix, with the closed-form
    gradient ``4·(WWᵀ − I)W`` (= ``4·W(WᵀW − I)``): one matmul forward and one backward, where autograd
    of ``W @ Wᵀ`` would spend two in the backward pass."""

    @staticmethod
    def forward(ctx: Any, mats: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        m, n = mats.shape[-2:]
        wide = m <= n
        with _no_autocast(mats):
            g = mats @ mats.transpose(-2, -1) if wide else mats.transpose(-2, -1) @ mats
        g.diagonal(dim1=-2, dim2=-1).sub_(1.0)  # g is now G − I
        ctx.save_for_backward(mats, g)
        ctx.wide = wide
        return g.square().sum(dim=(-2, -1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mats, d = ctx.saved_tensors
        gw = d @ mats if ctx.wide else mats @ d
        return gw * (4.0 * grad).reshape(-1, 1, 1)


def _no_autocast(t: torch.Tensor) -> Any:
    """The Gram matrices in the weights' own precision even under bf16 autocast: ``G − I`` is a small
    difference of numbers near 1, which bfloat16's 8-bit mantissa would round away, and the backward pass
    (run outside autocast) must see the dtype the forward saved."""
    return torch.autocast(device_type=t.device.type, enabled=False)


class _PenaltySum(torch.autograd.Function):
    """``scale · Σ_l ‖G_l − I‖²_F`` over weights of any shapes as *one* autograd node: layers are grouped by
    reshaped shape, each group is one batched matmul forward and one backward, and no intermediate
    reshape/stack/sum nodes reach the autograd graph — on a small network their per-op overhead costs
    more than the arithmetic."""

    @staticmethod
    def forward(ctx: Any, scale: float, *weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, w in enumerate(weights):
            groups.setdefault((w.shape[0], w[0].numel(), w.dtype, w.device), []).append(i)
        total = weights[0].new_zeros((), dtype=torch.float32 if weights[0].dtype == torch.bfloat16
                                     else weights[0].dtype)
        saved = []
        for (m, n, _, _), idx in groups.items():
            mats = weights[idx[0]].reshape(1, m, n) if len(idx) == 1 else torch.stack(
                [weights[i].reshape(m, n) for i in idx])
            wide = m <= n
            with _no_autocast(mats):
                d = mats @ mats.transpose(-2, -1) if wide else mats.transpose(-2, -1) @ mats
            d.diagonal(dim1=-2, dim2=-1).sub_(1.0)
            total += d.square().sum()
            saved.append((idx, mats, d, wide))
        ctx.saved = saved
        ctx.scale = scale
        ctx.shapes = [w.shape for w in weights]
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        out: list[torch.Tensor | None] = [None] * len(ctx.shapes)
        factor = 4.0 * ctx.scale * grad
        for idx, mats, d, wide in ctx.saved:
            gw = (d @ mats if wide else mats @ d) * factor
            for j, i in enumerate(idx):
                out[i] = gw[j].reshape(ctx.shapes[i])
        return (None, *out)


def _gram_residual_sq(mats: torch.Tensor) -> torch.Tensor:
    """``‖G − I‖²_F`` for a stack of equally shaped matrices ``(k, m, n)``, with G the smaller Gram."""
    return _GramResidualSq.apply(mats)


def _check_weights(weights: str) -> str:
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    return weights


class OrthogonalityPenalty:
    """Regulariser ``reg(model) -> β/2 · Σ_l ‖G_l − I‖²_F`` (see the module docstring for G, layers, weights).

    A scalar tensor on the model's device, differentiable w.r.t. the weights; used as
    ``Sum(CrossEntropy(), OrthogonalityPenalty(3e-4))`` or through ``make_objective("dq", beta=...)``.
    """

    name = "dq"

    def __init__(
        self, beta: float, *, layers: str | Sequence[str] = "all", weights: str = "latent", bn: str = "ignore"
    ) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0 or beta == float("inf"):
            raise ConfigError(f"beta must be a finite number ≥ 0 (the paper uses 3e-4 … 6e-4), got {beta!r}")
        self.beta = float(beta)
        if not isinstance(layers, str):
            layers = [str(n) for n in layers]
        elif layers not in LAYER_CHOICES:
            raise ConfigError(f"layers must be one of {LAYER_CHOICES} or a list of module names, got {layers!r}")
        self.layers = layers
        self.weights = _check_weights(weights)
        if bn not in BN_CHOICES:
            raise ConfigError(f"bn must be one of {BN_CHOICES}, got {bn!r}")
        self.bn = bn
        self._bns: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()
        self._cache: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, nn.Module, nn.Module | None, str]]] = (
            weakref.WeakKeyDictionary()
        )

    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The covered layers, cached per model between steps (walking the module tree every step costs as
        much as the penalty on a small network). The cache is checked on every call: a layer swapped for
        another module (e.g. by ``quantize(model, inplace=True)``) rebuilds it."""
        entry = self._cache.get(model)
        if entry is not None and all(
            parent is None or getattr(parent, attr, None) is mod for _, mod, parent, attr in entry
        ):
            return [(n, m) for n, m, _, _ in entry]
        chosen = penalized_layers(model, self.layers)
        if not chosen:
            raise ConfigError(
                f"the orthogonality penalty covers no layer of {type(model).__name__} (layers={self.layers!r}); "
                "use layers='all' or a model with convolution/linear layers"
            )
        entry = []
        for name, mod in chosen:
            parent_name, _, attr = name.rpartition(".")
            parent = (model.get_submodule(parent_name) if parent_name else model) if name else None
            entry.append((name, mod, parent, attr))
        self._cache[model] = entry
        if self.bn == "fold":
            self._bns[model] = following_batchnorms(model)
        return chosen

    def _bn_of(self, model: nn.Module, name: str) -> nn.Module | None:
        return self._bns[model].get(name) if self.bn == "fold" else None

    def _groups(self, model: nn.Module) -> tuple[list[str], list[list[int]], list[torch.Tensor]]:
        chosen = self._layers(model)
        groups: dict[tuple[Any, ...], list[int]] = {}
        mats = []
        for i, (n, m) in enumerate(chosen):
            w = _matrix(m, self.weights, self._bn_of(model, n))
            mats.append(w)
            groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
        return [n for n, _ in chosen], list(groups.values()), mats

    @staticmethod
    def _stack(mats: list[torch.Tensor], idx: list[int]) -> torch.Tensor:
        return mats[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([mats[i] for i in idx])

    def residuals(self, model: nn.Module) -> tuple[list[str], torch.Tensor]:
        """Layer names and their ``‖G_l − I‖²_F`` (a differentiable 1-D tensor in the same order)."""
        names, groups, mats = self._groups(model)
        values: list[torch.Tensor | None] = [None] * len(names)
        for idx in groups:
            res = _gram_residual_sq(self._stack(mats, idx))
            for j, i in enumerate(idx):
                values[i] = res[j]
        return names, torch.stack(values)  # type: ignore[arg-type]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        if self.beta == 0.0:
            p = next(model.parameters())
            return p.new_zeros(())
        weights = [_weight(m, self.weights, self._bn_of(model, n)) for n, m in self._layers(model)]
        return _PenaltySum.apply(0.5 * self.beta, *weights)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "beta": self.beta,
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "weights": self.weights,
            "bn": self.bn,
            "gram": "smaller",
        }

    def __repr__(self) -> str:
        return (f"OrthogonalityPenalty(beta={self.beta:g}, layers={self.layers!r}, weights={self.weights!r}, "
                f"bn={self.bn!r})")


@torch.no_grad()
def orthogonality_error(
    model: nn.Module, *, layers: str | Sequence[str] = "all", weights: str = "latent", bn: str = "ignore"
) -> dict[str, Any]:
    """How far each layer is from orthogonal: ``‖G_l − I‖_F`` per layer (smaller Gram, see module docs).

    Returns ``{"per_layer": {name: ‖G_l − I‖_F}, "total": √Σ_l ‖G_l − I‖²_F, "sum_sq": Σ_l ‖G_l − I‖²_F
    (the penalty is β/2 times it), "mean": mean per-layer value, "layers": layers, "weights": weights}``.
    """
    pen = OrthogonalityPenalty(0.0, layers=layers, weights=weights, bn=bn)
    names, res = pen.residuals(model)
    res = res.double().clamp_min(0.0)
    per = {n: float(r.sqrt()) for n, r in zip(names, res)}
    return {
        "per_layer": per,
        "total": float(res.sum().sqrt()),
        "sum_sq": float(res.sum()),
        "mean": float(res.sqrt().mean()),
        "layers": layers if isinstance(layers, str) else list(layers),
        "weights": weights,
        "bn": bn,
    }


@register_objective("dq")
def dq_objective(
    *,
    beta: float = 3e-4,
    base: Any = "ce",
    layers: str | Sequence[str] = "all",
    weights: str = "latent",
    bn: str = "ignore",
    **base_options: Any,
) -> Sum:
    """The "dq" objective: ``base`` (a registered objective name or an objective) plus the penalty.

    ``make_objective("dq", beta=3e-4)`` is ``Sum(CrossEntropy(), OrthogonalityPenalty(3e-4))``;
    ``base="pgd-at"`` (with that objective's options as further keywords) combines DQ with adversarial
    training once such an objective is registered.
    """
    if isinstance(base, str) and base.strip().lower() == "dq":
        raise ConfigError("the dq objective cannot use 'dq' as its base; give e.g. base='ce' or base='pgd-at'")
    if not isinstance(base, str) and base_options:
        raise ConfigError(
            f"options {sorted(base_options)} were given for a base objective that is already built; "
            "pass them when building it or give base by name"
        )
    main = make_objective(base, **base_options)
    return Sum(main, OrthogonalityPenalty(beta, layers=layers, weights=weights, bn=bn))
