"""A long evaluation that can be stopped and continued: the state file (AutoAttack's ``state_path`` idea).

``evaluate(..., state_path="eval-state.json")`` writes, atomically after every batch of every attack, what
is done so far: each finished attack's result and the worst-case robust mask after it, and for the attack
under way its finished batches (still-robust flags and predictions). Run the same evaluation again with the
same ``state_path`` and it continues where it stopped — finished attacks are not run again, the running one
restarts at its next batch. Because every attack re-seeds itself at each call (one call per batch), the
continued evaluation gives exactly the numbers an uninterrupted one would.

The file starts with a fingerprint of what is evaluated: the model's tensors, the data, and every setting
that changes a number (suite, ε, norm, gradients, seed, batch size, …). A state file from another
evaluation is refused with an error instead of being mixed in; each attack's own settings are checked again
when its stored result is reused. The diagnostics, run after the attacks, are recomputed (they are cheap next
to a suite); adversarial examples are not stored, so ``return_examples=True`` and ``state_path`` exclude each
other. Under torchrun every rank reads the file and rank 0 writes it, after every round of one batch per
rank (:mod:`qrobust.evaluation.shard`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.evaluation.results import AttackResult, mask_str, str_mask
from qrobust.utils import atomic_write_text

FORMAT = "qrobust-eval-state/1"


def _tensor_digest(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any]) -> str:
    """sha256 over the model's parameters and buffers, the data and the settings (canonical JSON)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        _tensor_digest(h, t)
    _tensor_digest(h, x)
    _tensor_digest(h, y)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class EvalState:
    """The state file of one evaluation: load (and check) it, ask what is done, record progress."""

    def __init__(self, path: str | os.PathLike, fp: str, *, write: bool = True) -> None:
        self.path = Path(path)
        self.fp = fp
        self.write = write  # under torchrun only rank 0 writes (every rank reads)
        self.data: dict[str, Any] = {"format": FORMAT, "fingerprint": fp, "done": {}, "partial": None}
        if self.path.is_dir():
            raise ConfigError(f"state_path {self.path} is a folder; give a file name such as {self.path}/state.json")
        if self.path.exists():
            try:
                d = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the evaluation state {self.path} ({e}); delete it to start "
                                  f"over") from e
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ConfigError(f"{self.path} is not a qrobust evaluation state file; delete it or choose "
                                  f"another state_path")
            if d.get("fingerprint") != fp:
                raise ConfigError(f"the evaluation state {self.path} belongs to another evaluation (other model "
                                  f"weights, data or settings); delete it to start over, or rerun with the "
                                  f"settings it was made with")
            self.data = d
        self.resumed = self.path.exists()
        self.n_reused = 0
        #: seconds the earlier runs of this evaluation spent up to their last recorded batch (kept out of
        #: ``data``, which every rank must read alike while rank 0 rewrites this figure)
        self.prior_s = float(self.data.pop("elapsed_s", 0.0))
        self._t_open = time.perf_counter()
        self._save()

    @staticmethod
    def _key(eps: float, label: str) -> str:
        return f"{eps!r}|{label}"

    def _save(self) -> None:
        if not self.write:
            return
        elapsed = self.prior_s + time.perf_counter() - self._t_open  # in the file only: data stays equal on all ranks
        atomic_write_text(self.path, json.dumps({**self.data, "elapsed_s": elapsed}, allow_nan=False) + "\n")

    def finished(self, eps: float, label: str, settings: dict[str, Any]) -> tuple[AttackResult, torch.Tensor] | None:
        """The stored result of attack ``label`` at ``eps`` and the worst-case robust mask after it."""
        d = self.data["done"].get(self._key(eps, label))
        if d is None:
            return None
        if d["result"]["settings"] != settings:
            raise ConfigError(f"the evaluation state {self.path} holds {label} at ε={eps:g} with other settings; "
                              f"delete it to start over")
        self.n_reused += 1
        return AttackResult.from_dict(d["result"]), str_mask(d["robust_after"])

    def partial(self, eps: float, label: str, idx: torch.Tensor) -> dict[str, Any] | None:
        """Finished batches of the attack under way, if it is this one on these samples."""
        p = self.data.get("partial")
        if not p or p["key"] != self._key(eps, label) or p["idx"] != mask_str(_as_mask(idx, p["n"])):
            return None
        return {"batches": p["batches"], "ok": str_mask(p["ok"]), "pred": torch.tensor(p["pred"], dtype=torch.long),
                "stats": dict(p["stats"]), "time_s": float(p["time_s"])}

    def record_batch(self, eps: float, label: str, idx: torch.Tensor, n: int, batches: int, ok: torch.Tensor,
                     pred: torch.Tensor, stats: dict[str, int], time_s: float) -> None:
        self.data["partial"] = {"key": self._key(eps, label), "n": n, "idx": mask_str(_as_mask(idx, n)),
                                "batches": batches, "ok": mask_str(ok), "pred": pred.tolist(), "stats": stats,
                                "time_s": time_s}
        self._save()

    def record_done(self, eps: float, label: str, result: AttackResult, robust_after: torch.Tensor) -> None:
        self.data["done"][self._key(eps, label)] = {"result": result.to_dict(), "robust_after": mask_str(robust_after)}
        self.data["partial"] = None
        self._save()


def _as_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m
