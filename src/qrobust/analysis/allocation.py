"""Per-layer weight bit-widths under a size budget, chosen by a Lipschitz criterion (Song, Ranjan & Li 2021)
and by the baselines it must beat — the design and what is inferred from the paper are in docs/layerwise.md.

For every Conv2d/Linear layer ``l`` and candidate bit-width ``b`` a *cost* ``c_l(b)`` says how much quantizing
that layer's weights to ``b`` bits may hurt; :func:`allocate` then picks one ``b`` per layer minimising
``Σ_l c_l(b_l)`` subject to ``Σ_l n_l·b_l ≤ budget·Σ_l n_l`` (``n_l`` = the layer's weight count, ``budget`` =
average bits per weight) — exactly, as a small integer program (``scipy.optimize.milp``) — and returns a
:class:`~qrobust.quant.QuantSpec` with one override per layer. Costs by ``method``:

* ``"lipschitz"`` (ours) — a first-order bound on how far the logits move when layer ``l``'s weights are
  quantized, *on adversarial inputs*: ``c_l(b) = L_{>l} · ‖Q_b(W_l) − W_l‖_op · E‖h_{l−1}(x + δ)‖₂``, with
  ``L_{>l}`` the product of the Lipschitz constants of every layer after ``l`` (:mod:`qrobust.analysis.lipschitz`:
  true conv operator norms, BatchNorm gains), ``‖·‖_op`` the quantization error's operator norm (the conv as an
  operator on that layer's input shape), and ``h_{l−1}(x + δ)`` the layer's input on PGD examples of the
  calibration data — under attack the activations a layer sees are larger than on clean data, which is why an
  adversarially trained model can need its bits elsewhere;
* ``"hawq"`` — HAWQ-style: ``Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖²_F``, the Hessian trace of the (clean) loss with
  respect to the layer's weights estimated by Hutchinson's method (Rademacher vectors, Hessian-vector products);
* ``"quanos"`` — QUANOS-style adversarial noise sensitivity: ``ANS_l · ‖Q_b(W_l) − W_l‖_F / ‖W_l‖_F`` with
  ``ANS_l = E ‖h_l(x + δ) − h_l(x)‖ / ‖h_l(x)‖`` measured at the layer's output;
* ``"uniform"`` — the same bits everywhere (the largest that fits, then the budget's remainder is unused);
* ``"random"`` — a random allocation (seeded) that spends the budget: the bits maximise ``Σ_l u_l·b_l``
  for random layer priorities ``u_l`` — the control any criterion must beat.

:func:`layer_costs` returns the cost table (for the consistency check of docs/layerwise.md: rank candidate
settings by the criterion and by the measured adversarial loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.analysis.lipschitz import conv_spectral_norm, lipschitz_table, matrix_spectral_norm
from qrobust.attacks import PGD
from qrobust.errors import ConfigError, InputError
from qrobust.models.introspect import weight_layers
from qrobust.quant import QuantSpec
from qrobust.quant.functional import symmetric_weight_quantize
from qrobust.utils import eval_mode, model_device
from qrobust.validation import check_choice, check_eps, check_int, check_positive

__all__ = ["METHODS", "allocate", "layer_costs", "solve_allocation"]

METHODS = ("lipschitz", "hawq", "quanos", "uniform", "random")
DEFAULT_CANDIDATES = (2, 3, 4, 5, 6, 8)


def _float_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = weight_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv2d/Linear layers to allocate bits to")
    return layers


def _latent(m: nn.Module) -> torch.Tensor:
    return m.weight.detach()


def _q_error(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The per-output-channel uniform quantizer's error at ``bits`` (the default weight scheme)."""
    return symmetric_weight_quantize(w, bits, per_channel=True) - w


