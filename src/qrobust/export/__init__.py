"""The verified model as it ships: an integer ONNX graph run by onnxruntime, a packed low-bit checkpoint, and
the proof that each computes the function that was verified (docs/deploy.md).

>>> from qrobust.export import to_onnx, save_packed, load_packed, DeployedModel   # doctest: +SKIP
"""

from qrobust.export.deployed import DeployedModel, load_twin
from qrobust.export.graph import (
    DEFAULT_MIN_AGREEMENT,
    ExportResult,
    format_onnx_description,
    measure_agreement,
    onnx_session,
    read_onnx_metadata,
    sidecar_path,
    to_onnx,
)
from qrobust.export.integers import WeightCodes, weight_codes
from qrobust.export.packed import load_packed, pack_bits, packed_size_report, save_packed, unpack_bits

__all__ = [
    "DEFAULT_MIN_AGREEMENT",
    "DeployedModel",
    "load_twin",
    "ExportResult",
    "format_onnx_description",
    "WeightCodes",
    "measure_agreement",
    "onnx_session",
    "read_onnx_metadata",
    "sidecar_path",
    "to_onnx",
    "weight_codes",
    "load_packed",
    "pack_bits",
    "packed_size_report",
    "save_packed",
    "unpack_bits",
]
