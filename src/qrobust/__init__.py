"""qrobust: build and verify adversarially robust quantized neural networks.

The public API on one screen::

    load_dataset(name, split)            data      → ArrayDataset of [0, 1] pixels
    build_model(name, ...)               models    → nn.Module with normalization as its first layer
    register_model(name, builder)        models    → your architecture by name (CLI, load from the path)
    quantize(model, "w4a4", calibrate=)  quant     → QAT model (straight-through estimators), any nn.Module
    fit(model, data, objective=...)      training  → trained model, run folder, metrics.jsonl
    save(model, path) / load(path)       checkpoint→ safetensors + JSON metadata, never pickle;
    load(path, model=skeleton)                       your own class back, quantized to the saved spec
    PGD(model, eps=...)(x, y)            attacks   → adversarial examples (ste/bpda/native/surrogate gradients);
                                                     FGSM, PGD, APGD, APGDT, Square, SPSA, … at the top too
    evaluate(model, data, suite=...)     evaluation→ RobustnessReport: per-sample worst case + diagnostics
"""

from qrobust._version import __version__  # noqa: E402
from qrobust.attacks import (  # noqa: E402
    APGD,
    APGDT,
    BIM,
    CW,
    DIVA,
    FGSM,
    MIFGSM,
    PGD,
    PGDL2,
    RFGSM,
    SPSA,
    Attack,
    CWLinf,
    External,
    PGDpp,
    Square,
    Transfer,
)
from qrobust.checkpoint import load, save  # noqa: E402
from qrobust.data import load_dataset  # noqa: E402
from qrobust.errors import CheckpointError, ConfigError, DataError, InputError, QrobustError
from qrobust.evaluation import RobustnessReport, evaluate
from qrobust.models import build_model, register_model  # noqa: E402
from qrobust.quant import QuantSpec, describe, quantize  # noqa: E402
from qrobust.training import FitConfig, accuracy, fit  # noqa: E402

__all__ = [
    "APGD",
    "APGDT",
    "Attack",
    "BIM",
    "CW",
    "CWLinf",
    "DIVA",
    "External",
    "FGSM",
    "MIFGSM",
    "PGD",
    "PGDL2",
    "PGDpp",
    "RFGSM",
    "SPSA",
    "Square",
    "Transfer",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FitConfig",
    "InputError",
    "QrobustError",
    "QuantSpec",
    "RobustnessReport",
    "__version__",
    "accuracy",
    "build_model",
    "describe",
    "evaluate",
    "fit",
    "load",
    "load_dataset",
    "quantize",
    "register_model",
    "save",
]
