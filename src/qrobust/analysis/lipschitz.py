"""Per-layer Lipschitz constants (L2) and the bound they give for the whole network.

A convolution is a linear operator on images; its L2 operator norm (largest singular value) depends on the
input size, stride, padding and dilation, and is *not* the spectral norm of the weight reshaped to
``c_out × c_in·k·k`` — the matrix Defensive Quantization's penalty makes orthogonal. This module measures
both: :func:`conv_spectral_norm` runs power iteration on the true operator (the convolution and its
adjoint, obtained by autograd, so every padding mode works), :func:`matrix_spectral_norm` takes the exact
SVD norm of the reshaped weight.

:func:`lipschitz_table` gives one row per layer that changes distances — convolution, linear, BatchNorm in
eval mode (``max |γ|/√(σ² + eps)``), the input :class:`~qrobust.models.Normalize` (``1/min std``), pooling
(average pools: power iteration on the operator; max pools: 1 for non-overlapping windows, else
``√(windows per input element)``), activations (1: ReLU, ReLU6 and the float surrogate of a ``QuantAct``;
the quantized activation itself is a step function, not Lipschitz at all) — and a final ``network`` row:

* ``product`` — the product of all per-layer constants: an upper bound for a feed-forward chain;
* ``lipschitz`` — the bound that also holds for residual networks: a block with a ``shortcut`` child
  contributes ``Lip(main path) + Lip(shortcut)`` (pre-activation blocks whose projection reads the
  activated input ``a = act(bn1(x))``: ``Lip(bn1)·(Lip(rest) + Lip(shortcut))``), every other container is
  taken as the composition of its children — true of every qrobust model, whose modules are registered in
  forward order and each called once.

Quantized layers are measured with the weight they compute with (``quantized_weight()``); the reshaped
norm of the latent weight is reported next to it when it differs.

>>> import torch
>>> from torch import nn
>>> conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
>>> with torch.no_grad():
...     _ = conv.weight.fill_(1.0 / 9)        # a 3×3 box blur
>>> round(matrix_spectral_norm(conv.weight), 4)  # ‖reshaped 1×9 matrix‖ = 3·(1/9)
0.3333
>>> conv_spectral_norm(conv, (1, 16, 16), iters=200) < 1.0   # zero padding: just under 1 (the DC gain)
True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError, InputError
from qrobust.models.layers import Normalize
from qrobust.utils import eval_mode, model_device_dtype

log = logging.getLogger(__name__)

__all__ = [
    "conv_spectral_norm",
    "downstream_lipschitz",
    "format_lipschitz_table",
    "infer_input_shape",
    "lipschitz_bound",
    "lipschitz_table",
    "matrix_spectral_norm",
    "operator_norm",
]

_ONE_LIPSCHITZ = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d)
_ONE_LIPSCHITZ_NAMES = ("QuantAct", "PadShortcut")


def _shape3(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (C, H, W) of one image, got {tuple(input_shape)}")
    return shape


def operator_norm(
    fn: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int],
    *,
    iters: int = 50,
    tol: float = 1e-7,
    seed: int = 0,
    block: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> float:
    """Largest singular value of the *linear*, per-sample map ``fn`` on inputs shaped ``(1, *input_shape)``.

    Block power (subspace) iteration on ``AᵀA`` with ``block`` vectors carried as one batch (``Aᵀu`` by
    autograd) and a Rayleigh–Ritz estimate each step, so close top singular values — e.g. the blocks of a
    grouped convolution — do not stall it the way single-vector power iteration stalls. Stops after
    ``iters`` steps or when the estimate changes by less than ``tol`` (relative). Ritz values approach
    σ_max from below.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"iters must be a positive integer, got {iters!r}")
    shape = tuple(int(s) for s in input_shape)
    k = max(1, min(int(block), math.prod(shape)))
    g = torch.Generator().manual_seed(seed)
    v = torch.randn((k, math.prod(shape)), generator=g, dtype=torch.float64)
    v = torch.linalg.qr(v.T).Q.T.to(dtype=dtype, device=device)  # k orthonormal rows
    sigma = 0.0
    with torch.enable_grad():
        for _ in range(iters):
            x = v.reshape(k, *shape).detach().requires_grad_(True)
            u = fn(x)
            uf = u.detach().reshape(k, -1).double()
            new_sigma = float(torch.linalg.eigvalsh(uf @ uf.T)[-1].clamp_min(0).sqrt())
            (w,) = torch.autograd.grad(u, x, grad_outputs=u.detach())  # AᵀA v, row by row
            wf = w.reshape(k, -1).double()
            if not torch.isfinite(wf).all() or float(wf.abs().max()) == 0.0:
                return new_sigma
            v = torch.linalg.qr(wf.T).Q.T.to(dtype=dtype)
            converged = abs(new_sigma - sigma) <= tol * max(new_sigma, 1e-30)
            sigma = max(sigma, new_sigma)
            if converged:
                break
    with torch.no_grad():
        uf = fn(v.reshape(k, *shape)).reshape(k, -1).double()
        return max(sigma, float(torch.linalg.eigvalsh(uf @ uf.T)[-1].clamp_min(0).sqrt()))


