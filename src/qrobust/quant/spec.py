"""QuantSpec: which bit-widths and schemes a model's weights and activations get.

A spec is plain data (JSON via :meth:`QuantSpec.to_dict`) and has a short text form for the CLI::

    w4a4                                 4-bit weights, 4-bit activations, default schemes (see below)
    w1a1                                 binary weights, 1-bit activations
    w4a32 / w4                           4-bit weights, float activations (32 means float)
    w4a4,weight_scheme=lsq,first_layer_bits=8,last_layer_bits=8
    w4a4,layer3.0.conv1=w2,layer3.0.relu1=a2      per-layer overrides by module name
    w4a4,add_bits=8                      and the operands of residual additions quantized to 8 bits

Default schemes: weights ``uniform_per_channel`` (symmetric, max-|w| scale per output channel, the
PyTorch/Brevitas-style default) because it keeps the float weights' scale, so quantization-aware
fine-tuning from a float checkpoint starts close to the float model; DoReFa maps every weight into
[−1, 1] whatever its scale and, on digits, lost 25 points in the first fine-tuning epoch where uniform
lost 2. Activations ``clip`` on [0, act_clip = 6] (DQ's ReLU6 range).

Resolution for one layer: the global setting, then ``first_layer_bits``/``last_layer_bits`` (weight bits of
the first Conv2d-or-Linear, and of the last Linear — the classifier — or of the last Conv2d when the model
has no Linear, in module registration order, which is forward order for qrobust models; for a model with
a single such layer the last-layer value wins), then ``overrides``. An override key names a module
(``"layer3.0.conv1"``) or a prefix of module names (``"layer3"`` covers everything under it); more
specific (longer) keys win. Weight settings (``weight_bits``, ``weight_scheme``, ``sign_grad``, and the
override-only ``weight_clip``) act on
Conv2d/Linear layers, activation settings (``act_bits``, ``act_scheme``, ``act_clip``, ``sign_grad``) on the
ReLU/ReLU6 modules that become ``QuantAct``.

``add_bits`` (32, float, by default) quantizes the operands of every addition on the data path that do not
already come from an activation quantizer — a ResNet's residual branch after its last BatchNorm, a projection
shortcut — to symmetric levels on [−α, α] (α = ``act_clip``, or calibrated): the additions then read integers
on both sides, which is what lets an integer runtime run every convolution and addition on integers
(docs/deploy.md). It changes the function, so a model meant to be deployed that way is trained or calibrated
with it; it needs quantized activations.

Rules worth knowing:

* bits are 1–8, or 32 for float (no quantizer at all);
* at 1 bit every weight scheme is binary: ``sign(w)`` times the per-output-channel mean ``|w|`` (XNOR-Net);
  ``weight_scheme="binary"`` therefore only accepts 1 (or 32) bits;
* ``act_scheme="sign"`` (binary activations in {-1, +1}) only accepts 1 (or 32) bits;
* ``sign_grad`` picks the straight-through estimator of the 1-bit schemes' sign: ``"identity"`` (gradient
  passes unchanged) or ``"clipped"`` (zero where |x| > 1: BinaryNet's hardtanh STE). Multi-bit schemes have
  nothing to clip: uniform/DoReFa weight ranges cover every weight by construction, LSQ uses its paper's
  gradient, and for activations the clip to [0, α] *is* the activation (gradient 1 only for 0 < x < α, as
  ReLU6);
* ``weight_clip`` (overrides only, e.g. ``{"conv1": {"weight_bits": 3, "weight_clip": 0.7}}``) clips the
  symmetric uniform weight grid at that fraction of max|w| (per output channel under ``uniform_per_channel``):
  scale = clip·max|w| / (2^(b−1) − 1), the weights beyond it saturate. 1.0 (the default) is the max-|w| grid;
  only the ``uniform`` schemes at 2–8 bits take it (the per-layer clipping candidates of
  :mod:`qrobust.analysis.allocation` are written as these overrides);
* ``act_clip`` is the clipping level α of the "clip" scheme and the initial α of "pact". On a ReLU6 model
  α is ``min(act_clip, 6)``, so the default 6.0 reproduces ReLU6's range exactly.

``sign_grad`` was called ``ste`` before; the old spelling still reads wherever a spec was persisted (spec
strings ``"…,ste=clipped"``, ``to_dict()`` dicts and overrides with key ``"ste"``, ``QuantSpec(ste=…)``).

Validation happens here, once: :func:`check_weight_config` and :func:`check_act_config` are what the spec
and the public layer constructors (:mod:`qrobust.quant.layers`) call; the quantizer factories trust them.

>>> spec = QuantSpec.parse("w4a4,first_layer_bits=8")
>>> spec.weight_bits, spec.act_bits, spec.first_layer_bits
(4, 4, 8)
>>> str(spec)
'w4a4,first_layer_bits=8'
>>> QuantSpec.parse("w2a32,layer1.conv=w8").weight_config("layer1.conv")["bits"]
8
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qrobust.errors import ConfigError
from qrobust.validation import check_choice

FLOAT_BITS = 32
VALID_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
WEIGHT_SCHEMES: tuple[str, ...] = ("dorefa", "uniform", "uniform_per_channel", "lsq", "binary")
ACT_SCHEMES: tuple[str, ...] = ("clip", "pact", "sign")
SIGN_GRADS: tuple[str, ...] = ("identity", "clipped")
OVERRIDE_FIELDS: tuple[str, ...] = (
    "weight_bits",
    "act_bits",
    "weight_scheme",
    "act_scheme",
    "act_clip",
    "sign_grad",
    "weight_clip",
)
#: weight schemes whose grid can be clipped below max|w| (``weight_clip`` overrides)
CLIPPABLE_WEIGHT_SCHEMES: tuple[str, ...] = ("uniform", "uniform_per_channel")
LEGACY_NAMES: dict[str, str] = {"ste": "sign_grad"}  # persisted spellings (spec strings, checkpoint dicts)
ONE_BIT_ONLY_WEIGHT = ("binary",)
ONE_BIT_ONLY_ACT = ("sign",)

_BITS_RE = re.compile(r"^(?:w(\d+))?(?:a(\d+))?$")


def check_bits(value: Any, *, name: str = "bits") -> int:
    """``value`` as a valid bit-width (1–8 or 32), else ConfigError."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_BITS:
        raise ConfigError(f"{name} must be one of 1–8 or 32 (float), got {value!r}")
    return int(value)


