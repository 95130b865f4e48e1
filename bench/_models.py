"""What the side-by-side benchmarks share: their models and the reference library (imported by the scripts in
this folder, which Python puts first on the path when one of them runs)."""

from __future__ import annotations

from types import ModuleType

import torch


def torchattacks_or_none() -> ModuleType | None:
    """The reference implementation, or None after saying how to install it (without its dependencies)."""
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed (pip install --no-deps -c constraints.txt torchattacks)")
        return None
    return torchattacks


def digits_w4a4() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The reference comparisons' model and data: a digits_cnn trained 10 epochs, fine-tuned w4a4 for 3 (seed 0),
    in eval mode, with the whole digits test set ``(x, y)``."""
    import qrobust
    from qrobust.data import load_dataset
    from qrobust.models import build_model
    from qrobust.training import fit

    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std)
    fit(m, train, epochs=10, lr=0.05)
    q = qrobust.quantize(m, "w4a4")
    fit(q, train, epochs=3, lr=0.01)
    q.eval()
    x, y = test.tensors()
    return q, x, y
