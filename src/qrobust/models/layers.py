"""Building blocks shared by every architecture: the input :class:`Normalize` layer and activation modules.

Two rules hold for every qrobust model, and the quantizer and the analysis tools rely on both:

* the first layer is :class:`Normalize`, so the model takes pixels in [0, 1];
* every activation is its own ``nn.ReLU`` / ``nn.ReLU6`` instance (``inplace=False``), made by
  :func:`make_activation` — never ``F.relu``, never one instance called at two places — so that
  ``quantize`` can swap each for its own ``QuantAct`` and a forward hook sees each site exactly once.

>>> import torch
>>> norm = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
>>> norm(torch.full((1, 3, 2, 2), 0.75))[0, :, 0, 0].tolist()
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from qrobust.errors import ConfigError, InputError

ACTIVATIONS = ("relu", "relu6")

#: The mean/std used when the caller supplies none (maps [0, 1] pixels to [-1, 1]).
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


def check_activation(activation: str) -> str:
    """Return ``activation`` if it is one of :data:`ACTIVATIONS`, else raise :class:`ConfigError`."""
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return activation.lower()


def make_activation(activation: str) -> nn.Module:
    """A fresh activation module (``nn.ReLU`` or ``nn.ReLU6``, not in place) for one activation site."""
    activation = check_activation(activation)
    return nn.ReLU(inplace=False) if activation == "relu" else nn.ReLU6(inplace=False)


def per_channel(
    values: float | Sequence[float] | torch.Tensor | None, channels: int, *, what: str, default: float
) -> list[float]:
    """Expand ``values`` (None, a scalar, one value or one per channel) to a list of ``channels`` floats."""
    if values is None:
        return [float(default)] * channels
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    elif hasattr(values, "tolist"):  # numpy arrays and scalars
        values = values.tolist()
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return [float(values)] * channels
    try:
        out = [float(v) for v in values]  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be a number or a sequence of numbers, got {values!r}") from exc
    if len(out) == 1:
        out = out * channels
    if len(out) != channels:
        raise ConfigError(
            f"{what} has {len(out)} entries but the model has {channels} input channels: "
            f"give one value per channel (or a single value for all)"
        )
    return out


def _length(values: object) -> int:
    if isinstance(values, torch.Tensor):
        return values.numel()
    if hasattr(values, "__len__") and not isinstance(values, str):
        return len(values)  # type: ignore[arg-type]
    return 1


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: the first layer of every qrobust model (inputs are pixels in [0, 1]).

    ``mean`` and ``std`` are registered buffers of shape ``(1, C, 1, 1)``, so they travel with the
    state dict, follow ``.to(device)`` and are never trained.
    """

    mean: torch.Tensor
    std: torch.Tensor
    qrobust_fx_leaf = True  # quantize's torch.fx tracing does not look inside (its shape check would stop it)

    def __init__(
        self,
        mean: float | Sequence[float] | torch.Tensor,
        std: float | Sequence[float] | torch.Tensor,
        *,
        num_channels: int | None = None,
    ) -> None:
        super().__init__()
        if num_channels is None:
            num_channels = max(_length(mean), _length(std))
        m = per_channel(mean, num_channels, what="mean", default=DEFAULT_MEAN)
        s = per_channel(std, num_channels, what="std", default=DEFAULT_STD)
        if not all(v > 0 and v == v and v != float("inf") for v in s):
            raise ConfigError(f"std must be finite and > 0 for every channel, got {s}")
        if not all(v == v and abs(v) != float("inf") for v in m):
            raise ConfigError(f"mean must be finite for every channel, got {m}")
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise InputError(
                f"expected a batch of images shaped (N, {self.num_channels}, H, W) with pixels in [0, 1], "
                f"got shape {tuple(x.shape)}; add a batch dimension or fix the channel count"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: "[" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + "]"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with the same outputs and gradients, faster where no gradient flows through it (clean
    evaluation, Square, SPSA) for the 2×2, stride-2 pooling qrobust's models use: on this project's CPUs
    (torch 2.13, x86) ``max_pool2d`` on NCHW tensors costs 8–11× the maximum of the window's four strided
    views (bench/bench_pool.py). Where a gradient is needed, ``nn.MaxPool2d``'s own kernel runs: it routes
    a tie to the window's first maximum, which ``torch.maximum`` would split. Any other configuration, and
    inputs that are not 4-D, take that path too. Export and analysis see an ``nn.MaxPool2d``.

    >>> x = torch.tensor([[[[1., 3., 0., 0.], [2., 3., 0., 5.]]]])
    >>> MaxPool2d(2)(x).tolist()
    [[[[3.0, 5.0]]]]
    """

    qrobust_fx_leaf = True  # traced as one module (qrobust.quant.sites), like nn.MaxPool2d

    def _fast(self) -> bool:
        two = (2, (2, 2))
        return (self.kernel_size in two and self.stride in two and self.padding in (0, (0, 0))
                and self.dilation in (1, (1, 1)) and not self.ceil_mode and not self.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not (torch.is_grad_enabled() and x.requires_grad) and self._fast():
            h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode: an odd last row/column is dropped
            x = x[..., :h, :w]
            return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                                 torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))
        return super().forward(x)
