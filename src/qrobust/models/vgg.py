"""VGG-16 with batch normalization for 32×32 inputs (the CIFAR variant: 13 convolutions, one linear layer).

Five 2×2 max-pools take a 32×32 image to 1×1×512; an adaptive average pool makes larger inputs work
too, and a single ``Linear(512, num_classes)`` classifies (14.7 M parameters). Modules are named after
their position: ``features.conv3_2`` is the second convolution of the third block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from qrobust.models.layers import MaxPool2d, Normalize, make_activation
from qrobust.models.resnet import init_weights

#: Channels per convolution, one list per block (each block ends with a 2×2 max-pool).
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGG(nn.Module):
    """conv-BN-act blocks separated by max-pools, global average pool, one linear layer."""

    def __init__(
        self,
        *,
        blocks: Sequence[Sequence[int]] = VGG16_BLOCKS,
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, num_channels=in_channels)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for b, widths in enumerate(blocks, start=1):
            for i, w in enumerate(widths, start=1):
                layers[f"conv{b}_{i}"] = nn.Conv2d(cin, w, 3, padding=1, bias=False)
                layers[f"bn{b}_{i}"] = nn.BatchNorm2d(w)
                layers[f"act{b}_{i}"] = make_activation(activation)
                cin = w
            layers[f"pool{b}"] = MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.fc(self.pool(x).flatten(1))
