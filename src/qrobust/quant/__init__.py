"""How numbers become low-bit: quantizers, quantized layers, specs and model conversion.

>>> import torch.nn as nn
>>> qmodel = quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "w4a4")
>>> is_quantized(qmodel), qmodel.qrobust_spec["weight_bits"]
(True, 4)
"""

from qrobust.quant import functional
from qrobust.quant.convert import (
    describe,
    format_description,
    is_quantized,
    load_float_state_dict,
    quantize,
    quantize_additions,
    quantize_as_saved,
    quantizer_state_keys,
    size_totals,
)
from qrobust.quant.functional import round_ste, sign_ste
from qrobust.quant.layers import QuantAct, QuantConv2d, QuantLinear
from qrobust.quant.modes import (
    GRADIENT_MODES,
    attack_mode,
    fake_quant_q,
    get_gradient_mode,
    gradient_mode,
    quant_modules,
    quantization_disabled,
    round_q,
    sign_q,
)
from qrobust.quant.quantizers import (
    BinaryWeightQuantizer,
    ClipActQuantizer,
    DoReFaWeightQuantizer,
    LSQWeightQuantizer,
    PACTActQuantizer,
    Quantizer,
    SignActQuantizer,
    UniformWeightQuantizer,
    make_act_quantizer,
    make_weight_quantizer,
)
from qrobust.quant.spec import ACT_SCHEMES, SIGN_GRADS, VALID_BITS, WEIGHT_SCHEMES, QuantSpec

__all__ = [
    "ACT_SCHEMES",
    "GRADIENT_MODES",
    "attack_mode",
    "SIGN_GRADS",
    "VALID_BITS",
    "WEIGHT_SCHEMES",
    "BinaryWeightQuantizer",
    "ClipActQuantizer",
    "DoReFaWeightQuantizer",
    "LSQWeightQuantizer",
    "PACTActQuantizer",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "Quantizer",
    "SignActQuantizer",
    "UniformWeightQuantizer",
    "describe",
    "fake_quant_q",
    "format_description",
    "functional",
    "get_gradient_mode",
    "gradient_mode",
    "is_quantized",
    "load_float_state_dict",
    "make_act_quantizer",
    "make_weight_quantizer",
    "quant_modules",
    "quantization_disabled",
    "quantize",
    "quantize_additions",
    "quantize_as_saved",
    "quantizer_state_keys",
    "round_q",
    "round_ste",
    "sign_q",
    "sign_ste",
    "size_totals",
]