def _weight_of(layer: nn.Module, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        return weight
    w = layer.quantized_weight() if hasattr(layer, "quantized_weight") else layer.weight
    return w.detach()


def conv_spectral_norm(
    conv: nn.Module,
    input_shape: Sequence[int],
    iters: int = 50,
    *,
    weight: torch.Tensor | None = None,
    tol: float = 1e-7,
    seed: int = 0,
) -> float:
    """L2 operator norm of ``conv`` (bias ignored) on one input of shape ``(C, H, W)``, by block power
    iteration (:func:`operator_norm`).

    Uses the layer's stride, padding (and padding mode), dilation and groups; ``weight`` replaces the
    layer's own (default: the weight it computes with, i.e. ``quantized_weight()`` for a QuantConv2d).
    """
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"conv_spectral_norm needs an nn.Conv2d (or QuantConv2d), got {type(conv).__name__}")
    shape = _shape3(input_shape)
    if shape[0] != conv.in_channels:
        raise InputError(f"input_shape has {shape[0]} channels but the convolution takes {conv.in_channels}")
    w = _weight_of(conv, weight)

    def op(x: torch.Tensor) -> torch.Tensor:
        if conv.padding_mode == "zeros":
            return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return nn.Conv2d._conv_forward(conv, x, w, None)

    return operator_norm(op, shape, iters=iters, tol=tol, seed=seed, dtype=w.dtype, device=w.device)


def matrix_spectral_norm(weight: torch.Tensor) -> float:
    """Exact spectral norm (largest singular value) of ``weight`` reshaped to ``(shape[0], -1)``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 1:
        raise InputError("matrix_spectral_norm needs a weight tensor with at least one dimension")
    m = weight.detach().reshape(weight.shape[0], -1).double()
    return float(torch.linalg.matrix_norm(m, ord=2))


def infer_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of the model's input, from ``model.qrobust_arch`` (set by ``build_model``)."""
    arch = getattr(model, "qrobust_arch", None)
    kw = arch.get("kwargs", {}) if isinstance(arch, dict) else {}
    if "in_channels" in kw and "input_size" in kw:
        return int(kw["in_channels"]), int(kw["input_size"]), int(kw["input_size"])
    raise ConfigError(
        "cannot tell the model's input shape (it has no qrobust_arch with in_channels/input_size); "
        "pass input_shape=(C, H, W)"
    )


