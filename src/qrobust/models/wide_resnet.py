"""Wide ResNets (Zagoruyko & Komodakis, 2016): ``wrn-D-K`` with depth D = 6n+4 and widening factor K.

A 3×3 stem with 16 channels, three stages of n pre-activation blocks with 16K/32K/64K channels (stride 2
at the start of stages 2 and 3), a final BN + activation, global average pooling and one linear layer::

    a = act1(bn1(x));  out = conv2(dropout(act2(bn2(conv1(a))))) + shortcut(a or x)

``wrn-28-10`` has 36.5 M parameters, ``wrn-16-4`` 2.75 M, ``wrn-34-10`` 46.2 M.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.models.layers import Normalize, make_activation
from qrobust.models.resnet import init_weights


class WideBlock(nn.Module):
    """Pre-activation wide block with optional dropout between the two convolutions."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.projects = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if self.projects
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(x))
        out = self.conv2(self.dropout(self.act2(self.bn2(self.conv1(a)))))
        return out + self.shortcut(a if self.projects else x)


class WideResNet(nn.Module):
    """WRN-depth-width; ``depth`` must satisfy (depth − 4) % 6 == 0."""

    def __init__(
        self,
        *,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(
                f"Wide-ResNet depth must be 6n+4 with n ≥ 1 (10, 16, 22, 28, 34, 40 …), got {depth}"
            )
        if width < 1:
            raise ConfigError(f"Wide-ResNet width (widening factor) must be ≥ 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.normalize = Normalize(mean, std, num_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        stages = []
        cin = 16
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBlock(cin, w, stride=stride, activation=activation, dropout=dropout))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.act(self.bn(x))
        return self.fc(self.pool(x).flatten(1))
