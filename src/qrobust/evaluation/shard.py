"""Sharded evaluation: under ``torchrun --nproc_per_node=N``, :func:`~qrobust.evaluation.evaluate` splits
its work across the ranks and merges it into the report a single process would write.

**What is split.** Every pass over the samples (the clean predictions, each attack at each ε, the
diagnostics' attacks) cuts its samples into the batches a single process would make (``batch_size``
consecutive samples of the same index list) and runs them in rounds of one batch per rank (rank ``r`` runs
batches ``r, r + N, r + 2N, …``). After each pass the per-sample results (still-correct flags, predictions,
adversarial examples when kept) are merged with ``all_reduce`` — each rank contributes its own batches,
zeros elsewhere — so every rank continues with the same worst-case mask and builds the same index list for
the next attack.

**Why the numbers are the single process's.** An attack seeds a private generator at the start of every
call (one call per batch) and draws its random starts, targets and square positions for the batch as a
whole, so a sample's randomness depends on the batch it sits in and its place there. Cutting by the single
process's batches keeps every sample in the same batch, in the same place, under the same seed — whatever
the number of ranks — so the per-sample masks are those of one process (and so are the floating-point
results, on the same kind of device). A finer split (per-sample generators) would change every attack;
this one changes none. (A randomized *model* — random precision — draws from the global RNG, whose stream
differs between ranks: its per-sample results are random in one process too, and are merged all the same.)
The price: at most ``ceil(n / batch_size)`` ranks have work, so lower ``batch_size`` to keep many ranks busy
(a smaller ``batch_size`` is a different, equally valid, evaluation; it is in the report).

**Files.** Every rank returns the same report; rank 0 writes (``qrobust eval`` saves the report from rank 0
only). A ``state_path`` must be on a file system every rank sees: every rank reads it, rank 0 alone writes
it — after every round (the results of the round's batches merged first: the finished batches are always a
prefix, as in one process) and after every finished attack. A state file written by a sharded run continues
in a single process, or with another number of ranks, and vice versa: the numbers are the same.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from qrobust.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation: rank ``rank`` of ``world`` (``world == 1``: everything)."""

    rank: int = 0
    world: int = 1
    #: where tensors handed to collectives live (the current CUDA device under nccl, else the CPU)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world > 1

    def mine(self, batch: int) -> bool:
        """Whether batch number ``batch`` of a pass is this rank's."""
        return batch % self.world == self.rank

    def merge(self, local: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
        """Per-sample values of one pass: ``local`` holds this rank's results where ``computed`` (a (len,)
        bool mask) is set; positions no rank computed keep ``local``'s (resumed, the same on every rank)."""
        if not self.active:
            return local
        view = computed.reshape(-1, *([1] * (local.dim() - 1))).to(local.device)
        wire = torch.float64 if local.is_floating_point() else torch.int64  # nccl sums no bool
        t = torch.where(view, local, torch.zeros_like(local)).to(device=self.device, dtype=wire)
        c = computed.to(device=self.device, dtype=torch.int64)
        dist.all_reduce(t)
        dist.all_reduce(c)
        anyone = (c > 0).to(local.device).reshape(view.shape)
        return torch.where(anyone, t.to(device=local.device, dtype=local.dtype), local)

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks (wall times: the pass took as long as its slowest rank)."""
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Integer counters summed over the ranks (keys a rank did not see count 0 there)."""
        if not self.active:
            return counts
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, dict(counts))
        out: dict[str, int] = {}
        for d in gathered:
            for k, v in d.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def check_same(self, value: Any, what: str, fix: str) -> None:
        """Refuse (on every rank) when ranks disagree about ``value`` (JSON data)."""
        if not self.active:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, digest)
        if len(set(gathered)) > 1:
            raise ConfigError(f"the ranks of this torchrun evaluation see different {what}; {fix}")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


#: the whole evaluation in one process
ALONE = Shard()


def current_shard(rank: int, world: int) -> Shard:
    """The :class:`Shard` of rank ``rank`` of ``world`` in the open process group."""
    if world > 1 and dist.get_backend() == "nccl":
        return Shard(rank, world, torch.device("cuda", torch.cuda.current_device()))
    return Shard(rank, world)
