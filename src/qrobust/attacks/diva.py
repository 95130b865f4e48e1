"""DIVA (Hong et al., MLSys 2022): attack the gap between a model and its deployed, quantized version.

The attacker maximises the *disagreement* between a float ``reference`` (the parent, or the fake-quant twin
with its quantizers disabled) and the deployed model — keep the reference's probability of the true class
high while pushing the deployed model's down::

    loss(x') = p_ref(y | x') − c · p_twin(y | x')          (ascended by signed-gradient steps, L∞ ε-ball)

The deployed model (``model``: an ONNX graph run by onnxruntime, or any model) is never differentiated: the
gradient of its term is taken on its differentiable ``twin`` (the fake-quant model it was exported from) in
the quantizers' attack gradient mode (``gradients="ste"`` by default, :func:`qrobust.quant.attack_mode`), and
success — the deployed model wrong — is judged on ``model`` itself after every step (early stopping). So
the attack is black-box with respect to ``model``, which its class facts say.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
>>> atk = DIVA(net, twin=net, eps=0.1, steps=3)
>>> x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
>>> bool(((atk(x, y) - x).abs() <= 0.1).all())
True
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.base import Attack
from qrobust.errors import ConfigError
from qrobust.quant.modes import attack_mode, gradient_mode, quantization_disabled
from qrobust.utils import eval_mode
from qrobust.validation import check_choice, check_int, check_positive

__all__ = ["DIVA"]


class DIVA(Attack):
    """Maximise ``p_reference(y) − c · p_twin(y)`` on the twin; judged on ``model`` (the deployed graph)."""

    name = "diva"
    black_box = True
    single_step = False
    supports_targeted = False
    diagnostic_role = None
    steps_in_label = True

    def __init__(
        self,
        model: nn.Module,
        *,
        twin: nn.Module,
        reference: nn.Module | None = None,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 20,
        c: float = 1.0,
        gradients: str = "ste",
        random_start: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("targeted", False) is not False:
            raise ConfigError("DIVA is untargeted: it maximises the disagreement on the true class")
        super().__init__(model, eps=eps, norm="Linf", gradients=check_choice("gradients", gradients,
                                                                            ("ste", "bpda", "native")), **kwargs)
        if not isinstance(twin, nn.Module):
            raise ConfigError("DIVA needs twin=<the differentiable (fake-quant) model the deployed one came from>")
        if reference is not None and not isinstance(reference, nn.Module):
            raise ConfigError(f"reference must be the float parent (an nn.Module) or None, got {reference!r}")
        self.twin = twin
        self.reference = reference
        assert self.eps is not None
        self.alpha = check_positive("alpha", self.eps / 4 if alpha is None else alpha)
        self.steps = check_int("steps", steps)
        self.c = check_positive("c", c)
        if not isinstance(random_start, bool):
            raise ConfigError(f"random_start must be True or False, got {random_start!r}")
        self.random_start = random_start

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return self.random_start

    def _disagreement(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p_twin = F.softmax(self.twin(x), dim=1).gather(1, y[:, None]).squeeze(1)
        if self.reference is not None:
            ref = self.reference(x)
        else:
            with quantization_disabled(self.twin):
                ref = self.twin(x)
        p_ref = F.softmax(ref, dim=1).gather(1, y[:, None]).squeeze(1)
        return p_ref - self.c * p_twin

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        idx = self.todo.nonzero().squeeze(1)
        x_out = x.clone()
        if idx.numel() == 0:
            return x_out
        xs, ys = x[idx], y[idx]
        x_adv = self.project(xs + self.uniform(xs.shape, -self.eps, self.eps), xs) if self.random_start else xs.clone()
        active = torch.arange(xs.shape[0], device=x.device)
        nets = [self.twin] + ([self.reference] if self.reference is not None else [])
        with ExitStack() as stack:
            for net in nets:
                stack.enter_context(eval_mode(net))
            frozen = [(p, p.requires_grad) for net in nets for p in net.parameters()]
            for p, _ in frozen:
                p.requires_grad_(False)
            stack.callback(lambda: [p.requires_grad_(r) for p, r in frozen])
            stack.enter_context(gradient_mode(attack_mode(self.gradients)))
            for _ in range(self.steps):
                xg = x_adv[active].clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = self._disagreement(xg, ys[active]).sum()
                (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
                if g is None:
                    g = torch.zeros_like(xg)
                x_adv[active] = self.project(x_adv[active] + self.alpha * g.sign(), xs[active])
                if self.early_stop:
                    hit = self.is_success(self.logits(x_adv[active]), ys[active])
                    active = active[~hit]
                    if active.numel() == 0:
                        break
        x_out[idx] = x_adv
        return x_out
