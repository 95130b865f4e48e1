"""Turn a float model into a quantization-aware one, and describe what each layer costs.

``quantize(model, spec)`` swaps every ``nn.Conv2d``/``nn.Linear`` (exact types) for ``QuantConv2d``/
``QuantLinear`` and every activation site for ``QuantAct``: ``nn.ReLU``/``ReLU6``/``SiLU``/``GELU``/
``LeakyReLU``/``Hardswish`` modules, and — found by tracing ``forward`` with torch.fx
(:mod:`qrobust.quant.sites`) — functional calls (``F.relu``, ``torch.relu``, ``x.relu()`` …) and second
uses of a shared module, each of which first gets a module of its own. The float weights are kept as the
latent parameters under the same state-dict names, so a float checkpoint loads into the quantized model with
only the quantizers' own entries (LSQ ``…weight_quant.step``, PACT ``…act_quant.alpha``) missing — see
:func:`load_float_state_dict`. Whatever stays float (subclasses of those layers, sigmoid/tanh/…, sites of a
``forward`` that does not trace) is named in a warning and listed by :func:`describe`.

Activation ranges: ReLU-family sites quantize [0, α] and signed ones (SiLU, GELU, LeakyReLU, Hardswish)
[lo, α], α = ``act_clip`` (6 by default; ReLU6 ≤ 6); a warning says so for activations not bounded by
themselves. ``calibrate=data`` sets each site's α to the largest output the float model gives on ``data``
instead, recorded as ``act_clip`` overrides in the spec (so a checkpoint rebuilds the same ranges).

Size accounting of :func:`describe` (stated once, used everywhere): each weight costs its bit-width; every
other number a deployed model stores costs 32 bits — biases, per-tensor/per-channel scales and LSQ steps
(DoReFa needs none: its levels are fixed in [−1, 1]), activation clip levels α (sign activations need
none), and all remaining parameters (BatchNorm affine, …) in one "(other)" row. Buffers (BatchNorm running
statistics, normalisation constants) are not counted. The float32 reference is 32 bits per parameter of the
float model.

>>> import torch.nn as nn
>>> qm = quantize(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), "w4a4")
>>> [type(m).__name__ for m in qm]
['QuantLinear', 'QuantAct', 'QuantLinear']
>>> totals = size_totals(describe(qm))
>>> totals["size_bits"], totals["float_bits"]
(424, 736)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qrobust.errors import CheckpointError, ConfigError
from qrobust.quant.layers import AddOperand, QuantAct, QuantConv2d, QuantLinear
from qrobust.quant.quantizers import Quantizer
from qrobust.quant.sites import ACT_MODULES, _float_ops, float_ops, separate_sites
from qrobust.quant.spec import FLOAT_BITS, QuantSpec
from qrobust.utils import eval_mode, model_device

__all__ = [
    "describe",
    "format_description",
    "is_quantized",
    "load_float_state_dict",
    "quantize",
    "quantize_additions",
    "quantize_as_saved",
    "quantizer_state_keys",
    "size_totals",
]

logger = logging.getLogger(__name__)

QUANT_LAYERS = (QuantConv2d, QuantLinear, QuantAct)
_WEIGHT_TYPES = (nn.Conv2d, nn.Linear)
_ACT_TYPES = tuple(ACT_MODULES)
_WEIGHT_FIELDS = ("weight_bits", "weight_scheme")
_ACT_FIELDS = ("act_bits", "act_scheme", "act_clip")


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` contains any QuantConv2d, QuantLinear or QuantAct."""
    return any(isinstance(m, QUANT_LAYERS) for m in model.modules())


