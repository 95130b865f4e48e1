"""Architectures behind a name registry; every model takes pixels in [0, 1] and normalizes as its first layer.

>>> from qrobust.models import build_model, first_and_last_layers
>>> model = build_model("resnet20", num_classes=10, in_channels=3, input_size=32)
>>> first_and_last_layers(model)
('conv1', 'fc')
"""

from qrobust.models.cnn import DigitsCNN, SmallCNN
from qrobust.models.introspect import (
    activation_modules,
    count_parameters,
    first_and_last_layers,
    weight_layers,
)
from qrobust.models.layers import ACTIVATIONS, Normalize, make_activation
from qrobust.models.registry import ModelEntry, available_models, build_from_arch, build_model, register_model
from qrobust.models.resnet import BasicBlock, CifarResNet, PreActBlock, PreActResNet
from qrobust.models.vgg import VGG
from qrobust.models.wide_resnet import WideBlock, WideResNet

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "CifarResNet",
    "DigitsCNN",
    "ModelEntry",
    "Normalize",
    "PreActBlock",
    "PreActResNet",
    "SmallCNN",
    "VGG",
    "WideBlock",
    "WideResNet",
    "activation_modules",
    "available_models",
    "build_from_arch",
    "build_model",
    "count_parameters",
    "first_and_last_layers",
    "make_activation",
    "register_model",
    "weight_layers",
]
