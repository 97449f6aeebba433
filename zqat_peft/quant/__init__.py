"""Quantization primitives (fake quantization, quantize/dequantize) and GPTQ bit packing."""

from .packing import dequantize_packed, pack_int, packed_kernel_for, packed_linear, packed_shape, unpack_int
from .primitives import (
    ACT_BITS,
    MIN_CLIP_RATIO,
    WEIGHT_BITS,
    check_act_bits,
    check_weight_bits,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight,
    resolve_group_size,
    round_ste,
    rounding_margin,
    weight_qparams,
)

__all__ = [
    "ACT_BITS",
    "MIN_CLIP_RATIO",
    "WEIGHT_BITS",
    "check_act_bits",
    "check_weight_bits",
    "dequantize_packed",
    "dequantize_weight",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "pack_int",
    "packed_kernel_for",
    "packed_linear",
    "packed_shape",
    "quantize_weight",
    "resolve_group_size",
    "round_ste",
    "rounding_margin",
    "unpack_int",
    "weight_qparams",
]