def _swappable(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    weights: list[tuple[str, nn.Module]] = []
    acts: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, m in model.named_modules():
        if type(m) in _WEIGHT_TYPES:
            weights.append((name, m))
        elif type(m) in _ACT_TYPES:
            acts.append((name, m))
        elif isinstance(m, _WEIGHT_TYPES + _ACT_TYPES):
            skipped.append(f"{name or '<root>'} ({type(m).__name__})")
    if skipped:
        logger.warning(
            "quantize: left %d module(s) unquantized because they subclass Conv2d/Linear or an activation "
            "rather than being those exact types: %s",
            len(skipped),
            ", ".join(skipped[:10]) + (" …" if len(skipped) > 10 else ""),
        )
    return weights, acts


def _first_and_last(weights: list[tuple[str, nn.Module]]) -> tuple[str | None, str | None]:
    """First Conv2d/Linear, and last Linear (last Conv2d/Linear if there is no Linear), in module order."""
    if not weights:
        return None, None
    linears = [n for n, m in weights if isinstance(m, nn.Linear)]
    return weights[0][0], (linears[-1] if linears else weights[-1][0])


def _matches(key: str, names: list[str]) -> list[str]:
    return [n for n in names if n == key or n.startswith(key + ".")]


def _check_overrides(spec: QuantSpec, weight_names: list[str], act_names: list[str]) -> None:
    for key, ov in spec.overrides.items():
        hit_w, hit_a = _matches(key, weight_names), _matches(key, act_names)
        if not hit_w and not hit_a:
            valid = weight_names + act_names
            shown = ", ".join(valid[:30]) + (f", … ({len(valid)} in all)" if len(valid) > 30 else "")
            raise ConfigError(
                f"override {key!r} names no Conv2d/Linear/activation site of this model (nor a prefix of "
                f"one's name); quantizable modules: {shown or 'none'}"
            )
        if any(f in ov for f in _WEIGHT_FIELDS) and not hit_w:
            logger.warning("override %r sets weight settings but matches no Conv2d/Linear module", key)
        if any(f in ov for f in _ACT_FIELDS) and not hit_a:
            logger.warning(
                "override %r sets activation settings but matches no activation site (activations are "
                "quantized by the activation modules, e.g. %r)",
                key,
                act_names[0] if act_names else "relu",
            )


def _calibration_inputs(data: Any) -> list[torch.Tensor]:
    """The image batches of ``calibrate=``: an ArrayDataset, an ``(x, y)`` pair, a tensor or batches."""
    if hasattr(data, "tensors") and callable(data.tensors):
        data = data.tensors()[0]
    elif isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor) and len(data) <= 2 and (
        len(data) == 1 or data[1].dim() <= 1
    ):
        data = data[0]
    if isinstance(data, torch.Tensor):
        batches = list(data.split(256)) if data.numel() else []
    else:
        try:
            batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
        except TypeError:
            raise ConfigError(
                f"calibrate= takes images: an ArrayDataset, an (x, y) pair, a tensor or an iterable of batches, "
                f"got {type(data).__name__}"
            ) from None
    if not batches or not all(isinstance(b, torch.Tensor) and b.is_floating_point() for b in batches):
        raise ConfigError("calibrate= holds no float image batches: give it a few hundred training images")
    return batches


@torch.no_grad()
def _calibrated_clips(model: nn.Module, names: list[str], data: Any) -> dict[str, float]:
    """The largest output of each activation site ``names`` over ``data``, run through the float ``model``
    (of an addition operand, the largest magnitude: its levels are symmetric)."""
    peaks = dict.fromkeys(names, float("-inf"))

    def peak(m: nn.Module, out: torch.Tensor) -> float:
        out = out.detach()
        return float(out.abs().max() if isinstance(m, AddOperand) else out.max())

    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, _i, out, n=n: peaks.__setitem__(n, max(peaks[n], peak(m, out)))
        )
        for n in names
    ]
    device = model_device(model)
    try:
        with eval_mode(model):
            for x in _calibration_inputs(data):
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return peaks


def _calibrate_spec(spec: QuantSpec, model: nn.Module, acts: list[tuple[str, nn.Module]], data: Any) -> QuantSpec:
    peaks = _calibrated_clips(model, [n for n, _ in acts], data)
    overrides = {k: dict(v) for k, v in spec.overrides.items()}
    kept: list[str] = []
    for name, m in acts:
        own = [spec.overrides.get(name, {})] if type(m) is AddOperand else spec.overrides_for(name)
        if any("act_clip" in ov for ov in own):
            kept.append(name)  # an act_clip the user set for this site wins
            continue
        peak = peaks[name]
        if not peak > 0:
            logger.warning(
                "calibrate: activation %r gave no positive output on the calibration data; it keeps act_clip=%g",
                name, spec.act_config(name)["clip"],
            )  # fmt: skip
            continue
        if type(m) is nn.ReLU6:
            peak = min(peak, 6.0)
        overrides[name] = {**overrides.get(name, {}), "act_clip": float(f"{peak:.6g}")}
    if kept:
        logger.info("calibrate: kept the act_clip your overrides set for %s", ", ".join(kept))
    return spec.replace(overrides=overrides)


