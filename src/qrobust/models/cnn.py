"""Small CNNs for digit datasets: ``small_cnn`` (28×28 MNIST-like) and ``digits_cnn`` (8×8 sklearn digits).

Both adapt their first fully connected layer to ``input_size`` (the flattened size is computed, not
hard-coded), so they accept any square input at least as large as their pooling allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qrobust.models.layers import MaxPool2d, Normalize, make_activation


class SmallCNN(nn.Module):
    """conv3×3(32) → act → maxpool → conv3×3(64) → act → maxpool → fc(128) → act → [dropout] → fc.

    About 0.42 M parameters at 28×28; reaches ≥ 98.5 % MNIST test accuracy within 3 epochs of SGD/Adam.
    Pooling after each convolution keeps it cheap enough to train at thousands of images per second on
    a couple of CPU cores.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        activation: str = "relu",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.normalize = Normalize(mean, std, num_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.act1 = make_activation(activation)
        self.pool1 = MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.act2 = make_activation(activation)
        self.pool2 = MaxPool2d(2)
        side = input_size // 2 // 2
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.act3 = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = self.dropout(self.act3(self.fc1(x.flatten(1))))
        return self.fc2(x)


class DigitsCNN(nn.Module):
    """conv3×3(16) → act → conv3×3(32) → act → maxpool → fc(64) → act → fc, for 8×8 inputs (~36 k params)."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 8,
        activation: str = "relu",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.normalize = Normalize(mean, std, num_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.act2 = make_activation(activation)
        self.pool = MaxPool2d(2)
        side = input_size // 2
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.act3 = make_activation(activation)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        x = self.act3(self.fc1(self.pool(x).flatten(1)))
        return self.fc2(x)
