"""Finding things inside a model: weight layers in order, the first and last of them, activation sites.

qrobust models register their modules in the order ``forward`` calls them, so module order is forward
order; for foreign models pass ``example_input`` and the order is taken from a real (eval-mode,
no-grad) forward pass instead. Quantized replacements (``QuantConv2d``, ``QuantLinear``, ``QuantAct``)
are recognised by class name as well as by type, so these work before and after ``quantize``.
"""

from __future__ import annotations

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.utils import eval_mode

_CONV_SUFFIXES = ("Conv1d", "Conv2d", "Conv3d")


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) or type(m).__name__.endswith(_CONV_SUFFIXES)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__.endswith("Linear")


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost convolution and linear layers, in module (= forward, for qrobust models) order.

    A layer nested inside another matching layer (a wrapper holding an inner ``nn.Conv2d``) is not
    listed separately.
    """
    out: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        if _is_conv(m) or _is_linear(m):
            out.append((name, m))
            taken.append(name)
    return out


def _forward_order(
    model: nn.Module, layers: list[tuple[str, nn.Module]], example_input: torch.Tensor
) -> list[str]:
    calls: list[str] = []
    handles = [
        m.register_forward_pre_hook(
            lambda _m, _a, name=name: calls.append(name) if name not in calls else None
        )
        for name, m in layers
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return calls


def first_and_last_layers(model: nn.Module, *, example_input: torch.Tensor | None = None) -> tuple[str, str]:
    """Names of the first Conv/Linear layer and of the last Linear layer in forward order.

    The quantizer uses these for first/last-layer bit overrides. ``example_input`` (optional) makes
    the order come from an actual forward pass (in eval mode, no grad, modes restored afterwards).
    """
    layers = weight_layers(model)
    if example_input is not None:
        order = _forward_order(model, layers, example_input)
        by_name = dict(layers)
        layers = [(n, by_name[n]) for n in order]
    linears = [n for n, m in layers if _is_linear(m)]
    if not layers or not linears:
        raise ConfigError(
            f"{type(model).__name__} has no {'convolution or linear' if not layers else 'linear'} layer; "
            "first/last-layer settings need a model that ends in nn.Linear"
        )
    return layers[0][0], linears[-1]


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every activation site: ``nn.ReLU``/``nn.ReLU6`` modules (or their ``QuantAct`` replacements)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if n and (isinstance(m, (nn.ReLU, nn.ReLU6)) or type(m).__name__ == "QuantAct")
    ]


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