def check_clip(value: Any, *, name: str = "act_clip") -> float:
    """A finite positive clipping level."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number (e.g. 6.0), got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out) or out <= 0:
        raise ConfigError(f"{name} must be a positive finite number (e.g. 6.0), got {value!r}")
    return out


def check_weight_clip(value: Any, *, name: str = "weight_clip") -> float:
    """A weight clipping ratio in (0, 1]: the fraction of max|w| (per output channel under
    ``uniform_per_channel``) at which the symmetric uniform grid ends."""
    out = check_clip(value, name=name)
    if out > 1:
        raise ConfigError(f"{name} is a fraction of max|w| in (0, 1] (1 = no clipping), got {value!r}")
    return out


def check_weight_combo(bits: int, scheme: str, *, where: str = "", clip: float = 1.0) -> None:
    if clip != 1.0 and bits != FLOAT_BITS and (scheme not in CLIPPABLE_WEIGHT_SCHEMES or bits == 1):
        raise ConfigError(
            f"weight_clip={clip:g} of {where or 'the spec'} needs a 2–8-bit {' or '.join(CLIPPABLE_WEIGHT_SCHEMES)} "
            f"weight scheme, got {bits}-bit {scheme!r}: drop weight_clip or use weight_scheme=uniform_per_channel"
        )
    if scheme in ONE_BIT_ONLY_WEIGHT and bits not in (1, FLOAT_BITS):
        raise ConfigError(
            f"weight_scheme={scheme!r} is 1-bit only but {where or 'the spec'} asks for {bits}-bit weights; "
            f"use a multi-bit scheme ({', '.join(s for s in WEIGHT_SCHEMES if s not in ONE_BIT_ONLY_WEIGHT)})"
            " — "
            "every scheme is binary at 1 bit — or set those bits to 1 or 32"
        )


def check_act_combo(bits: int, scheme: str, *, where: str = "") -> None:
    if scheme in ONE_BIT_ONLY_ACT and bits not in (1, FLOAT_BITS):
        raise ConfigError(
            f"act_scheme={scheme!r} is 1-bit only but {where or 'the spec'} asks for {bits}-bit activations; "
            "use 'clip' or 'pact' for multi-bit activations, or set those bits to 1 or 32"
        )


def check_weight_config(
    bits: Any, scheme: Any, sign_grad: Any, *, where: str = ""
) -> tuple[int, str, str]:
    """``(bits, scheme, sign_grad)`` of one weight quantizer, checked and canonical, else ConfigError.

    The one check of a weight setting: the spec and the public layer constructors call it, the quantizer
    factories trust what it returns.
    """
    of = f" of {where}" if where else ""
    bits = check_bits(bits, name=f"weight_bits{of}")
    scheme = check_choice(f"weight_scheme{of}", scheme, WEIGHT_SCHEMES, casefold=True)
    sign_grad = check_choice(f"sign_grad{of}", sign_grad, SIGN_GRADS, casefold=True)
    check_weight_combo(bits, scheme, where=where)
    return bits, scheme, sign_grad


def check_act_config(
    bits: Any, scheme: Any, clip: Any, sign_grad: Any, *, where: str = ""
) -> tuple[int, str, float, str]:
    """``(bits, scheme, clip, sign_grad)`` of one activation quantizer, checked and canonical (see above)."""
    of = f" of {where}" if where else ""
    bits = check_bits(bits, name=f"act_bits{of}")
    scheme = check_choice(f"act_scheme{of}", scheme, ACT_SCHEMES, casefold=True)
    clip = check_clip(clip, name=f"act_clip{of}")
    sign_grad = check_choice(f"sign_grad{of}", sign_grad, SIGN_GRADS, casefold=True)
    check_act_combo(bits, scheme, where=where)
    return bits, scheme, clip, sign_grad


def _parse_bits_token(token: str, *, what: str) -> dict[str, int]:
    text = token.strip().lower()
    if text in ("float", "fp32", "f32"):
        return {"weight_bits": FLOAT_BITS, "act_bits": FLOAT_BITS}
    m = _BITS_RE.match(text)
    if not text or m is None or (m.group(1) is None and m.group(2) is None):
        raise ConfigError(
            f"cannot parse {what} {token!r}: expected 'w<bits>a<bits>' such as 'w4a4', 'w1a1', 'w4a32' "
            "(32 = float), or just 'w2' / 'a4'"
        )
    out: dict[str, int] = {}
    if m.group(1) is not None:
        out["weight_bits"] = check_bits(int(m.group(1)), name=f"weight bits in {token!r}")
    if m.group(2) is not None:
        out["act_bits"] = check_bits(int(m.group(2)), name=f"activation bits in {token!r}")
    return out


def _normalize_override(name: Any, value: Any) -> dict[str, Any]:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"override keys must be module names such as 'layer3.0.conv1', got {name!r}")
    if isinstance(value, str):
        return _parse_bits_token(value, what=f"override for {name!r}")
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"override for {name!r} must be a dict like {{'weight_bits': 2}} or a string like 'w2a4', "
            f"got {value!r}"
        )
    out: dict[str, Any] = {}
    for key, v in value.items():
        if LEGACY_NAMES.get(key, key) not in OVERRIDE_FIELDS:
            raise ConfigError(
                f"override for {name!r} has unknown setting {key!r}; "
                f"valid settings: {', '.join(OVERRIDE_FIELDS)}"
            )
        key = LEGACY_NAMES.get(key, key)
        where = f"override {name!r}"
        if key in ("weight_bits", "act_bits"):
            out[key] = check_bits(v, name=f"{key} of {where}")
        elif key == "weight_scheme":
            out[key] = check_choice(f"weight_scheme of {where}", v, WEIGHT_SCHEMES, casefold=True)
        elif key == "act_scheme":
            out[key] = check_choice(f"act_scheme of {where}", v, ACT_SCHEMES, casefold=True)
        elif key == "act_clip":
            out[key] = check_clip(v, name=f"act_clip of {where}")
        elif key == "weight_clip":
            out[key] = check_weight_clip(v, name=f"weight_clip of {where}")
        else:
            out[key] = check_choice(f"sign_grad of {where}", v, SIGN_GRADS, casefold=True)
    if not out:
        raise ConfigError(
            f"override for {name!r} is empty; give at least one of {', '.join(OVERRIDE_FIELDS)}"
        )
    return out


def _compact_override(ov: Mapping[str, Any]) -> str | None:
    """'w2a4' / 'w2' / 'a4' for a bits-only override, None when it carries other settings."""
    if set(ov) - {"weight_bits", "act_bits"}:
        return None
    text = ""
    if "weight_bits" in ov:
        text += f"w{ov['weight_bits']}"
    if "act_bits" in ov:
        text += f"a{ov['act_bits']}"
    return text


@dataclass(frozen=True)
class QuantSpec:
    """Bit-widths and schemes for a whole model (see the module docstring for the rules).

    >>> QuantSpec(weight_bits=4, act_bits=4, weight_scheme="lsq").to_dict()["weight_scheme"]
    'lsq'
    >>> QuantSpec.parse("w9a4")
    Traceback (most recent call last):
    ...
    qrobust.errors.ConfigError: weight bits in 'w9a4' must be one of 1–8 or 32 (float), got 9
    """

    weight_bits: int = FLOAT_BITS
    act_bits: int = FLOAT_BITS
    weight_scheme: str = "uniform_per_channel"
    act_scheme: str = "clip"
    act_clip: float = 6.0
    sign_grad: str = "identity"
    first_layer_bits: int | None = None
    last_layer_bits: int | None = None
    add_bits: int = FLOAT_BITS
    overrides: Mapping[str, Any] = field(default_factory=dict)
    ste: dataclasses.InitVar[str | None] = None  # the old name of sign_grad, still accepted

    def __post_init__(self, ste: str | None) -> None:
        set_ = object.__setattr__
        if ste is not None:
            if self.sign_grad != "identity" and self.sign_grad != ste:
                raise ConfigError(
                    f"ste={ste!r} is the old name of sign_grad, which is {self.sign_grad!r}; give only sign_grad"
                )
            set_(self, "sign_grad", ste)
        weight = check_weight_config(self.weight_bits, self.weight_scheme, self.sign_grad)
        act = check_act_config(self.act_bits, self.act_scheme, self.act_clip, self.sign_grad)
        for key, value in zip(("weight_bits", "weight_scheme", "sign_grad"), weight):
            set_(self, key, value)
        for key, value in zip(("act_bits", "act_scheme", "act_clip"), act):
            set_(self, key, value)
        for key in ("first_layer_bits", "last_layer_bits"):
            value = getattr(self, key)
            if value is not None:
                set_(self, key, check_bits(value, name=key))
        set_(self, "add_bits", check_bits(self.add_bits, name="add_bits"))
        if self.add_bits != FLOAT_BITS and not 2 <= self.add_bits <= 8:
            raise ConfigError(f"add_bits must be 2–8 (the operands of residual additions are signed), or 32 for "
                              f"float additions, got {self.add_bits}")
        if self.add_bits != FLOAT_BITS and self.act_bits == FLOAT_BITS:
            raise ConfigError(
                "add_bits quantizes the operands of residual additions so that an integer runtime adds integers; "
                "with float activations (act_bits=32) there is nothing integer to add: quantize the activations "
                "too (e.g. 'w8a8,add_bits=8') or drop add_bits"
            )
        set_(self, "overrides", self._normalize_overrides(self.overrides))
        for key in ("first_layer_bits", "last_layer_bits"):
            if getattr(self, key) is not None:
                check_weight_combo(getattr(self, key), self.weight_scheme, where=key)
        for name, ov in self.overrides.items():
            check_weight_combo(
                ov.get("weight_bits", self.weight_bits),
                ov.get("weight_scheme", self.weight_scheme),
                where=f"override {name!r}",
                clip=ov.get("weight_clip", 1.0),
            )
            check_act_combo(
                ov.get("act_bits", self.act_bits),
                ov.get("act_scheme", self.act_scheme),
                where=f"override {name!r}",
            )

    @staticmethod
    def _normalize_overrides(overrides: Any) -> dict[str, dict[str, Any]]:
        if overrides is None:
            return {}
        if isinstance(overrides, str):
            overrides = [t for t in overrides.split(",") if t.strip()]
        if isinstance(overrides, Mapping):
            items = list(overrides.items())
        elif isinstance(overrides, Iterable):
            items = []
            for token in overrides:
                if not isinstance(token, str) or "=" not in token:
                    raise ConfigError(f"override {token!r} must look like 'layer3.0.conv1=w2a4'")
                name, _, value = token.partition("=")
                items.append((name.strip(), value.strip()))
        else:
            raise ConfigError(f"overrides must be a dict or a list of 'name=w2a4' strings, got {overrides!r}")
        return {name.strip(): _normalize_override(name, value) for name, value in items}

    def __hash__(self) -> int:
        return hash(str(self.to_dict()))

    # ---- construction ----
    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> QuantSpec:
        """Parse ``"w4a4"``, ``"w4a4,weight_scheme=lsq,layer3.0.conv1=w2"``; ``kwargs`` override the text."""
        if not isinstance(text, str):
            raise ConfigError(f"a quantization spec string such as 'w4a4' is needed, got {text!r}")
        tokens = [t.strip() for t in text.split(",")]
        values: dict[str, Any] = dict(_parse_bits_token(tokens[0], what="quantization spec"))
        overrides: dict[str, Any] = {}
        scalar_fields = [f.name for f in dataclasses.fields(cls) if f.name != "overrides"]
        for token in tokens[1:]:
            if not token:
                continue
            key, eq, value = token.partition("=")
            key, value = LEGACY_NAMES.get(key.strip(), key.strip()), value.strip()
            if not eq or not key or not value:
                raise ConfigError(
                    f"cannot parse {token!r} in spec {text!r}: expected 'key=value' with key one of "
                    f"{', '.join(scalar_fields)}, or a layer override such as 'layer3.0.conv1=w2a4'"
                )
            if key in scalar_fields:
                if key in ("first_layer_bits", "last_layer_bits") and value.lower() == "none":
                    values[key] = None
                elif key.endswith("_bits"):
                    values[key] = check_bits(value, name=key)
                else:
                    values[key] = value
            else:
                overrides[key] = value
        if overrides:
            values["overrides"] = overrides
        values.update({LEGACY_NAMES.get(k, k): v for k, v in kwargs.items()})
        return cls(**values)

    @classmethod
    def coerce(cls, spec: QuantSpec | str | Mapping[str, Any] | None) -> QuantSpec:
        """A QuantSpec from a QuantSpec, a spec string, a ``to_dict()`` dict, or None (= float, w32a32)."""
        if isinstance(spec, QuantSpec):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, str):
            return cls.parse(spec)
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        raise ConfigError(
            f"expected a QuantSpec, a string such as 'w4a4' or a dict, got {type(spec).__name__}"
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        """The spec of a :meth:`to_dict` dict. ``"name"`` is display only and ignored, unless it is the only
        key (``{"name": "w4a4"}`` parses the name)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"QuantSpec.from_dict needs a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names) - set(LEGACY_NAMES) - {"name"})
        if unknown:
            raise ConfigError(f"unknown QuantSpec field(s) {unknown}; valid fields: {', '.join(names)}")
        if set(d) == {"name"}:
            return cls.parse(d["name"])
        return cls(**{LEGACY_NAMES.get(k, k): v for k, v in d.items() if k != "name"})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` turns back into an equal spec.

        Holds every field plus ``"name"``, the short text form (``str(spec)``) for display.
        """
        out: dict[str, Any] = {"name": str(self)}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        out["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        if self.add_bits == FLOAT_BITS:  # the default: records written before add_bits existed stay equal
            del out["add_bits"]
        return out

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (the spec itself is immutable)."""
        return dataclasses.replace(self, **changes)

    def with_options(self, **changes: Any) -> QuantSpec:
        """Alias of :meth:`replace`."""
        return self.replace(**changes)

    def __str__(self) -> str:
        """Short text form; ``QuantSpec.parse(str(spec)) == spec`` unless an override carries schemes/clip."""
        parts = [f"w{self.weight_bits}a{self.act_bits}"]
        defaults = QuantSpec()
        for f in dataclasses.fields(self):
            if f.name in ("weight_bits", "act_bits", "overrides"):
                continue
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                parts.append(f"{f.name}={value}")
        for name, ov in self.overrides.items():
            compact = _compact_override(ov)
            parts.append(f"{name}={compact}" if compact is not None else f"{name}={dict(ov)}")
        return ",".join(parts)

    # ---- per-layer resolution ----
    @property
    def is_float(self) -> bool:
        """True when nothing at all is quantized (every resolved bit-width is 32)."""
        bits = [self.weight_bits, self.act_bits, self.first_layer_bits, self.last_layer_bits]
        bits += [b for ov in self.overrides.values() for k, b in ov.items() if k.endswith("_bits")]
        return all(b in (None, FLOAT_BITS) for b in bits)

    def overrides_for(self, name: str) -> list[dict[str, Any]]:
        """The overrides that apply to module ``name``, least specific first."""
        hits = [
            (len(key), ov) for key, ov in self.overrides.items() if name == key or name.startswith(key + ".")
        ]
        return [ov for _, ov in sorted(hits, key=lambda t: t[0])]

    def weight_config(self, name: str = "", *, first: bool = False, last: bool = False) -> dict[str, Any]:
        """``{"bits", "scheme", "sign_grad", "clip"}`` for the Conv2d/Linear called ``name`` (``clip``: the
        ``weight_clip`` ratio of its overrides, 1.0 = the grid spans max|w|)."""
        cfg: dict[str, Any] = {"bits": self.weight_bits, "scheme": self.weight_scheme, "sign_grad": self.sign_grad,
                               "clip": 1.0}
        if first and self.first_layer_bits is not None:
            cfg["bits"] = self.first_layer_bits
        if last and self.last_layer_bits is not None:
            cfg["bits"] = self.last_layer_bits
        for ov in self.overrides_for(name):
            cfg["bits"] = ov.get("weight_bits", cfg["bits"])
            cfg["scheme"] = ov.get("weight_scheme", cfg["scheme"])
            cfg["sign_grad"] = ov.get("sign_grad", cfg["sign_grad"])
            cfg["clip"] = ov.get("weight_clip", cfg["clip"])
        check_weight_combo(cfg["bits"], cfg["scheme"], where=f"layer {name!r}", clip=cfg["clip"])
        return cfg

    def act_config(self, name: str = "") -> dict[str, Any]:
        """``{"bits", "scheme", "clip", "sign_grad"}`` for the activation module called ``name``."""
        cfg: dict[str, Any] = {
            "bits": self.act_bits,
            "scheme": self.act_scheme,
            "clip": self.act_clip,
            "sign_grad": self.sign_grad,
        }
        for ov in self.overrides_for(name):
            cfg["bits"] = ov.get("act_bits", cfg["bits"])
            cfg["scheme"] = ov.get("act_scheme", cfg["scheme"])
            cfg["clip"] = ov.get("act_clip", cfg["clip"])
            cfg["sign_grad"] = ov.get("sign_grad", cfg["sign_grad"])
        check_act_combo(cfg["bits"], cfg["scheme"], where=f"activation {name!r}")
        return cfg

    def add_config(self, name: str = "") -> dict[str, Any]:
        """``{"bits", "scheme", "clip", "sign_grad"}`` for the addition operand called ``name``: ``add_bits``
        with symmetric ``clip`` levels on [−α, α], α = ``act_clip`` — or the ``act_clip`` / ``act_bits`` of an
        override naming this operand exactly (calibration writes its α there); block-level overrides set the
        block's activations, not its additions."""
        cfg: dict[str, Any] = {"bits": self.add_bits, "scheme": "clip", "clip": self.act_clip,
                               "sign_grad": self.sign_grad}
        ov = self.overrides.get(name, {})
        cfg["bits"] = ov.get("act_bits", cfg["bits"])
        cfg["clip"] = ov.get("act_clip", cfg["clip"])
        return cfg


#: the binary network every study and defense means by "1 bit": sign activations with BinaryNet's clipped
#: estimator, 8-bit first and last layers (the spelling ``ste=clipped`` is the persisted one)
BINARY_SPEC = "w1a1,act_scheme=sign,ste=clipped,first_layer_bits=8,last_layer_bits=8"


def spec_for_bits(bits: int) -> str:
    """``"w{b}a{b}"`` for 2–8 bits, :data:`BINARY_SPEC` for 1, ``"float"`` for 32.

    >>> spec_for_bits(4), spec_for_bits(32)
    ('w4a4', 'float')
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits in (1, 32) or 2 <= bits <= 8):
        raise ConfigError(f"bits must be 1 (binary), 2–8 or 32, got {bits!r}")
    if bits == 1:
        return BINARY_SPEC
    return "float" if bits == 32 else f"w{bits}a{bits}"
