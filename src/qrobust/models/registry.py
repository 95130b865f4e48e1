"""The model registry: ``build_model(name, ...)`` and ``available_models()``.

Every model built here records how to rebuild it in ``model.qrobust_arch`` — a JSON-serialisable
``{"name": ..., "kwargs": {...}}`` that names every argument (defaults included, mean/std as lists of
floats), so a checkpoint can be turned back into the same architecture::

    >>> m = build_model("digits_cnn", in_channels=1, input_size=8)
    >>> m.qrobust_arch["kwargs"]["mean"]
    [0.5]
    >>> twin = build_model(m.qrobust_arch["name"], **m.qrobust_arch["kwargs"])
    >>> [k for k in twin.state_dict()] == [k for k in m.state_dict()]
    True

``build_model(**m.qrobust_arch)`` works as well (the ``kwargs`` mapping is merged in).

Names: ``small_cnn``, ``digits_cnn``, ``resnet20``/``resnet56`` (any ``resnet<6n+2>``),
``preact_resnet18``, ``wrn-D-K`` (e.g. ``wrn-28-10``; D = 6n+4) and ``vgg16``.

Your own architecture joins with :func:`register_model` (its builder gets the common arguments it accepts
and its declared options). The record of a model built from it names the builder's module
(``qrobust_arch["module"]``), so another process — the CLI loading a checkpoint — imports that module
(which registers the name again) before building. A package can instead declare an entry point in the
group ``qrobust.models`` (``mynet = "mypkg.nets:build_mynet"``: the builder, whose keyword parameters with
plain defaults become its options; or a module that registers on import); an unknown name is looked up
there. Only installed modules are imported, never code from a
checkpoint. Builders defined in ``__main__`` (a script) are not importable elsewhere: load their
checkpoints with ``load(path, model=skeleton)`` or register them in a module.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.models.cnn import DigitsCNN, SmallCNN
from qrobust.models.layers import DEFAULT_MEAN, DEFAULT_STD, check_activation, per_channel
from qrobust.models.resnet import SHORTCUTS, CifarResNet, PreActResNet
from qrobust.models.vgg import VGG, VGG16_BLOCKS
from qrobust.models.wide_resnet import WideResNet

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    ``builder`` is called with the common arguments (``num_classes``, ``in_channels``, ``input_size``,
    ``activation``, ``mean``, ``std``), the integers captured by ``pattern``'s named groups, and the
    architecture's own ``options`` (name → default; the default's type is the option's type).
    """

    name: str
    builder: Builder
    summary: str
    options: Mapping[str, Any] = field(default_factory=dict)
    min_input_size: int = 4
    pattern: re.Pattern[str] | None = None
    listed_as: tuple[str, ...] = ()
    example: str = ""
    module: str | None = None  # the module to import in another process (None: built in, or __main__)


_REGISTRY: list[ModelEntry] = []
ENTRY_POINT_GROUP = "qrobust.models"
_COMMON = ("num_classes", "in_channels", "input_size", "activation", "mean", "std")


