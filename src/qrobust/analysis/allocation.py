"""Per-layer weight bit-widths and clipping ranges under a size budget, chosen by a Lipschitz criterion (Song,
Ranjan & Li 2021) and by the baselines it must beat — the design and what is inferred from the paper are in
docs/layerwise.md.

A layer's candidate *settings* are pairs (bits ``b``, clipping rule ``c``) from ``candidates`` × ``clips``; a
setting is named by its key ``"b/c"`` (``"4/max"``, ``"3/mse"``, ``"2/p99.9"``, :func:`setting_key`). Clipping
rules (:func:`clip_ratio`) end the symmetric per-channel grid at a fraction ``r`` of each output channel's
max|w| — ``"max"``: r = 1 (no clipping); ``"mse"``: the r of a grid in [0.2, 1] minimising ‖Q_{b,r}(W) − W‖²_F
at those bits; ``"pQ"`` (``"p99.9"``): the Q-th percentile of the layer's |w| / max_channel|w|. Clipping costs
no bits: the budget counts bits only, and the ratio is written into the spec as the override ``weight_clip``.

For every Conv2d/Linear layer ``l`` and candidate setting ``s`` a *cost* ``c_l(s)`` says how much quantizing
that layer's weights so may hurt; :func:`allocate` then picks one setting per layer minimising
``Σ_l c_l(s_l)`` subject to ``Σ_l n_l·b(s_l) ≤ budget·Σ_l n_l`` (``n_l`` = the layer's weight count, ``budget`` =
average bits per weight) — exactly, as a small integer program (``scipy.optimize.milp``) — and returns a
:class:`~qrobust.quant.QuantSpec` with one override per layer (``weight_bits``, and ``weight_clip`` where the
setting clips). Costs by ``method`` (``Q_b`` below is the setting's quantizer, clip included):

* ``"lipschitz"`` (ours) — a first-order bound on how far the logits move when layer ``l``'s weights are
  quantized, *on adversarial inputs*: ``c_l(b) = L_{>l} · ‖Q_b(W_l) − W_l‖_op · E‖h_{l−1}(x + δ)‖₂``, with
  ``L_{>l}`` a Lipschitz bound of the rest of the network after ``l`` (:func:`qrobust.analysis.lipschitz.
  downstream_lipschitz`: true conv operator norms, BatchNorm gains, residual blocks as main path + shortcut),
  ``‖·‖_op`` the quantization error's operator norm (the conv as an
  operator on that layer's input shape), and ``h_{l−1}(x + δ)`` the layer's input on PGD examples of the
  calibration data — under attack the activations a layer sees are larger than on clean data, which is why an
  adversarially trained model can need its bits elsewhere;
* ``"lipschitz-local"`` (our variant) — the same, with ``L_{>l}`` the *local* gain of the rest of the network
  at the adversarial calibration points (:func:`local_gain`: the spectral norm of its Jacobian, per sample,
  averaged) instead of the bound: on a 20-layer ResNet the bound spans twelve orders of magnitude from the first
  layer to the last and dictates the allocation by depth alone (docs/layerwise.md §7);
* ``"hawq"`` — HAWQ-style: ``Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖²_F``, the Hessian trace of the (clean) loss with
  respect to the layer's weights estimated by Hutchinson's method (Rademacher vectors, Hessian-vector products);
* ``"quanos"`` — QUANOS-style adversarial noise sensitivity: ``ANS_l · ‖Q_b(W_l) − W_l‖_F / ‖W_l‖_F`` with
  ``ANS_l = E ‖h_l(x + δ) − h_l(x)‖ / ‖h_l(x)‖`` measured at the layer's output;
* ``"uniform"`` — the same bits everywhere (the largest that fits, then the budget's remainder is unused);
* ``"random"`` — a random allocation (seeded) that spends the budget: the bits maximise ``Σ_l u_l·b_l``
  for random layer priorities ``u_l`` — the control any criterion must beat.

``uniform`` and ``random`` have no criterion of their own for the clip: at the bits they give a layer they take
the clipping rule with the smallest ‖ΔW‖_F (with ``clips=("max",)``, the default, the max-|w| grid).

:func:`layer_costs` returns the cost table (for the consistency check of docs/layerwise.md: rank candidate
settings by the criterion and by the measured adversarial loss).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.analysis.lipschitz import conv_spectral_norm, downstream_lipschitz, matrix_spectral_norm
from qrobust.attacks import PGD
from qrobust.errors import ConfigError, InputError
from qrobust.models.introspect import weight_layers
from qrobust.quant import QuantSpec
from qrobust.quant.functional import symmetric_weight_quantize
from qrobust.utils import eval_mode, model_device, native_stdout_silenced
from qrobust.validation import check_choice, check_eps, check_int, check_positive

__all__ = ["CLIPS", "METHODS", "allocate", "check_clips", "clip_ratio", "layer_costs", "local_gain", "parse_setting",
           "setting_key", "solve_allocation"]

METHODS = ("lipschitz", "lipschitz-local", "hawq", "quanos", "uniform", "random")
DEFAULT_CANDIDATES = (2, 3, 4, 5, 6, 8)
#: the clipping rules a setting can use ("pQ" takes any percentile 50 < Q < 100, e.g. "p99.9")
CLIPS = ("max", "mse", "p99.9", "p99")
DEFAULT_CLIPS = ("max",)
_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")
_MSE_GRID = torch.linspace(0.2, 1.0, 41)


def _check_candidates(candidates: Sequence[int]) -> list[int]:
    cands = sorted({check_int("candidate bits", b, minimum=2) for b in candidates})
    if not cands or any(b > 8 for b in cands):
        raise ConfigError(f"candidate bits must be 2–8, got {cands}")
    return cands


def check_clips(clips: Sequence[str]) -> tuple[str, ...]:
    """``clips`` as a tuple of distinct clipping rules ("max", "mse", "pQ" with 50 < Q < 100), else ConfigError."""
    if isinstance(clips, str) or not clips:
        raise ConfigError(f"clips must be a non-empty list of clipping rules such as ('max', 'mse', 'p99.9'), "
                          f"got {clips!r}")
    out: list[str] = []
    for c in clips:
        c = str(c).strip().lower()
        m = _PERCENTILE.match(c)
        if c not in ("max", "mse") and not (m and 50 < float(m.group(1)) < 100):
            raise ConfigError(f"unknown clipping rule {c!r}: give max, mse or a percentile pQ with 50 < Q < 100 "
                              "(e.g. p99.9)")
        if c not in out:
            out.append(c)
    return tuple(out)


def setting_key(bits: int, clip: str) -> str:
    """The key of a candidate setting: ``setting_key(4, "mse") == "4/mse"``."""
    return f"{int(bits)}/{clip}"


def parse_setting(key: str | int) -> tuple[int, str]:
    """``"4/mse"`` → ``(4, "mse")``; a plain bit-width (``4``) is ``(4, "max")``."""
    if isinstance(key, int):
        return key, "max"
    bits, _, clip = str(key).partition("/")
    return int(bits), clip or "max"


def clip_ratio(w: torch.Tensor, bits: int, clip: str) -> float:
    """The fraction of each output channel's max|w| at which the ``bits``-bit grid of ``w`` ends, by ``clip``
    (module docstring): 1.0 for ``"max"``, the error-minimising ratio for ``"mse"``, a percentile for ``"pQ"``."""
    (clip,) = check_clips([clip])
    if clip == "max":
        return 1.0
    w = w.detach().float()
    if clip == "mse":
        errs = [float((symmetric_weight_quantize(w, bits, per_channel=True, clip=float(r)) - w).pow(2).sum())
                for r in _MSE_GRID]
        return round(float(_MSE_GRID[int(np.argmin(errs))]), 4)
    q = float(_PERCENTILE.match(clip).group(1)) / 100  # type: ignore[union-attr]
    peak = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) if w.dim() > 1 else w.abs().amax()
    rel = (w.abs() / peak.clamp_min(torch.finfo(w.dtype).tiny)).flatten()
    if rel.numel() > 1_000_000:  # torch.quantile's input limit; a strided sample keeps the estimate
        rel = rel[:: math.ceil(rel.numel() / 1_000_000)]
    return min(max(round(float(torch.quantile(rel, q)), 4), 1e-3), 1.0)


def _float_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = weight_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv2d/Linear layers to allocate bits to")
    return layers


def _latent(m: nn.Module) -> torch.Tensor:
    return m.weight.detach()


def _q_error(w: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """The per-output-channel uniform quantizer's error at ``bits`` and clip ratio ``clip`` (the default weight
    scheme)."""
    return symmetric_weight_quantize(w, bits, per_channel=True, clip=clip) - w


def _settings(layers: list[tuple[str, nn.Module]], cands: Sequence[int], clips: Sequence[str]
              ) -> dict[str, dict[str, float]]:
    """``{layer: {setting key: clip ratio}}`` for every candidate bit-width and clipping rule."""
    return {n: {setting_key(b, c): clip_ratio(_latent(m), b, c) for b in cands for c in clips} for n, m in layers}


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


def local_gain(model: nn.Module, layer: nn.Module, x: torch.Tensor, *, iters: int = 10, seed: int = 0) -> float:
    """The local Lipschitz constant of the rest of ``model`` after ``layer`` at the points ``x``: the mean over
    ``x`` of the spectral norm of ∂logits/∂(``layer``'s output), by per-sample power iteration on JᵀJ (Jᵀw by
    backpropagation, Ju by differentiating Jᵀw with respect to w). Unlike the bound of
    :func:`~qrobust.analysis.lipschitz.downstream_lipschitz` (a product of per-layer norms, loose by orders of
    magnitude that grow with depth) it is what the network does near the data — a lower estimate of the
    worst case over all inputs, not a bound."""
    state: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + state["v"]

    device = model_device(model)
    x = x.to(device)
    shape = _inputs_outputs(model, [("l", layer)], x[:1])[1]["l"].shape[1:]
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn((x.shape[0], *shape), generator=gen).to(device)
    sigma = torch.zeros(x.shape[0], device=device)
    handle = layer.register_forward_hook(hook)
    try:
        with eval_mode(model):
            for _ in range(iters):
                u = u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(shape))
                state["v"] = torch.zeros_like(u, requires_grad=True)
                f = model(x)
                w = torch.zeros_like(f, requires_grad=True)
                (g,) = torch.autograd.grad((f * w).sum(), state["v"], create_graph=True)  # Jᵀw, linear in w
                (ju,) = torch.autograd.grad((g * u).sum(), w)  # J u
                sigma = ju.norm(dim=1)
                state["v"] = torch.zeros_like(u, requires_grad=True)
                (u,) = torch.autograd.grad((model(x) * ju).sum(), state["v"])  # JᵀJ u
    finally:
        handle.remove()
    return float(sigma.mean())


def layer_costs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "lipschitz",
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    clips: Sequence[str] = DEFAULT_CLIPS,
    eps: float | None = None,
    attack_steps: int = 10,
    hutchinson_samples: int = 8,
    gain_images: int = 64,
    gain_iters: int = 10,
    seed: int = 0,
    ratios: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """``{layer: {setting key: cost}}`` (keys ``"bits/clip"``, :func:`setting_key`) for ``method`` on the
    calibration batch ``(x, y)`` of a *float* model (module docstring), over ``candidates`` × ``clips``.
    ``eps`` is the attack radius of the adversarial calibration inputs (``lipschitz``, ``lipschitz-local``,
    ``quanos``); ``gain_images``/``gain_iters``: the first N of them and the power iterations of
    ``lipschitz-local``'s local gain (:func:`local_gain`); the cost of
    ``uniform`` and ``random`` is the plain quantization error ``‖ΔW‖_F``. ``ratios`` (``{layer: {key: clip
    ratio}}``, as :func:`allocate` computes them once) skips recomputing the clip ratios."""
    check_choice("method", method, METHODS)
    cands = _check_candidates(candidates)
    clips = check_clips(clips)
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise InputError(f"calibration data must be a non-empty (x, y) pair, got {x.shape[0]} and {y.shape[0]}")
    if any(type(m).__name__.startswith("Quant") for m in model.modules()):
        raise ConfigError("layer_costs takes the float model (bits are chosen before quantizing it)")
    layers = _float_layers(model)
    ratios = ratios if ratios is not None else _settings(layers, cands, clips)
    keys = [setting_key(b, c) for b in cands for c in clips]
    errors = {n: {k: _q_error(_latent(m), parse_setting(k)[0], ratios[n][k]) for k in keys} for n, m in layers}
    if method in ("uniform", "random"):
        return {n: {k: float(errors[n][k].norm()) for k in keys} for n, _ in layers}
    if method == "hawq":
        tr = _hutchinson_trace(model, layers, x, y, check_int("hutchinson_samples", hutchinson_samples), seed)
        return {n: {k: max(tr[n], 0.0) / m.weight.numel() * float(errors[n][k].pow(2).sum()) for k in keys}
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
            out[n] = {k: ans * float(errors[n][k].norm()) / wn for k in keys}
        return out
    # lipschitz: L_{>l} · ‖ΔW‖_op · E‖h_{l−1}(x_adv)‖, L_{>l} the residual-aware bound of the rest of the network
    # (lipschitz) or its local gain at the adversarial calibration points (lipschitz-local)
    if method == "lipschitz":
        tails = downstream_lipschitz(model)
    else:
        xg = x_adv[:check_int("gain_images", gain_images)]
        tails = {n: local_gain(model, m, xg, iters=check_int("gain_iters", gain_iters), seed=seed) for n, m in layers}
    out = {}
    for n, m in layers:
        tail = tails.get(n)
        if tail is None:
            raise ConfigError(f"no Lipschitz constant for the layers after {n!r} (lipschitz_table has no rule for "
                              "one of them): use method='lipschitz-local' or 'hawq'")
        h = float(ins_adv[n].flatten(1).norm(dim=1).mean())
        costs = {}
        for k in keys:
            d = errors[n][k]
            op = conv_spectral_norm(m, tuple(ins_adv[n].shape[1:]), 30, weight=d) if isinstance(m, nn.Conv2d) \
                else matrix_spectral_norm(d)
            costs[k] = tail * op * h
        out[n] = costs
    return out


def solve_allocation(costs: Mapping[str, Mapping[Any, float]], sizes: Mapping[str, int], budget: float
                     ) -> dict[str, Any]:
    """The exact minimiser of ``Σ c_l(s_l)`` with ``Σ n_l b(s_l) ≤ budget·Σ n_l``: a 0/1 integer program (one
    variable per layer and candidate setting, one choice per layer) solved by ``scipy.optimize.milp``. A
    setting is a bit-width or a ``"bits/clip"`` key (:func:`parse_setting`); the chosen one is returned per
    layer."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # deferred: scipy is slow to import

    check_positive("budget", budget)
    names = list(costs)
    var = [(n, k) for n in names for k in costs[n]]
    total = sum(sizes[n] for n in names)
    lowest = sum(sizes[n] * min(parse_setting(k)[0] for k in costs[n]) for n in names)
    if lowest > budget * total + 1e-9:
        raise ConfigError(f"a budget of {budget:g} average bits cannot be met: the fewest candidate bits already "
                          f"average {lowest / total:.3g}; raise the budget or add smaller candidates")
    c = np.array([costs[n][b] for n, b in var], dtype=float)
    scale = float(np.abs(c).max()) or 1.0
    one = np.array([[1.0 if v[0] == n else 0.0 for v in var] for n in names])
    size = np.array([[sizes[n] * parse_setting(k)[0] for n, k in var]], dtype=float)
    with native_stdout_silenced():  # HiGHS prints "transformNewIntegerFeasibleSolution" lines on some programs
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
    clips: Sequence[str] = DEFAULT_CLIPS,
    eps: float | None = None,
    seed: int = 0,
    **cost_options: Any,
) -> tuple[QuantSpec, dict[str, Any]]:
    """Per-layer weight bits and clipping for ``model`` at ``budget`` average bits per weight by ``method`` →
    ``(QuantSpec with one override per layer, info)``. ``clips`` are the clipping rules each layer may use
    (module docstring; the default, ``("max",)``, is the unclipped grid). ``info`` holds per layer the bits,
    the clipping rule, its ratio and the setting key chosen, the average bits reached, each layer's size, the
    cost table and every setting's clip ratio. ``act_bits`` is the global activation bit-width."""
    check_choice("method", method, METHODS)
    layers = _float_layers(model)
    sizes = {n: m.weight.numel() for n, m in layers}
    cands = _check_candidates(candidates)
    clips = check_clips(clips)
    ratios = _settings(layers, cands, clips)
    costs = layer_costs(model, x, y, method=method, candidates=cands, clips=clips, eps=eps, seed=seed,
                        ratios=ratios, **cost_options)
    total = sum(sizes.values())

    def best_clip(n: str, b: int) -> str:  # uniform/random: the clip with the least ‖ΔW‖ at those bits
        return min((setting_key(b, c) for c in clips), key=lambda k: costs[n][k])

    if method == "uniform":
        fit = [b for b in cands if b <= budget + 1e-9]
        if not fit:
            raise ConfigError(f"no candidate bit-width fits a budget of {budget:g}; candidates {cands}")
        chosen = {n: best_clip(n, fit[-1]) for n in sizes}
    elif method == "random":
        g = torch.Generator().manual_seed(seed)
        # a random priority per layer, its cost falling with the bits: the solver spends the budget (random costs
        # per candidate would let it stop far below the budget, e.g. at 2.49 of 4 bits, an unfair control)
        prio = {n: float(torch.rand((), generator=g)) for n in sizes}
        rnd = {n: {b: -prio[n] * b for b in cands} for n in sizes}
        chosen = {n: best_clip(n, b) for n, b in solve_allocation(rnd, sizes, budget).items()}
    else:
        chosen = solve_allocation(costs, sizes, budget)
    bits = {n: parse_setting(k)[0] for n, k in chosen.items()}
    ratio = {n: ratios[n][k] for n, k in chosen.items()}
    overrides = {n: {"weight_bits": bits[n], **({"weight_clip": ratio[n]} if ratio[n] != 1.0 else {})}
                 for n in chosen}
    spec = QuantSpec(weight_bits=max(bits.values()), act_bits=act_bits, overrides=overrides)
    info = {"method": method, "budget": budget, "bits": bits, "clip": {n: parse_setting(k)[1] for n, k in
                                                                       chosen.items()},
            "clip_ratio": ratio, "setting": chosen, "sizes": sizes, "clips": list(clips),
            "average_bits": sum(sizes[n] * bits[n] for n in sizes) / total, "costs": costs, "ratios": ratios}
    return spec, info
