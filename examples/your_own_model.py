"""Bring your own model: a plain-PyTorch network through qrobust, end to end, in a few seconds on digits.

The network below is written the way people write networks — BatchNorm, an in-place ReLU module used twice,
max pooling, a residual add and a functional relu — with no qrobust in it except the first layer,
``Normalize``, which lets it take pixels in [0, 1] like every qrobust model. The script trains it briefly
in float, quantizes it to w4a4 (each activation's range calibrated from training images), fine-tunes it
with ``fit``, saves it, loads it back into a fresh skeleton of its class and evaluates it under PGD.

    python examples/your_own_model.py [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qrobust
from qrobust.data import dataset_info
from qrobust.models import Normalize


class DigitsResNet(nn.Module):
    """conv → BN → ReLU, a residual block (its ReLU module used twice, a functional relu), pool, classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        info = dataset_info("digits")
        self.normalize = Normalize(info.mean, info.std)  # pixels in [0, 1] in, normalized inside
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(self.normalize(x))))
        y = self.relu(self.bn1(self.conv1(x)))  # the same nn.ReLU, a second time
        x = F.relu(x + self.bn2(self.conv2(y)))  # residual add, then a functional relu
        return self.fc(self.pool(x).flatten(1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="qrobust-own-model-"))

    train, test = qrobust.load_dataset("digits", "train"), qrobust.load_dataset("digits", "test")
    fast = dict(batch_size=64, eval_batch_size=512, augment=False)

    # 1. float training, plain qrobust.fit on a plain nn.Module
    model = DigitsResNet()
    qrobust.fit(model, train, epochs=3, optimizer="adamw", lr=3e-3, weight_decay=0.0, **fast)
    float_acc = qrobust.accuracy(model, test)

    # 2. quantize: every activation site (the shared ReLU's two uses and F.relu included) gets a 4-bit
    #    quantizer whose range is calibrated from 512 training images
    qmodel = qrobust.quantize(model, "w4a4", calibrate=train.subset(512, seed=0))
    print(qrobust.quant.format_description(qrobust.describe(qmodel)))

    # 3. quantization-aware fine-tuning; fit checks that the model can be saved before it trains
    qrobust.fit(qmodel, train, epochs=2, optimizer="adamw", lr=1e-3, weight_decay=0.0, out=out / "w4a4", **fast)

    # 4. load back into a fresh skeleton of the class: quantized to the saved spec, then the weights
    loaded = qrobust.load(out / "w4a4", model=DigitsResNet())
    x, y = test.tensors()
    assert torch.equal(loaded(x), qmodel.eval()(x)), "the loaded model computes what was saved"

    # 5. evaluate: clean accuracy and PGD at ε = 0.1 (straight-through gradients through the quantizers)
    report = qrobust.evaluate(loaded, test, suite=["pgd"], eps=0.1, n=200)
    result = {
        "float_acc": float_acc,
        "w4a4_acc": qrobust.accuracy(loaded, test),
        "w4a4_pgd_acc": report.robust_accuracy,
    }
    print(
        f"float {result['float_acc']:.3f} | w4a4 {result['w4a4_acc']:.3f} | "
        f"w4a4 under PGD (ε=0.1) {result['w4a4_pgd_acc']:.3f} | checkpoint {out / 'w4a4' / 'final.safetensors'}"
    )
    return result


if __name__ == "__main__":
    main()
