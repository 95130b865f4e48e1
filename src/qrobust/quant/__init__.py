"""How numbers become low-bit: quantizers, quantized layers, specs and model conversion."""

from qrobust.quant.modes import (
    GRADIENT_MODES,
    get_gradient_mode,
    gradient_mode,
    quant_modules,
    quantization_disabled,
    round_q,
    sign_q,
)

__all__ = [
    "GRADIENT_MODES",
    "get_gradient_mode",
    "gradient_mode",
    "quant_modules",
    "quantization_disabled",
    "round_q",
    "sign_q",
]
