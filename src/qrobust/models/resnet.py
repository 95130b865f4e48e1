"""Residual networks: the CIFAR ResNets of He et al. (2016) and PreAct-ResNet-18 (He et al., ECCV 2016).

``CifarResNet`` (``resnet20``, ``resnet56``, any depth 6n+2): a 3×3 stem with 16 channels, three stages of
n basic blocks with 16/32/64 channels (stride 2 at the start of stages 2 and 3), global average pooling
and one linear layer. Basic block, post-activation::

    out = act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x))

The shortcut where the shape changes is, by default, option **A** of the paper — stride-2 subsampling
and zero-padding of the new channels, parameter-free — which gives the published parameter counts
(0.27 M for ResNet-20, 0.85 M for ResNet-56). ``shortcut="B"`` uses a 1×1 convolution + BN projection.

``PreActResNet18``: 64/128/256/512 channels, two pre-activation blocks per stage (the variant used by
most adversarial-training work)::

    a = act1(bn1(x));  out = conv2(act2(bn2(conv1(a)))) + shortcut(a or x)

followed by a final BN + activation before pooling. Every activation is its own module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.models.layers import Normalize, make_activation

SHORTCUTS = ("A", "B")


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions, BN at γ = 1, β = 0; linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad ``out_channels - in_channels`` channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels
        if self.extra < 0:
            raise ConfigError("option-A shortcut cannot reduce the channel count; use shortcut='B'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            lo = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.extra}"


class BasicBlock(nn.Module):
    """Post-activation basic block; the activation after the addition is a module (``act2``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        activation: str = "relu",
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, section 4.2): 16/32/64 channels, n blocks per stage."""

    def __init__(
        self,
        *,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        shortcut: str = "A",
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(
                f"CIFAR ResNet depth must be 6n+2 with n ≥ 1 (20, 32, 44, 56, 110 …), got {depth}"
            )
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"shortcut must be one of {list(SHORTCUTS)}, got {shortcut!r}")
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std, num_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = make_activation(activation)
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, w, stride=stride, activation=activation, shortcut=shortcut))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class PreActBlock(nn.Module):
    """Pre-activation basic block; a 1×1 projection (where the shape changes) reads the activated input."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.projects = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if self.projects
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(a))))
        return out + self.shortcut(a if self.projects else x)


class PreActResNet(nn.Module):
    """Pre-activation ResNet (ResNet-18 layout by default: 2-2-2-2 blocks, 64/128/256/512 channels)."""

    def __init__(
        self,
        *,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, num_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(PreActBlock(cin, w, stride=stride, activation=activation))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.act(self.bn(x))
        return self.fc(self.pool(x).flatten(1))