def register_model(
    name: str,
    builder: Builder,
    *,
    summary: str = "",
    options: Mapping[str, Any] | None = None,
    min_input_size: int = 4,
    pattern: str | None = None,
    listed_as: Sequence[str] = (),
    example: str = "",
) -> ModelEntry:
    """Add an architecture to the registry (``pattern``: a regex with named integer groups, e.g. depth).

    ``builder(**arguments)`` returns the float model; it receives those of the common arguments
    (``num_classes``, ``in_channels``, ``input_size``, ``activation``, ``mean``, ``std``) its signature
    accepts (all of them with ``**kwargs``), the pattern's integers and ``options`` (name → default, the
    default's type being the option's type). Registering the same builder again under its name is a no-op
    (a module imported twice); another builder under a taken name is a ConfigError. In a module
    ``mypkg/nets.py``::

        def build_mynet(*, num_classes, in_channels, width=16):
            return MyNet(num_classes=num_classes, in_channels=in_channels, width=width)

        register_model("mynet", build_mynet, options={"width": 16}, summary="my own CNN")

    ``build_model("mynet", num_classes=10, in_channels=1, width=32)`` then builds it, and its checkpoints
    load from the path alone wherever ``mypkg`` imports.
    """
    if not isinstance(name, str) or not name.strip() or not callable(builder):
        raise ConfigError(f"register_model needs a name and a callable builder, got {name!r}, {builder!r}")
    same = [e for e in _REGISTRY if e.name == name]
    if same:
        old = same[0].builder
        if getattr(old, "__qualname__", None) == getattr(builder, "__qualname__", None) and getattr(
            old, "__module__", None
        ) == getattr(builder, "__module__", None):
            return same[0]
        raise ConfigError(f"a model named {name!r} is already registered")
    module = getattr(builder, "__module__", None)
    if module == "__main__" or (module or "").startswith("qrobust."):
        module = None
    entry = ModelEntry(
        name=name,
        builder=builder,
        summary=summary,
        options=dict(options or {}),
        min_input_size=min_input_size,
        pattern=re.compile(pattern) if pattern else None,
        listed_as=tuple(listed_as) or (name,),
        example=example or name,
        module=module,
    )
    _REGISTRY.append(entry)
    return entry