def _report_ranges(target: nn.Module, spec: QuantSpec, calibrated: bool) -> None:
    ranges = [
        (n, m.kind, m.act_range())
        for n, m in target.named_modules()
        if isinstance(m, QuantAct) and m.act_range() is not None
    ]
    if not ranges:
        return
    logger.info(
        "activation ranges: %s", ", ".join(f"{n or '<root>'} [{lo:.4g}, {hi:.4g}]" for n, _, (lo, hi) in ranges)
    )
    unbounded = [
        (n, r)
        for n, kind, r in ranges
        if kind != "relu6" and not any("act_clip" in ov for ov in spec.overrides_for(n))
    ]  # sites whose range is the global act_clip, not one set for them (or calibrated)
    if unbounded and not calibrated and any(
        m.scheme == "clip" for _, m in target.named_modules() if isinstance(m, QuantAct)
    ):
        shown = ", ".join(f"{n or '<root>'} [{lo:.3g}, {hi:.3g}]" for n, (lo, hi) in unbounded[:6])
        logger.warning(
            "quantize: %d activation(s) unbounded in float now clip at act_clip (%s%s); a model not trained "
            "with that clip loses accuracy — pass calibrate=data (qrobust train: --calib N) to set each range "
            "from the data, or set act_clip",
            len(unbounded), shown, " …" if len(unbounded) > 6 else "",
        )  # fmt: skip


def _warn_float(target: nn.Module, spec: QuantSpec) -> None:
    if spec.act_bits == FLOAT_BITS and not any(
        ov.get("act_bits", FLOAT_BITS) != FLOAT_BITS for ov in spec.overrides.values()
    ):
        return  # float activations were asked for
    left = float_ops(target)
    if left:
        shown = "; ".join(f"{n}: {what}" for n, what in left[:8])
        logger.warning(
            "quantize: %d activation(s) stay float, so this model is not fully %s: %s%s — use ReLU/ReLU6/SiLU/"
            "GELU/LeakyReLU/Hardswish (modules or F.* calls) where quantized activations are meant; "
            "describe() lists them",
            len(left), f"w{spec.weight_bits}a{spec.act_bits}", shown, " …" if len(left) > 8 else "",
        )  # fmt: skip


