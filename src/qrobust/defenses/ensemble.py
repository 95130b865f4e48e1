"""Ensembles of models of any precision or architecture, and the adaptive way to attack them.

EMPIR (Sen et al., ICLR 2020) votes a float, a w4a2 and a w2a2 model: adversarial examples transfer poorly
across precisions, so an attack on one member rarely fools the others. But the vote is not differentiable —
a gradient attack on it sees zeros, which is gradient masking, not robustness — and Tramèr et al. (2020) broke
EMPIR by attacking the *averaged softmax* of the members instead (1.4 % left under PGD-100). So:

* :class:`Ensemble` ``(models, combine="vote" | "probs" | "logits")`` is an ``nn.Module`` whose output is
  ``log(mean softmax)`` (``"probs"``), the mean logits (``"logits"``), or the vote counts (``"vote"``, ties
  broken by the mean softmax — the prediction EMPIR makes);
* :func:`adaptive_suite` is how to evaluate one: white-box attacks go through the differentiable combinations
  (``gradients="surrogate"`` on the ``"probs"`` and ``"logits"`` views of the same members, each member
  with its own straight-through estimators), plus transfer from every member and a gradient-free attack
  (Square). The labels say which view or member broke the ensemble, so the report names the surrogate that
  did it::

    ens = Ensemble({"float": m, "w4a2": q42, "w2a2": q22}, combine="vote")
    report = qrobust.evaluate(ens, data, eps=8/255, suite=adaptive_suite(ens))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.validation import check_choice, check_int

__all__ = ["COMBINES", "Ensemble", "adaptive_suite"]

COMBINES = ("vote", "probs", "logits")


class Ensemble(nn.Module):
    """Members (a mapping name → model, or a sequence) combined by ``combine`` (module docstring)."""

    def __init__(self, models: Mapping[str, nn.Module] | Sequence[nn.Module], *, combine: str = "probs") -> None:
        super().__init__()
        items = list(models.items()) if isinstance(models, Mapping) else [(f"m{i}", m) for i, m in enumerate(models)]
        if len(items) < 2:
            raise ConfigError("an Ensemble needs at least two members")
        for name, m in items:
            if not isinstance(m, nn.Module):
                raise ConfigError(f"ensemble member {name!r} is a {type(m).__name__}, not an nn.Module")
        if len({n for n, _ in items}) != len(items):
            raise ConfigError(f"ensemble member names repeat: {[n for n, _ in items]}")
        self.names = [str(n) for n, _ in items]  # names like "float" would clash with nn.Module's attributes
        self.models = nn.ModuleList([m for _, m in items])
        self.combine = check_choice("combine", combine, COMBINES)

    @property
    def members(self) -> dict[str, nn.Module]:
        return dict(zip(self.names, self.models))

    def qrobust_composite(self) -> dict[str, Any] | None:
        """What :func:`qrobust.save` records so that :func:`qrobust.load` rebuilds the ensemble from the path
        alone: each member's architecture and quantization spec (``None`` when a member is not a registry
        model — then it loads with ``load(path, model=skeleton)``)."""
        members = [{"name": n, "arch": getattr(m, "qrobust_arch", None), "spec": getattr(m, "qrobust_spec", None)}
                   for n, m in self.members.items()]
        if any(m["arch"] is None for m in members):
            return None
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "combine": self.combine,
                "members": members}

    @classmethod
    def from_composite(cls, record: Mapping[str, Any], build: Any) -> Ensemble:
        """The ensemble a :meth:`qrobust_composite` record describes, members rebuilt by ``build(meta)``."""
        return cls({m["name"]: build({"arch": m["arch"], "spec": m["spec"]}) for m in record["members"]},
                   combine=record["combine"])

    def view(self, combine: str) -> Ensemble:
        """The same members (shared, not copied) combined another way — the differentiable surrogates of a
        voting ensemble."""
        return Ensemble(self.members, combine=combine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [m(x) for m in self.models]
        k = {z.shape[1] for z in logits}
        if len(k) != 1:
            raise ConfigError(f"ensemble members disagree on the number of classes: {sorted(k)}")
        if self.combine == "logits":
            return torch.stack(logits).mean(0)
        probs = torch.stack([z.float().softmax(1) for z in logits]).mean(0)
        if self.combine == "probs":
            return probs.clamp_min(1e-30).log()
        votes = torch.stack([nn.functional.one_hot(z.argmax(1), z.shape[1]) for z in logits]).sum(0).float()
        return votes + probs.detach() / (len(logits) + 1)  # a tie goes to the higher mean probability


def adaptive_suite(ensemble: Ensemble, *, n_iter: int = 100, n_queries: int = 5000,
                   transfer_steps: int = 20) -> list[tuple[str, dict[str, Any]]]:
    """The attacks an ensemble is judged by: APGD-CE and APGD-T on its ``probs`` and ``logits`` views,
    PGD transfer from every member, and Square on the ensemble itself (module docstring) — as the
    ``(attack name, settings)`` items a custom ``evaluate(suite=...)`` takes, each with its ``label``."""
    if not isinstance(ensemble, Ensemble):
        raise ConfigError(f"adaptive_suite takes an Ensemble, got {type(ensemble).__name__}")
    n_iter, n_queries = check_int("n_iter", n_iter), check_int("n_queries", n_queries)
    steps = check_int("transfer_steps", transfer_steps)
    entries: list[tuple[str, dict[str, Any]]] = []
    for view in ("probs", "logits"):
        sur = ensemble.view(view)
        for attack in ("apgd-ce", "apgd-t"):
            entries.append((attack, {"label": f"{attack}[{view}]", "n_iter": n_iter, "gradients": "surrogate",
                                     "surrogate": sur}))
    for name, member in ensemble.members.items():
        entries.append(("transfer", {"label": f"transfer[{name}]", "source": member, "attack": "pgd",
                                     "steps": steps, "alpha": "eps/4"}))
    entries.append(("square", {"label": "square", "n_queries": n_queries}))
    return entries
