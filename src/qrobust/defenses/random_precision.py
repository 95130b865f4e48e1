"""One network at several precisions, drawn at random per forward pass (Double-Win Quant's random-precision
inference, Fu et al., ICML 2021), and how to train and attack it honestly.

:class:`RandomPrecision` ``(model, bits=(8, 4, 2))`` builds one quantized copy of ``model`` per bit-width
(``wBaB``; 1 = binary) whose convolution and linear weights are the *same* parameters — one network — while
each precision keeps its own BatchNorm layers (their statistics differ per precision) and its own activation
quantizers. Every forward pass draws a precision (a seeded generator of its own; the global RNG is untouched)
unless :meth:`RandomPrecision.fixed` pins one. :class:`RandomPrecisionTraining` wraps any objective so that
each training step draws one precision and keeps it for the whole step (crafting included):
random-precision training.

A randomized prediction is itself random, so its robustness has to be attacked in expectation:

* the *naive* evaluation (the paper's) attacks one random draw and predicts with another — just
  ``evaluate(rp, ...)``, each attack step seeing a fresh precision;
* the *adaptive* evaluation attacks the expectation: gradients averaged over draws (``eot_samples``), or,
  exactly, the averaged softmax over all precisions (:meth:`RandomPrecision.as_ensemble`, a differentiable
  surrogate), and scores the worst case over repeated predictions.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from qrobust.defenses.ensemble import Ensemble
from qrobust.defenses.objectives import Objective, as_objective, make_objective, split_output
from qrobust.errors import ConfigError
from qrobust.models.introspect import weight_layers
from qrobust.quant import quantize
from qrobust.quant.spec import spec_for_bits

__all__ = ["RandomPrecision", "RandomPrecisionTraining"]

class RandomPrecision(nn.Module):
    """``model`` at each of ``bits``, sharing its weights, one precision drawn per forward (module docstring)."""

    def __init__(self, model: nn.Module, *, bits: Sequence[int] = (8, 4, 2), seed: int = 0) -> None:
        super().__init__()
        bits = list(dict.fromkeys(bits))
        if len(bits) < 2:
            raise ConfigError(f"RandomPrecision needs at least two bit-widths, got {bits}")
        if any(b == 32 or isinstance(b, bool) or not isinstance(b, int) for b in bits):
            raise ConfigError(f"RandomPrecision bits must be integers 1–8 (each a quantized precision), got {bits}")
        specs = [spec_for_bits(b) for b in bits]
        if any(type(m).__name__.startswith("Quant") for m in model.modules()):
            raise ConfigError("RandomPrecision takes the float model; it quantizes one copy per precision")
        self.bits = bits
        self.copies = nn.ModuleList([quantize(copy.deepcopy(model), s) for s in specs])
        # one network: every copy computes with the first copy's conv/linear parameters
        master = dict(weight_layers(self.copies[0]))
        for c in self.copies[1:]:
            for name, layer in weight_layers(c):
                layer.weight = master[name].weight
                if layer.bias is not None:
                    layer.bias = master[name].bias
        self.generator = torch.Generator().manual_seed(seed)
        self._fixed: int | None = None
        #: the precision the last forward pass used
        self.last_bits: int | None = None

    def qrobust_composite(self) -> dict[str, Any] | None:
        """What :func:`qrobust.save` records so that :func:`qrobust.load` rebuilds the network from the path
        alone: the float architecture and the bit-widths (``None`` for a model of one's own)."""
        arch = getattr(self.copies[0], "qrobust_arch", None)
        if arch is None:
            return None
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "bits": list(self.bits),
                "base": {"arch": arch, "spec": None}}

    @classmethod
    def from_composite(cls, record: dict[str, Any], build: Any) -> RandomPrecision:
        """The network a :meth:`qrobust_composite` record describes (float base rebuilt by ``build(meta)``)."""
        return cls(build(record["base"]), bits=record["bits"])

    def draw(self) -> int:
        """A bit-width drawn uniformly from :attr:`bits` (the module's own generator)."""
        return self.bits[int(torch.randint(len(self.bits), (1,), generator=self.generator))]

    @contextlib.contextmanager
    def fixed(self, bits: int) -> Iterator[RandomPrecision]:
        """Within the block every forward pass runs at ``bits``."""
        if bits not in self.bits:
            raise ConfigError(f"{bits} is not one of this network's precisions {self.bits}")
        old, self._fixed = self._fixed, bits
        try:
            yield self
        finally:
            self._fixed = old

    def at(self, bits: int) -> nn.Module:
        """The network at ``bits`` (shares the weights)."""
        if bits not in self.bits:
            raise ConfigError(f"{bits} is not one of this network's precisions {self.bits}")
        return self.copies[self.bits.index(bits)]

    def as_ensemble(self) -> Ensemble:
        """The expectation over precisions as one differentiable model: the averaged softmax of every
        precision — the surrogate an adaptive attacker uses."""
        return Ensemble({f"{b}-bit": c for b, c in zip(self.bits, self.copies)}, combine="probs")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._fixed if self._fixed is not None else self.draw()
        self.last_bits = b
        return self.copies[self.bits.index(b)](x)


class RandomPrecisionTraining(Objective):
    """Random-precision training: ``base`` (any objective) with one precision drawn per step and kept for the
    whole step, crafting included; the hooks are ``base``'s own."""

    def __init__(self, base: Any = "ce") -> None:
        self.base = make_objective(base) if isinstance(base, str) else as_objective(base)
        self.name = f"random-precision({getattr(self.base, 'name', 'objective')})"
        for hook in self.HOOKS:
            setattr(self, hook, getattr(self.base, hook))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if not isinstance(model, RandomPrecision):
            raise ConfigError(f"RandomPrecisionTraining trains a RandomPrecision network, got {type(model).__name__}")
        with model.fixed(model.draw()):
            return split_output(self.base(model, x, y))

    def config(self) -> dict[str, Any]:
        base = self.base.config() if hasattr(self.base, "config") else {"name": getattr(self.base, "name", "?")}
        return {"name": self.name, "base": base}