def _inputs_outputs(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each layer's input and output on ``x`` (first call), eval mode, no grad."""
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in layers:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            ins.setdefault(name, args[0].detach())
            outs.setdefault(name, out.detach())
        hooks.append(m.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(x.to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


def _hutchinson_trace(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, y: torch.Tensor,
                      samples: int, seed: int) -> dict[str, float]:
    """``Tr(∂²L/∂W_l²)`` per layer by Hutchinson's estimator (Rademacher probes, Hessian-vector products)."""
    g = torch.Generator().manual_seed(seed)
    params = [m.weight for _, m in layers]
    dev = model_device(model)
    traces = [0.0] * len(params)
    with eval_mode(model), torch.enable_grad():
        loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(samples):
            vs = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            for i, (h, v) in enumerate(zip(hv, vs)):
                traces[i] += float((h * v).sum()) / samples
    return {name: t for (name, _), t in zip(layers, traces)}


def layer_costs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "lipschitz",
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    eps: float | None = None,
    attack_steps: int = 10,
    hutchinson_samples: int = 8,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """``{layer: {bits: cost}}`` for ``method`` on the calibration batch ``(x, y)`` of a *float* model
    (module docstring). ``eps`` is the attack radius of the adversarial calibration inputs (``lipschitz``,
    ``quanos``); the cost of ``uniform`` and ``random`` is the plain quantization error ``‖ΔW‖_F``."""
    check_choice("method", method, METHODS)
    cands = sorted({check_int("candidate bits", b, minimum=2) for b in candidates})
    if any(b > 8 for b in cands):
        raise ConfigError(f"candidate bits must be 2–8, got {cands}")
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise InputError(f"calibration data must be a non-empty (x, y) pair, got {x.shape[0]} and {y.shape[0]}")
    if any(type(m).__name__.startswith("Quant") for m in model.modules()):
        raise ConfigError("layer_costs takes the float model (bits are chosen before quantizing it)")
    layers = _float_layers(model)
    errors = {n: {b: _q_error(_latent(m), b) for b in cands} for n, m in layers}
    if method in ("uniform", "random"):
        return {n: {b: float(errors[n][b].norm()) for b in cands} for n, _ in layers}
    if method == "hawq":
        tr = _hutchinson_trace(model, layers, x, y, check_int("hutchinson_samples", hutchinson_samples), seed)
        return {n: {b: max(tr[n], 0.0) / m.weight.numel() * float(errors[n][b].pow(2).sum()) for b in cands}
                for n, m in layers}
    e = check_eps(eps, "Linf", positive=True) if eps is not None else None
    if e is None:
        raise ConfigError(f"method={method!r} needs eps= (the attack radius of the adversarial calibration inputs)")
    x_adv = PGD(model, eps=e, steps=check_int("attack_steps", attack_steps), seed=seed)(x, y)
    ins_adv, outs_adv = _inputs_outputs(model, layers, x_adv)
    if method == "quanos":
        _, outs = _inputs_outputs(model, layers, x)
        out: dict[str, dict[int, float]] = {}
        for n, m in layers:
            a, c = outs_adv[n].flatten(1), outs[n].flatten(1)
            ans = float(((a - c).norm(dim=1) / c.norm(dim=1).clamp_min(1e-12)).mean())
            wn = float(_latent(m).norm()) or 1.0
            out[n] = {b: ans * float(errors[n][b].norm()) / wn for b in cands}
        return out
    # lipschitz: L_{>l} · ‖ΔW‖_op · E‖h_{l−1}(x_adv)‖
    rows = [r for r in lipschitz_table(model) if r["kind"] != "network"]
    names = [r["name"] for r in rows]
    out = {}
    for n, m in layers:
        after = rows[names.index(n) + 1:] if n in names else []
        tail = math.prod(r["lipschitz"] for r in after if r["lipschitz"] is not None)
        h = float(ins_adv[n].flatten(1).norm(dim=1).mean())
        costs = {}
        for b in cands:
            d = errors[n][b]
            op = conv_spectral_norm(m, tuple(ins_adv[n].shape[1:]), 30, weight=d) if isinstance(m, nn.Conv2d) \
                else matrix_spectral_norm(d)
            costs[b] = tail * op * h
        out[n] = costs
    return out


def solve_allocation(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], budget: float
                     ) -> dict[str, int]:
    """The exact minimiser of ``Σ c_l(b_l)`` with ``Σ n_l b_l ≤ budget·Σ n_l``: a 0/1 integer program (one
    variable per layer and candidate, one choice per layer) solved by ``scipy.optimize.milp``."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # deferred: scipy is slow to import

    check_positive("budget", budget)
    names = list(costs)
    var = [(n, b) for n in names for b in sorted(costs[n])]
    total = sum(sizes[n] for n in names)
    lowest = sum(sizes[n] * min(costs[n]) for n in names)
    if lowest > budget * total + 1e-9:
        raise ConfigError(f"a budget of {budget:g} average bits cannot be met: the fewest candidate bits already "
                          f"average {lowest / total:.3g}; raise the budget or add smaller candidates")
    c = np.array([costs[n][b] for n, b in var], dtype=float)
    scale = float(np.abs(c).max()) or 1.0
    one = np.array([[1.0 if v[0] == n else 0.0 for v in var] for n in names])
    size = np.array([[sizes[n] * b for n, b in var]], dtype=float)
    res = milp(c / scale, integrality=np.ones(len(var)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one, 1, 1), LinearConstraint(size, -np.inf, budget * total)])
    if not res.success:
        raise ConfigError(f"the bit-allocation program failed: {res.message}")
    chosen = {var[i][0]: var[i][1] for i, v in enumerate(res.x) if v > 0.5}
    return {n: chosen[n] for n in names}


def allocate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    budget: float,
    method: str = "lipschitz",
    act_bits: int = 32,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    eps: float | None = None,
    seed: int = 0,
    **cost_options: Any,
) -> tuple[QuantSpec, dict[str, Any]]:
    """Per-layer weight bits for ``model`` at ``budget`` average bits per weight by ``method`` →
    ``(QuantSpec with one override per layer, info)``; ``info`` holds the bits per layer, the average bits
    reached, each layer's size and the cost table. ``act_bits`` is the global activation bit-width."""
    check_choice("method", method, METHODS)
    layers = _float_layers(model)
    sizes = {n: m.weight.numel() for n, m in layers}
    costs = layer_costs(model, x, y, method=method, candidates=candidates, eps=eps, seed=seed, **cost_options)
    cands = sorted(next(iter(costs.values())))
    total = sum(sizes.values())
    if method == "uniform":
        fit = [b for b in cands if b <= budget + 1e-9]
        if not fit:
            raise ConfigError(f"no candidate bit-width fits a budget of {budget:g}; candidates {cands}")
        bits = {n: fit[-1] for n in sizes}
    elif method == "random":
        g = torch.Generator().manual_seed(seed)
        # a random priority per layer, its cost falling with the bits: the solver spends the budget (random costs
        # per candidate would let it stop far below the budget, e.g. at 2.49 of 4 bits, an unfair control)
        prio = {n: float(torch.rand((), generator=g)) for n in sizes}
        rnd = {n: {b: -prio[n] * b for b in cands} for n in sizes}
        bits = solve_allocation(rnd, sizes, budget)
    else:
        bits = solve_allocation(costs, sizes, budget)
    spec = QuantSpec(weight_bits=max(bits.values()), act_bits=act_bits,
                     overrides={n: {"weight_bits": b} for n, b in bits.items()})
    info = {"method": method, "budget": budget, "bits": bits, "sizes": sizes,
            "average_bits": sum(sizes[n] * bits[n] for n in sizes) / total, "costs": costs}
    return spec, info