def _from_entry_points(key: str) -> bool:
    """Register ``key`` from an installed package's ``qrobust.models`` entry point; True if it now is."""
    try:
        points = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name.lower() == key]
    except Exception:  # noqa: BLE001 - broken package metadata must not break build_model
        return False
    for ep in points:
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - said to the user
            raise ConfigError(
                f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) does not import: {e}"
            ) from e
        if not any(e.name == ep.name for e in _REGISTRY) and callable(obj) and not inspect.ismodule(obj):
            register_model(ep.name, obj, summary=f"from entry point {ep.value}", options=_default_options(obj))
    return any(e.name.lower() == key for e in _REGISTRY)


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`; ``wrn-D-K`` stands for any Wide-ResNet (e.g. ``wrn-28-10``)."""
    return [n for e in _REGISTRY for n in e.listed_as]


def _resolve(name: str) -> tuple[ModelEntry, str, dict[str, int]]:
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, one of {available_models()}, got {name!r}")
    key = name.strip().lower()
    if not any(e.name.lower() == key for e in _REGISTRY) and not any(
        e.pattern is not None and e.pattern.fullmatch(key) for e in _REGISTRY
    ):
        _from_entry_points(key)
    for e in _REGISTRY:
        if e.pattern is None:
            if key == e.name.lower():
                return e, e.name, {}
            continue
        if key == e.name.lower():
            raise ConfigError(f"{e.name!r} names a family ({e.summary}); put numbers in, e.g. {e.example!r}")
        m = e.pattern.fullmatch(key)
        if m:
            groups = {k: int(v) for k, v in m.groupdict().items()}
            return e, _canonical_name(e, groups), groups
    close = difflib.get_close_matches(key, available_models(), n=2, cutoff=0.5)
    hint = f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown model {name!r}{hint}; available models: {available_models()}")


def _canonical_name(entry: ModelEntry, groups: Mapping[str, int]) -> str:
    """The name with the pattern's integers written plainly (``wrn-028-10`` → ``wrn-28-10``)."""
    assert entry.pattern is not None
    out = entry.pattern.pattern
    for key, value in groups.items():
        out = re.sub(rf"\(\?P<{key}>[^)]*\)", str(value), out)
    return out


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise ConfigError(f"{what} must be an integer ≥ {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ConfigError(f"{what} must be ≥ {minimum}, got {value}")
    return value


def _coerce_option(model: str, key: str, value: Any, default: Any) -> Any:
    """Give ``value`` the type of ``default`` (the JSON-friendly one) or raise ConfigError."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(default, int):
            return _check_int(value, f"{model} option {key!r}", 0)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(default, (list, tuple)):
            return [type(d)(v) for d, v in zip(default, value, strict=True)]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{model} option {key!r} must be like {default!r} ({type(default).__name__}), got {value!r}"
        ) from exc
    return value


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    activation: str = "relu",
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **kw: Any,
) -> nn.Module:
    """Build a registered architecture for ``in_channels``×``input_size``² pixel inputs in [0, 1].

    ``mean``/``std`` configure the :class:`~qrobust.models.layers.Normalize` first layer: one value per
    channel, or one for all; ``None`` means 0.5 (pixels mapped to [-1, 1]) — pass the dataset's
    statistics (``qrobust.data.dataset_info(name).mean``) for the usual normalisation. ``activation``
    is ``"relu"`` or ``"relu6"``. Architecture options go in ``**kw``: ``dropout`` (small_cnn, wrn),
    ``shortcut`` ("A" zero-padding, the default, or "B" 1×1 projection; CIFAR ResNets).
    ``kwargs`` — a mapping such as ``model.qrobust_arch["kwargs"]`` — is merged in and takes precedence,
    so ``build_model(**model.qrobust_arch)`` rebuilds ``model``'s architecture.

    Raises :class:`ConfigError` for an unknown name, activation or option, or an input size the
    architecture cannot take.
    """
    args: dict[str, Any] = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
        "activation": activation,
        "mean": mean,
        "std": std,
        **kw,
    }
    if kwargs is not None:
        if not isinstance(kwargs, Mapping):
            raise ConfigError(
                f"kwargs must be a mapping of build_model arguments, got {type(kwargs).__name__}"
            )
        args.update(kwargs)
    entry, canonical, groups = _resolve(name)

    num_classes = _check_int(args.pop("num_classes"), "num_classes", 1)
    in_channels = _check_int(args.pop("in_channels"), "in_channels", 1)
    input_size = args.pop("input_size")
    if isinstance(input_size, (list, tuple)) and len(input_size) == 2 and input_size[0] == input_size[1]:
        input_size = input_size[0]
    input_size = _check_int(input_size, "input_size", 1)
    if input_size < entry.min_input_size:
        raise ConfigError(
            f"{canonical} needs inputs of at least {entry.min_input_size}×{entry.min_input_size} pixels, "
            f"got input_size={input_size}; pick a model for small images (e.g. 'digits_cnn' for 8×8, "
            f"'small_cnn' or a ResNet for 28×28)"
        )
    activation = check_activation(args.pop("activation"))
    mean_l = per_channel(args.pop("mean"), in_channels, what="mean", default=DEFAULT_MEAN)
    std_l = per_channel(args.pop("std"), in_channels, what="std", default=DEFAULT_STD)

    unknown = sorted(set(args) - set(entry.options))
    if unknown:
        valid = sorted(entry.options) or "none"
        raise ConfigError(f"{canonical} got unknown option(s) {unknown}; its own options are: {valid}")
    options = {k: _coerce_option(canonical, k, args.get(k, d), d) for k, d in entry.options.items()}

    common = dict(zip(_COMMON, (num_classes, in_channels, input_size, activation, mean_l, std_l)))
    model = entry.builder(**_accepted(entry.builder, common), **groups, **options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the builder of {canonical!r} returned {type(model).__name__}, not an nn.Module")
    arch = {
        "name": canonical,
        "kwargs": {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
            "activation": activation,
            "mean": mean_l,
            "std": std_l,
            **options,
        },
    }
    if entry.module is not None:
        arch["module"] = entry.module
    model.qrobust_arch = json.loads(json.dumps(arch))  # a plain, JSON-clean copy
    return model


def _default_options(builder: Builder) -> dict[str, Any]:
    """An entry-point builder's options: its keyword parameters with plain defaults, common ones aside."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.name not in _COMMON and isinstance(p.default, (bool, int, float, str)) and p.default is not p.empty
    }


def _accepted(builder: Builder, common: dict[str, Any]) -> dict[str, Any]:
    """The common arguments ``builder``'s signature takes (all of them with ``**kwargs``)."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return common
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return common
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in common.items() if k in names}


def build_from_arch(arch: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from a ``qrobust_arch`` record (e.g. read from checkpoint metadata)."""
    if not isinstance(arch, Mapping) or "name" not in arch or not isinstance(arch.get("kwargs", {}), Mapping):
        raise ConfigError(f"an architecture record is {{'name': str, 'kwargs': dict}}, got {arch!r}")
    module = arch.get("module")
    if isinstance(module, str) and not any(e.name.lower() == str(arch["name"]).lower() for e in _REGISTRY):
        try:
            importlib.import_module(module)  # registers the name (an installed module, never checkpoint code)
        except ImportError as e:
            raise ConfigError(
                f"model {arch['name']!r} is registered by module {module!r}, which does not import here ({e}): "
                "install or put it on PYTHONPATH, or load with qrobust.load(path, model=skeleton)"
            ) from e
    return build_model(arch["name"], kwargs=arch.get("kwargs", {}))


# ---------------------------------------------------------------------------------------------------------
# The built-in architectures.


def _small_cnn(*, input_size: int, dropout: float, **common: Any) -> nn.Module:
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    return SmallCNN(input_size=input_size, dropout=dropout, **common)


def _digits_cnn(*, input_size: int, **common: Any) -> nn.Module:
    return DigitsCNN(input_size=input_size, **common)


def _resnet(*, input_size: int, depth: int, shortcut: str, **common: Any) -> nn.Module:
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            f"resnet{depth}: CIFAR ResNets have depth 6n+2 (resnet20, resnet32, resnet44, resnet56, "
            "resnet110); for a ResNet-18 use 'preact_resnet18'"
        )
    if shortcut not in SHORTCUTS:
        raise ConfigError(
            f"shortcut must be one of {list(SHORTCUTS)} (A: zero-padding, B: 1×1 conv), got {shortcut!r}"
        )
    return CifarResNet(depth=depth, shortcut=shortcut, **common)


def _preact_resnet18(*, input_size: int, **common: Any) -> nn.Module:
    return PreActResNet(blocks=(2, 2, 2, 2), **common)


def _wrn(*, input_size: int, depth: int, width: int, dropout: float, **common: Any) -> nn.Module:
    return WideResNet(depth=depth, width=width, dropout=dropout, **common)


def _vgg16(*, input_size: int, **common: Any) -> nn.Module:
    return VGG(blocks=VGG16_BLOCKS, **common)


register_model(
    "small_cnn", _small_cnn, summary="2 conv (32/64) + 2 fc for 28×28 digits", options={"dropout": 0.0},
    min_input_size=4,
)  # fmt: skip
register_model("digits_cnn", _digits_cnn, summary="2 conv (16/32) + 2 fc for 8×8 digits", min_input_size=2)
register_model(
    "resnetN", _resnet, summary="CIFAR ResNet-(6n+2), 16/32/64 channels", options={"shortcut": "A"},
    pattern=r"resnet(?P<depth>\d+)", listed_as=("resnet20", "resnet32", "resnet44", "resnet56", "resnet110"),
    example="resnet20",
)  # fmt: skip
register_model("preact_resnet18", _preact_resnet18, summary="PreAct ResNet-18, 64–512 channels")
register_model(
    "wrn-D-K", _wrn, summary="Wide-ResNet, depth D = 6n+4, widening factor K", options={"dropout": 0.0},
    pattern=r"wrn-(?P<depth>\d+)-(?P<width>\d+)", example="wrn-28-10",
)  # fmt: skip
register_model("vgg16", _vgg16, summary="VGG-16 with BN for 32×32", min_input_size=32)