def _bn_constant(bn: nn.modules.batchnorm._BatchNorm) -> float | None:
    if bn.running_var is None:
        return None  # uses batch statistics even in eval mode: no fixed constant
    scale = (bn.running_var.detach().double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double().abs()
    return float(scale.max())


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _row(name: str, m: nn.Module, kind: str, shape: tuple[int, ...] | None, lip: float | None, **extra: Any) -> dict:
    return {"name": name, "type": type(m).__name__, "kind": kind,
            "input_shape": list(shape) if shape is not None else None, "lipschitz": lip, **extra}


def lipschitz_table(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    iters: int = 50,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per distance-changing layer (see the module docstring) plus a final ``network`` row.

    Row keys: ``name, type, kind`` (conv, linear, bn, normalize, pool, act, other, network),
    ``input_shape`` (C, H, W of one sample, as seen in a forward pass), ``lipschitz`` (the constant used
    in the bound; None when unknown), and for weight layers ``operator_norm`` (convolution: power iteration
    with ``iters`` steps; linear: exact), ``matrix_norm`` (reshaped weight, exact) and, for quantized
    weights, ``latent_matrix_norm``. The ``network`` row has ``lipschitz`` (residual-aware bound),
    ``product`` (plain product of every row) and ``log10_lipschitz``.
    """
    shape = _shape3(input_shape) if input_shape is not None else infer_input_shape(model)
    leaves = _atomic_modules(model)
    shapes: dict[int, tuple[int, ...]] = {}

    def record(mod: nn.Module, args: tuple) -> None:
        shapes.setdefault(id(mod), tuple(args[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for _, m in leaves]
    device, dtype = model_device_dtype(model)
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()

    rows: list[dict[str, Any]] = []
    consts: dict[int, float | None] = {}
    for name, m in leaves:
        s = shapes.get(id(m))
        if s is None:
            continue  # not called in forward: not part of the network function
        if isinstance(m, nn.Conv2d):
            w = _weight_of(m, None)
            op = conv_spectral_norm(m, s, iters, weight=w, seed=seed)
            row = _row(name, m, "conv", s, op, operator_norm=op, matrix_norm=matrix_spectral_norm(w))
        elif isinstance(m, nn.Linear):
            w = _weight_of(m, None)
            op = matrix_spectral_norm(w)
            row = _row(name, m, "linear", s, op, operator_norm=op, matrix_norm=op)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            row = _row(name, m, "bn", s, _bn_constant(m))
        elif isinstance(m, Normalize):
            row = _row(name, m, "normalize", s, float(1.0 / m.std.detach().double().min()))
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            row = _row(name, m, "pool", s, operator_norm(m, s, iters=max(iters, 20), seed=seed, dtype=dtype,
                                                         device=device))
        elif isinstance(m, nn.MaxPool2d):
            (kh, kw), (sh, sw) = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
            dh, dw = _pair(m.dilation)
            count = math.ceil(((kh - 1) * dh + 1) / sh) * math.ceil(((kw - 1) * dw + 1) / sw)
            row = _row(name, m, "pool", s, math.sqrt(count))
        elif isinstance(m, _ONE_LIPSCHITZ) or type(m).__name__ in _ONE_LIPSCHITZ_NAMES:
            kind = "act" if isinstance(m, (nn.ReLU, nn.ReLU6)) or type(m).__name__ == "QuantAct" else "other"
            note = "float surrogate" \
                if type(m).__name__ == "QuantAct" and getattr(m, "act_quant", None) is not None else None
            row = _row(name, m, kind, s, 1.0, **({"note": note} if note else {}))
        elif any(True for _ in m.parameters(recurse=False)):
            log.warning("lipschitz_table: no rule for %s (%s): the network bound is unknown", name,
                        type(m).__name__)
            row = _row(name, m, "other", s, None, note="no rule for this layer type")
        else:
            row = _row(name, m, "other", s, 1.0, note="parameter-free, assumed 1-Lipschitz")
        if isinstance(m, (nn.Conv2d, nn.Linear)) and hasattr(m, "quantized_weight"):
            if getattr(m, "weight_quant", None) is not None:
                row["latent_matrix_norm"] = matrix_spectral_norm(m.weight)
        consts[id(m)] = row["lipschitz"]
        if row["kind"] != "other" or row["lipschitz"] != 1.0:
            rows.append(row)

    values = [r["lipschitz"] for r in rows]
    product = math.prod(values) if all(v is not None for v in values) else None
    bound = _bound(model, consts)
    rows.append({
        "name": "(network)", "type": type(model).__name__, "kind": "network", "input_shape": list(shape),
        "lipschitz": bound, "product": product,
        "log10_lipschitz": math.log10(bound) if bound and bound > 0 else None,
        "residual": any(isinstance(getattr(m, "shortcut", None), nn.Module) for m in model.modules()),
    })
    return rows


_ATOMIC = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, Normalize, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
           nn.MaxPool2d, *_ONE_LIPSCHITZ)


def _atomic_modules(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The layers the table measures: known layer types (quantized ones included, their quantizers not
    listed separately) and parameter-bearing or childless leaves, in module order."""
    if isinstance(model, _ATOMIC) or type(model).__name__ in _ONE_LIPSCHITZ_NAMES:
        return [(prefix, model)]
    children = list(model.named_children())
    if not children:
        return [(prefix, model)]
    out: list[tuple[str, nn.Module]] = []
    for n, c in children:
        out.extend(_atomic_modules(c, f"{prefix}.{n}" if prefix else n))
    return out


def _bound(module: nn.Module, consts: dict[int, float | None]) -> float | None:
    """Residual-aware Lipschitz bound of ``module`` from the leaf constants (None if any is unknown)."""
    if id(module) in consts:
        return consts[id(module)]
    children = dict(module.named_children())
    if not children:
        return 1.0  # a parameter-free leaf never called, or an empty container

    def prod(names: list[str]) -> float | None:
        vals = [_bound(children[n], consts) for n in names]
        return None if any(v is None for v in vals) else math.prod(vals)  # type: ignore[arg-type]

    shortcut = children.get("shortcut")
    if shortcut is None:
        return prod(list(children))
    sc = _bound(shortcut, consts)
    rest = [n for n in children if n != "shortcut"]
    if getattr(module, "projects", False) and "bn1" in children and "act1" in children:
        pre, main = prod(["bn1", "act1"]), prod([n for n in rest if n not in ("bn1", "act1")])
        return None if None in (pre, main, sc) else pre * (main + sc)  # type: ignore[operator]
    main = prod(rest)
    return None if main is None or sc is None else main + sc


_NOT_HERE = object()


def _tail(module: nn.Module, target: nn.Module, consts: dict[int, float | None]) -> Any:
    """Residual-aware bound of the map from ``target``'s output to ``module``'s output (``_NOT_HERE`` when
    ``target`` is not inside ``module``; None when a constant on the way is unknown). A perturbation of a layer
    on a block's main path passes the rest of that path only (the shortcut does not see it), one on the
    shortcut passes the rest of the shortcut; then every later sibling, each with its own (residual-aware)
    bound."""
    if module is target:
        return 1.0
    children = list(module.named_children())
    if not children:
        return _NOT_HERE
    shortcut = dict(children).get("shortcut")
    if shortcut is not None:
        t = _tail(shortcut, target, consts)
        if t is not _NOT_HERE:
            return t  # the branches meet at the sum; what follows it (an activation) is 1-Lipschitz
        children = [(n, c) for n, c in children if n != "shortcut"]
    for i, (_, c) in enumerate(children):
        t = _tail(c, target, consts)
        if t is _NOT_HERE:
            continue
        later = [_bound(m, consts) for _, m in children[i + 1:]]
        return None if t is None or any(v is None for v in later) else t * math.prod(later)  # type: ignore
    return _NOT_HERE


def downstream_lipschitz(model: nn.Module, input_shape: Sequence[int] | None = None, *, iters: int = 50,
                         rows: list[dict[str, Any]] | None = None) -> dict[str, float | None]:
    """``{weight layer name: bound}``: for every Conv2d/Linear row of :func:`lipschitz_table` (``rows``, computed
    when not given), a Lipschitz bound of the rest of the network as a function of that layer's output — how
    far the logits can move per unit change of the layer's output. For a feed-forward chain it is the product
    of the constants of every later row; a residual block contributes ``Lip(main) + Lip(shortcut)`` when the
    layer is before it, and only the rest of its own path when the layer is inside it (the plain product of
    every later row multiplies shortcut and main path in sequence, which is not a bound: with a strong
    shortcut it can fall below the true gain; with identity shortcuts, as in CIFAR ResNet-20, the two differ
    little)."""
    rows = rows if rows is not None else lipschitz_table(model, input_shape, iters=iters)
    modules = dict(model.named_modules())
    consts = {id(modules[r["name"]]): r["lipschitz"] for r in rows if r["kind"] != "network" and r["name"] in modules}
    out: dict[str, float | None] = {}
    for r in rows:
        if r["kind"] in ("conv", "linear") and r["name"] in modules:
            t = _tail(model, modules[r["name"]], consts)
            out[r["name"]] = None if t is _NOT_HERE else t
    return out


def lipschitz_bound(model: nn.Module, input_shape: Sequence[int] | None = None, *, iters: int = 50) -> float | None:
    """The network row's residual-aware bound of :func:`lipschitz_table` (None when a layer is unknown)."""
    return lipschitz_table(model, input_shape, iters=iters)[-1]["lipschitz"]


def _fmt(v: Any, width: int = 10) -> str:
    if v is None:
        return "—".rjust(width)
    if isinstance(v, float):
        return (f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}").rjust(width)
    return str(v).rjust(width)


def format_lipschitz_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`lipschitz_table` rows (one line per layer, then the bound)."""
    body = [r for r in rows if r["kind"] != "network"]
    net = [r for r in rows if r["kind"] == "network"]
    wname = max([len("layer"), *(len(r["name"]) for r in body)])
    head = (f"{'layer'.ljust(wname)}  {'type'.ljust(13)}  {'input':>12}  {'operator':>10}  {'reshaped':>10}  "
            f"{'Lipschitz':>10}")
    lines = [head, "-" * len(head)]
    for r in body:
        shape = "×".join(str(s) for s in r["input_shape"]) if r.get("input_shape") else "?"
        line = (f"{r['name'].ljust(wname)}  {r['type'][:13].ljust(13)}  {shape:>12}  {_fmt(r.get('operator_norm'))}  "
                f"{_fmt(r.get('matrix_norm'))}  {_fmt(r['lipschitz'])}")
        if r.get("latent_matrix_norm") is not None:
            line += f"  (latent reshaped {r['latent_matrix_norm']:.4g})"
        if r.get("note"):
            line += f"  [{r['note']}]"
        lines.append(line)
    for r in net:
        lines.append("-" * len(head))
        lines.append(f"product of per-layer constants: {_fmt(r.get('product'), 0)}")
        kind = "residual-aware bound" if r.get("residual") else "bound (feed-forward chain)"
        lines.append(f"network Lipschitz {kind}: {_fmt(r['lipschitz'], 0)}")
    return "\n".join(lines)
