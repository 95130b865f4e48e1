"""How adversarial examples and gradients carry across precisions (Bernhard, Moëllic & Dutertre, 2019).

* :func:`transfer_matrix` — every model of a family (``{"float": m, "w8a8": m8, "w4a4": m4, ...}``) crafts
  adversarial examples with straight-through gradients, every model is scored on them. Entry ``[s][t]`` is
  the target's robust accuracy on the points that *both* ``s`` and ``t`` classify correctly (so a pair is
  never judged on points one of them already misses), with the success rate and the count beside it. The
  diagonal is the white-box attack on the model itself.
* :func:`gradient_alignment` — per sample, the cosine similarity of the input gradients of the loss of two
  models (e.g. a float model and its 2-bit copy): gradient misalignment is the paper's second explanation
  of poor transfer, and a histogram shows it.

Quantization value shift, the paper's first explanation, is :func:`qrobust.analysis.value_shift` (it counts
buckets the way :mod:`qrobust.analysis.amplification` does).

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> a, b = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
>>> x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
>>> cos = gradient_alignment(a, a, x, y)
>>> bool(torch.allclose(cos, torch.ones(8)))
True
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks import ATTACKS, Attack, make_attack
from qrobust.attacks.base import GRADIENTS
from qrobust.errors import ConfigError, InputError
from qrobust.figures import new_figure, save_figure
from qrobust.quant.modes import attack_mode, gradient_mode
from qrobust.utils import eval_mode, model_device
from qrobust.validation import check_choice, check_eps

__all__ = ["TransferMatrix", "gradient_alignment", "plot_alignment", "transfer_matrix"]


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    dev = model_device(model)
    with eval_mode(model):
        return torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu()
                          for i in range(0, x.shape[0], batch_size)])


@dataclass
class TransferMatrix:
    """Robust accuracy of each target (columns) on each source's adversarial examples (rows), in [0, 1],
    on the points both classify correctly; ``success`` = 1 − robust accuracy there; ``n`` = that count."""

    names: list[str]
    robust: list[list[float | None]]
    success: list[list[float | None]]
    n: list[list[int]]
    clean: dict[str, float]
    eps: float
    norm: str
    attack: dict[str, Any] = field(default_factory=dict)
    n_samples: int = 0

    def value(self, source: str, target: str) -> float | None:
        return self.robust[self.names.index(source)][self.names.index(target)]

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "robust": self.robust, "success": self.success, "n": self.n,
                "clean": self.clean, "eps": self.eps, "norm": self.norm, "attack": self.attack,
                "n_samples": self.n_samples}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransferMatrix:
        return cls(**{k: d[k] for k in ("names", "robust", "success", "n", "clean", "eps", "norm")},
                   attack=dict(d.get("attack", {})), n_samples=int(d.get("n_samples", 0)))

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """A heat map: rows craft, columns are attacked; each cell prints the robust accuracy (%) and n."""
        k = len(self.names)
        fig = new_figure((1.3 * k + 2.4, 1.1 * k + 1.6))
        ax = fig.add_subplot(1, 1, 1)
        vals = [[float("nan") if v is None else 100 * v for v in row] for row in self.robust]
        seen = [v for row in vals for v in row if v == v]
        lo, hi = (min(seen), max(seen)) if seen else (0.0, 100.0)
        pad = max(2.0, 0.1 * (hi - lo))  # the colour range follows the data, so the differences show
        vmin, vmax = max(0.0, lo - pad), min(100.0, hi + pad)
        im = ax.imshow(vals, cmap="viridis", vmin=vmin, vmax=vmax)
        for i in range(k):
            for j in range(k):
                v = self.robust[i][j]
                txt = "–" if v is None else f"{100 * v:.1f}\nn={self.n[i][j]}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                        color="white" if v is None or 100 * v < (vmin + vmax) / 2 else "black")
        ax.set_xticks(range(k), self.names)
        ax.set_yticks(range(k), self.names)
        ax.set_xlabel("attacked model (target)")
        ax.set_ylabel("crafted on (source)")
        eps_txt = f"{self.eps:.3g} ({self.eps * 255:.3g}/255)" if self.norm == "Linf" else f"{self.eps:g} (L2)"
        ax.set_title(title or f"robust accuracy (%) under transfer, {self.attack.get('attack', '?')} "
                              f"ε = {eps_txt}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="robust accuracy (%)")
        return save_figure(fig, path)


def transfer_matrix(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    attack: str = "pgd",
    attack_kwargs: Mapping[str, Any] | None = None,
    gradients: str = "ste",
    seed: int = 0,
    batch_size: int = 256,
) -> TransferMatrix:
    """Every model crafts with ``attack`` (a registry name; straight-through gradients by default) at ``eps``;
    every model is scored on every source's examples → :class:`TransferMatrix`.

    The source attack runs with ``early_stop=False`` (stopping at the first point that fools the source
    makes weak transfers, as in :class:`qrobust.attacks.Transfer`) on every sample.
    """
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ConfigError("transfer_matrix needs a mapping of at least two named models, e.g. "
                          "{'float': m, 'w4a4': q}")
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise ConfigError(f"models[{name!r}] is a {type(m).__name__}, not an nn.Module")
    check_choice("gradients", gradients, GRADIENTS)
    check_eps(eps, norm)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InputError(f"x and y must hold the same, non-zero number of samples ({x.shape[0]} vs {y.shape[0]})")
    names = list(models)
    kw = {"steps": 20, **dict(attack_kwargs or {})}
    correct = {n: _predict(m, x, batch_size) == y for n, m in models.items()}
    advs: dict[str, torch.Tensor] = {}
    settings: dict[str, Any] = {}
    cls = ATTACKS.get(attack.lower()) if isinstance(attack, str) else None
    if cls is None:
        raise ConfigError(f"attack must be a registry name (e.g. 'pgd', 'apgd-ce'), got {attack!r}")
    if "norm" in inspect.signature(cls.__init__).parameters:
        kw.setdefault("norm", norm)
    for n, m in models.items():
        atk: Attack = make_attack(attack, m, eps=eps, seed=seed, early_stop=False, gradients=gradients, **kw)
        if atk.norm != norm:
            raise ConfigError(f"attack {attack!r} works in {atk.norm}, not in the requested {norm}")
        advs[n] = torch.cat([atk(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0],
                                                                                          batch_size)])
        settings = {k: v for k, v in atk.config().items() if k not in ("surrogate",)}
    robust: list[list[float | None]] = []
    success: list[list[float | None]] = []
    counts: list[list[int]] = []
    for s in names:
        r_row, s_row, n_row = [], [], []
        for t in names:
            both = correct[s] & correct[t]
            nb = int(both.sum())
            if nb == 0:
                r_row.append(None)
                s_row.append(None)
            else:
                ok = _predict(models[t], advs[s][both], batch_size) == y[both]
                r_row.append(float(ok.float().mean()))
                s_row.append(1.0 - r_row[-1])
            n_row.append(nb)
        robust.append(r_row)
        success.append(s_row)
        counts.append(n_row)
    return TransferMatrix(names, robust, success, counts, {n: float(c.float().mean()) for n, c in correct.items()},
                          float(eps), norm, attack=settings, n_samples=int(x.shape[0]))


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gradients: str) -> torch.Tensor:
    dev = model_device(model)
    xg = x.to(dev).clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad(), gradient_mode(attack_mode(gradients)):
        loss = F.cross_entropy(model(xg), y.to(dev), reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)
    return g.detach().cpu()


def gradient_alignment(
    model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, y: torch.Tensor, *, gradients: str = "ste",
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample cosine similarity ``(N,)`` of ∇ₓ CE of ``model_a`` and of ``model_b`` (straight-through
    through quantizers by default; ``"native"`` shows the zeros a naive attacker gets). A sample where
    either gradient is all zero gets NaN (no direction to compare)."""
    if gradients == "surrogate":
        raise ConfigError("gradient_alignment compares the models' own gradients: use gradients='ste' or 'native'")
    check_choice("gradients", gradients, GRADIENTS)
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        ga = _input_grad(model_a, xb, yb, gradients).reshape(xb.shape[0], -1).double()
        gb = _input_grad(model_b, xb, yb, gradients).reshape(xb.shape[0], -1).double()
        na, nb = ga.norm(dim=1), gb.norm(dim=1)
        cos = (ga * gb).sum(1) / (na * nb).clamp_min(1e-300)
        cos[(na == 0) | (nb == 0)] = float("nan")
        out.append(cos.float())
    return torch.cat(out)


def plot_alignment(alignments: Mapping[str, torch.Tensor], path: str | os.PathLike, *, title: str | None = None
                   ) -> Path:
    """Histograms of per-sample gradient cosine similarity, one per model pair (``{"float vs w4a4": cos}``),
    with each pair's median in the legend."""
    fig = new_figure((6.4, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    finite = [c[~torch.isnan(c)] for c in alignments.values()]
    lo = min((float(c.min()) for c in finite if c.numel()), default=-1.0)
    lo = max(-1.0, (int(lo * 10) - 1) / 10)  # zoom to where the data is, in steps of 0.1
    bins = [lo + (1 - lo) * i / 40 for i in range(41)]
    for label, cos in alignments.items():
        c = cos[~torch.isnan(cos)]
        if c.numel() == 0:
            continue
        ax.hist(c.tolist(), bins=bins, histtype="step", linewidth=1.5,
                label=f"{label} (median {float(c.median()):.2f}, n={c.numel()})")
    ax.set_xlim(lo, 1)
    ax.set_xlabel("cosine similarity of input gradients")
    ax.set_ylabel("samples")
    ax.set_title(title or "gradient alignment across precisions", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
