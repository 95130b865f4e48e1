"""An exported ONNX graph as an ``nn.Module``, so evaluations attack what ships.

:class:`DeployedModel` runs the graph with onnxruntime on the CPU. It has no gradients: a white-box attack on
it is refused with an error (attack it with the black-box attacks — Square, SPSA, Transfer from its fake-quant
twin, DIVA — which is what their class facts declare). :func:`load_twin` finds the fake-quant checkpoint the
graph was exported from (recorded in its metadata, checked by the SHA-256 of its weights and of its header).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust import checkpoint, zoo
from qrobust.errors import CheckpointError, InputError
from qrobust.export.graph import onnx_session, read_onnx_metadata

__all__ = ["DeployedModel", "load_twin"]

log = logging.getLogger(__name__)


class DeployedModel(nn.Module):
    """``forward(x)`` = the logits onnxruntime computes for the exported graph at ``path`` (pixels in [0, 1]).

    ``qrobust_export`` is the export's metadata (spec, per-layer bits, agreement, source checkpoint);
    ``qrobust_arch``/``qrobust_spec``/``qrobust_meta`` mirror a checkpoint's, so the CLI and reports read
    them the same way. ``threads`` — onnxruntime intra-op threads (default: torch's thread count);
    ``optimize=False`` — the graph as written, without onnxruntime's integer kernels (its reference semantics).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, optimize: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.threads = threads
        self.optimize = optimize
        self.qrobust_export = read_onnx_metadata(self.path)
        self.session = onnx_session(self.path, threads=threads, optimize=optimize)
        info = self.qrobust_export
        self.qrobust_arch = info.get("arch")
        self.qrobust_spec = info.get("spec")
        source = info.get("source") or {}
        self.qrobust_meta = {"arch": info.get("arch"), "spec": info.get("spec"),
                             "metadata": {"dataset": source.get("dataset")}, "export": info}
        # the file's digest as a buffer: evaluation fingerprints (resumable state) tell two exports apart
        digest = hashlib.sha256(self.path.read_bytes()).digest()
        self.register_buffer("onnx_sha256", torch.tensor(list(digest), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise InputError(
                "the deployed ONNX graph has no gradients: attack it with black-box attacks (square, spsa, "
                "transfer from its fake-quant twin, diva), e.g. qrobust.evaluation.reverify"
            )
        out = self.session.run(["logits"], {"input": x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> DeployedModel:
        return DeployedModel(self.path, threads=self.threads, optimize=self.optimize)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, spec={(self.qrobust_spec or {}).get('name')!r}"


def load_twin(deployed: DeployedModel, path: str | Path | None = None) -> nn.Module:
    """The fake-quant model ``deployed`` was exported from: ``path``, else the checkpoint its metadata names;
    its weights must be the ones exported (SHA-256 in the metadata), else CheckpointError."""
    source = deployed.qrobust_export.get("source") or {}
    where = path or source.get("checkpoint")
    if not where:
        raise CheckpointError(f"{deployed.path} does not record the checkpoint it was exported from: pass the "
                              "fake-quant checkpoint (--twin CKPT)")
    if not zoo.is_zoo_name(str(where)) and not Path(where).exists():  # a zoo name resolves where the zoo is
        raise CheckpointError(f"{deployed.path} was exported from {where}, which is not there now: pass the "
                              "fake-quant checkpoint (--twin CKPT)")
    twin = checkpoint.load(where)
    for key in ("sha256", "header_sha256"):  # the weights, and the header (arch, spec, clip ranges) too
        want = source.get(key)
        if want and twin.qrobust_meta.get(key) != want:
            raise CheckpointError(f"{where} is not the checkpoint {deployed.path} was exported from (its {key} "
                                  "differs): pass the one it was exported from, or export again")
    return twin