def quantize(
    model: nn.Module,
    spec: QuantSpec | str | Mapping[str, Any],
    *,
    inplace: bool = False,
    calibrate: Any = None,
    _as_saved: bool = False,
) -> nn.Module:
    """The quantization-aware version of ``model`` under ``spec`` (a QuantSpec, ``"w4a4"`` or a dict).

    ``inplace=False`` (default) deep-copies ``model`` first and leaves it untouched; ``inplace=True`` swaps
    the modules of ``model`` itself and returns it, its Parameter objects unchanged (an optimizer built on
    them keeps working, though quantizer parameters such as LSQ steps are new). A trained float model keeps
    its weights; LSQ steps are initialised from them. Functional activations and shared activation modules
    get modules of their own first (the model keeps its class; see :mod:`qrobust.quant.sites`).
    ``calibrate`` — images (an ArrayDataset, an ``(x, y)`` pair, a tensor or batches) — sets each
    activation's clip α from the float model's outputs on them (see the module docstring). Sets
    ``model.qrobust_spec = spec.to_dict()`` (calibrated clips included) and keeps ``model.qrobust_arch``.
    """
    spec = QuantSpec.coerce(spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize needs a torch.nn.Module, got {type(model).__name__}")
    if is_quantized(model):
        raise ConfigError(
            "model already contains quantized layers (QuantConv2d/QuantLinear/QuantAct); quantize the float "
            "model instead (e.g. rebuild it with qrobust.models.build_model) — quantize() is not re-entrant"
        )
    target = model if inplace else copy.deepcopy(model)
    if type(target) not in _ACT_TYPES + _WEIGHT_TYPES:
        separate_sites(target, additions=spec.add_bits != FLOAT_BITS)
    weights, acts = _swappable(target)
    if calibrate is not None:
        spec = _calibrate_spec(spec, target, acts, calibrate)
    _check_overrides(spec, [n for n, _ in weights], [n for n, _ in acts])

    device = model_device(target)
    dtype = next((p.dtype for p in target.parameters() if p.is_floating_point()), None)
    replacements: dict[int, nn.Module] = {}
    first, last = _first_and_last(weights)
    for name, m in weights:
        cfg = spec.weight_config(name, first=name == first, last=name == last)
        cls = QuantConv2d if type(m) is nn.Conv2d else QuantLinear
        replacements[id(m)] = cls.from_float(
            m, weight_bits=cfg["bits"], weight_scheme=cfg["scheme"], sign_grad=cfg["sign_grad"],
            weight_clip=cfg["clip"],
        )
    for name, m in acts:
        cfg = spec.add_config(name) if type(m) is AddOperand else spec.act_config(name)
        try:
            replacements[id(m)] = QuantAct.from_float(
                m,
                bits=cfg["bits"],
                scheme=cfg["scheme"],
                clip=cfg["clip"],
                sign_grad=cfg["sign_grad"],
                device=device,
                dtype=dtype,
            )
        except ConfigError as e:
            raise ConfigError(f"activation {name!r} ({type(m).__name__}): {e}") from None

    if id(target) in replacements:  # the model is itself a single Conv2d/Linear/ReLU
        root = replacements[id(target)]
        if hasattr(target, "qrobust_arch"):
            root.qrobust_arch = target.qrobust_arch
        target = root
    else:
        for parent in list(target.modules()):
            for child_name, child in list(parent.named_children()):
                if id(child) in replacements:
                    setattr(parent, child_name, replacements[id(child)])
    target.qrobust_spec = spec.to_dict()
    adds = sum(type(m) is AddOperand for _, m in acts)
    if adds:
        logger.info("quantized %d weight layer(s), %d activation(s) and %d addition operand(s) to %s", len(weights),
                    len(acts) - adds, adds, spec)
    else:
        logger.info("quantized %d weight layer(s) and %d activation(s) to %s", len(weights), len(acts), spec)
    _report_ranges(target, spec, calibrate is not None or _as_saved)
    _warn_float(target, spec)
    return target


def quantize_additions(model: nn.Module, bits: int = 8, *, calibrate: Any = None) -> nn.Module:
    """A copy of the quantized ``model`` whose additions are quantized too, as ``add_bits=bits`` would have
    made it: each addition operand not already on an activation quantizer's grid gets symmetric ``bits``-bit
    levels on [−α, α] — α the largest magnitude that operand takes on ``calibrate`` (images), run through
    ``model`` itself, or ``act_clip`` without it. The weights and the other quantizers are unchanged; the
    spec (``qrobust_spec``) gets ``add_bits`` and the α as overrides, so a checkpoint of the copy loads back
    the same. This is a different function from ``model`` (by one rounding of each residual branch):
    evaluate the copy, not the original, before deploying it (docs/deploy.md).
    """
    if not is_quantized(model) or not getattr(model, "qrobust_spec", None):
        raise ConfigError("quantize_additions takes a model quantize() made (it has no qrobust_spec); for a float "
                          "model pass add_bits in the spec: quantize(model, 'w4a4,add_bits=8')")
    spec = QuantSpec.coerce(model.qrobust_spec)
    if spec.add_bits != FLOAT_BITS:
        raise ConfigError(f"the model's additions are already quantized (add_bits={spec.add_bits})")
    new_spec = spec.replace(add_bits=bits)
    target = copy.deepcopy(model)
    sites = separate_sites(target, additions=True)
    names = [s.name for s in sites if s.kind == "identity"]
    if not names:
        logger.warning("quantize_additions: the model has no addition with an operand to quantize; unchanged")
    overrides = {k: dict(v) for k, v in new_spec.overrides.items()}
    if calibrate is not None and names:
        for name, peak in _calibrated_clips(target, names, calibrate).items():
            if peak > 0:
                overrides[name] = {**overrides.get(name, {}), "act_clip": float(f"{peak:.6g}")}
    new_spec = new_spec.replace(overrides=overrides)
    device = model_device(target)
    dtype = next((p.dtype for p in target.parameters() if p.is_floating_point()), None)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = target.get_submodule(parent_name)
        cfg = new_spec.add_config(name)
        setattr(parent, attr, QuantAct.from_float(getattr(parent, attr), bits=cfg["bits"], scheme="clip",
                                                  clip=cfg["clip"], device=device, dtype=dtype))
    target.qrobust_spec = new_spec.to_dict()
    logger.info("quantized %d addition operand(s) to %d bits%s", len(names), bits,
                " (ranges calibrated)" if calibrate is not None else f" on [−{spec.act_clip:g}, {spec.act_clip:g}]")
    return target


def quantize_as_saved(model: nn.Module, spec: QuantSpec | str | Mapping[str, Any]) -> nn.Module:
    """:func:`quantize` in place to the spec a model was, or is about to be, trained with: a checkpoint being
    loaded, or a freshly built model trained from scratch — no warning that its ranges differ from float's."""
    return quantize(model, spec, inplace=True, _as_saved=True)


def quantizer_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys that belong to quantizers (LSQ steps, PACT α …) rather than to the float model."""
    keys: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            keys.extend(m.state_dict(prefix=f"{name}." if name else "").keys())
    return keys


def load_float_state_dict(
    qmodel: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> list[str]:
    """Load a float model's ``state_dict`` into its quantized version ``qmodel``.

    Quantizer entries absent from ``state_dict`` keep (LSQ: get re-initialised from the loaded weights)
    their initial values; their keys are returned. With ``strict``, any other missing key or any unexpected
    key raises CheckpointError. Entries that are present (a quantized checkpoint) are loaded as they are.
    """
    own = set(qmodel.state_dict().keys())
    quant_keys = set(quantizer_state_keys(qmodel))
    given = set(state_dict.keys())
    missing, unexpected = own - given, given - own
    bad_missing = sorted(missing - quant_keys)
    if strict and (bad_missing or unexpected):
        raise CheckpointError(
            "state dict does not match the quantized model: "
            f"missing {bad_missing[:10]}{' …' if len(bad_missing) > 10 else ''}, "
            f"unexpected {sorted(unexpected)[:10]}{' …' if len(unexpected) > 10 else ''}; "
            "was it saved from the same architecture (same qrobust_arch)?"
        )
    try:
        qmodel.load_state_dict(dict(state_dict), strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"state dict does not fit the quantized model: {e}") from e
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quant is not None:
            prefix = f"{name}.weight_quant." if name else "weight_quant."
            if any(k.startswith(prefix) for k in missing & quant_keys):
                m.reset_quantizer()
    return sorted(missing & quant_keys)


# ---- describe ---------------------------------------------------------------------------------------------
def describe(model: nn.Module) -> list[dict[str, Any]]:
    """One row per Conv2d/Linear and per activation module (QuantAct or float), a row per other float op on
    the data path, plus an "(other)" row.

    Row keys: ``name, type, kind ("weight" | "act" | "float-op" | "other"), scheme ("float" when
    unquantized), weight_bits, act_bits (None where not applicable), range (an activation quantizer's
    ``(lo, hi)``, else None), params (learnable parameters, quantizer ones included), size_bits,
    float_bits``. ``"float-op"`` rows are the activations computing in float that are not modules listed
    above — functional calls, sigmoid/tanh … (:func:`qrobust.quant.sites.float_ops`). Sizes follow the
    module docstring. Works on float models too.
    """
    rows: list[dict[str, Any]] = []
    counted: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHT_TYPES):
            q = m.weight_quant if isinstance(m, (QuantConv2d, QuantLinear)) else None
            bits = m.weight_bits if q is not None else FLOAT_BITS
            n_w = m.weight.numel()
            n_b = m.bias.numel() if m.bias is not None else 0
            n_q = sum(p.numel() for p in q.parameters()) if q is not None else 0
            scales = q.num_scales(m.weight) if q is not None else 0
            rows.append(
                {
                    "name": name, "type": type(m).__name__, "kind": "weight",
                    "scheme": q.scheme if q is not None else "float", "weight_bits": bits, "act_bits": None,
                    "range": None, "params": n_w + n_b + n_q, "size_bits": n_w * bits + 32 * (n_b + scales),
                    "float_bits": 32 * (n_w + n_b),
                }
            )  # fmt: skip
            counted.update(id(p) for p in m.parameters())
        elif isinstance(m, QuantAct) or type(m) in _ACT_TYPES:
            q = m.act_quant if isinstance(m, QuantAct) else None
            rows.append(
                {
                    "name": name, "type": type(m).__name__, "kind": "act",
                    "scheme": q.scheme if q is not None else "float", "weight_bits": None,
                    "act_bits": m.bits if q is not None else FLOAT_BITS,
                    "range": m.act_range() if q is not None else None,
                    "params": sum(p.numel() for p in m.parameters()),
                    "size_bits": 32 * q.num_scales() if q is not None else 0, "float_bits": 0,
                }
            )  # fmt: skip
            counted.update(id(p) for p in m.parameters())
    listed = {r["name"] for r in rows}
    for name, what, is_module in _float_ops(model):
        if not (is_module and name in listed):
            rows.append(
                {
                    "name": name, "type": what, "kind": "float-op", "scheme": "float", "weight_bits": None,
                    "act_bits": FLOAT_BITS, "range": None, "params": 0, "size_bits": 0, "float_bits": 0,
                }
            )  # fmt: skip
    other_types: set[str] = set()
    n_other = 0
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) not in counted:
                counted.add(id(p))
                n_other += p.numel()
                other_types.add(type(m).__name__)
    if n_other:
        rows.append(
            {
                "name": "(other)", "type": ",".join(sorted(other_types)), "kind": "other", "scheme": "float",
                "weight_bits": FLOAT_BITS, "act_bits": None, "range": None, "params": n_other,
                "size_bits": 32 * n_other, "float_bits": 32 * n_other,
            }
        )  # fmt: skip
    return rows


def size_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"params", "size_bits", "float_bits", "compression"}`` summed over ``describe`` rows."""
    size = sum(r["size_bits"] for r in rows)
    flt = sum(r["float_bits"] for r in rows)
    return {
        "params": sum(r["params"] for r in rows),
        "size_bits": size,
        "float_bits": flt,
        "compression": (flt / size) if size else float("nan"),
    }


def _kib(bits: int) -> str:
    return f"{bits / 8192:.2f}"


def format_description(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``describe`` rows with totals and the compression ratio vs float32."""
    header = ("layer", "type", "scheme", "w bits", "a bits", "range", "params", "size bits")
    body = [
        (
            r["name"] or "<root>",
            r["type"],
            r["scheme"],
            "-" if r["weight_bits"] is None else str(r["weight_bits"]),
            "-" if r["act_bits"] is None else str(r["act_bits"]),
            "-" if r.get("range") is None else f"[{r['range'][0]:.3g}, {r['range'][1]:.3g}]",
            f"{r['params']:,}",
            f"{r['size_bits']:,}",
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    right = {3, 4, 6, 7}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    t = size_totals(rows)
    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(b) for b in body)]
    ratio = f"{t['compression']:.2f}x smaller" if t["size_bits"] else "n/a"
    lines.append(
        f"total: {t['params']:,} params, {_kib(t['size_bits'])} KiB vs "
        f"{_kib(t['float_bits'])} KiB in float32 ({ratio})"
    )
    lines.append(
        "(weights at their bit-widths; biases, scales, clip levels and other parameters at 32 bits; "
        "buffers not counted)"
    )
    floats = [r for r in rows if r["kind"] == "float-op"]
    if floats and any(r["scheme"] != "float" for r in rows):  # a quantized model with float activations
        lines.append(f"float on the data path: {len(floats)} activation(s) ({', '.join(r['name'] for r in floats)})")
    return "\n".join(lines)
