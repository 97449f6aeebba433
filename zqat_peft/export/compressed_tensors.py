"""compressed-tensors ``pack-quantized`` checkpoints (vLLM's native path, transformers).

Per quantized Linear ``X``: ``X.weight_packed`` int32 [out, in*bits/32] (codes packed along the input),
``X.weight_scale`` float32 [out, n_groups], ``X.weight_zero_point`` int32 [out*bits/32, n_groups] (zero
points packed along the output; asymmetric only) and ``X.weight_shape`` int64 [2]. compressed-tensors
quantizes to the signed range and adds 2**(bits-1) when it packs, so the bits on disk are the unsigned codes
and zero points themselves: the tensors are the GPTQ ones transposed, with the zero points unshifted.

3-bit is refused: compressed-tensors up to 0.17 packed 10 values per word (padding the top bits) and from 0.18
packs densely under the same format name, so no one 3-bit layout loads everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..quant import pack_int
from .folder import new_folder, write_model_files, write_safetensors
from .report import ExportReport
from .weights import (
    QuantizedLinear, common_setting, float_tensors, plain_linears, quantized_linears, refuse_smoothing,
    warn_dropped_activation_quantization,
)

COMPRESSED_TENSORS_BITS = (2, 4, 8)


def compressed_tensors_tensors(q: QuantizedLinear) -> dict[str, Tensor]:
    """The pack-quantized tensors of one layer, by their suffix."""
    if q.bits not in COMPRESSED_TENSORS_BITS:
        raise ValueError(
            f"compressed-tensors has no one {q.bits}-bit layout that every version reads; "
            f"export {q.bits}-bit weights with format 'gptq'"
        )
    if q.in_features % 32:
        raise ValueError(f"pack-quantized packs 32 values per {q.bits} words: in_features={q.in_features} is not a multiple of 32")
    tensors = {
        "weight_packed": pack_int(q.codes.t(), q.bits).t().contiguous(),
        "weight_scale": q.scale.contiguous(),
        "weight_shape": torch.tensor([q.out_features, q.in_features], dtype=torch.int64),
    }
    if not q.symmetric:
        if q.out_features % 32:
            raise ValueError(f"zero points pack 32 per {q.bits} words: out_features={q.out_features} is not a multiple of 32")
        tensors["weight_zero_point"] = pack_int(q.zero, q.bits)
    if q.bias is not None:
        tensors["bias"] = q.bias
    return tensors


def compressed_tensors_quantization_config(bits: int, group_size: int, symmetric: bool, ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` of config.json: one config group for every Linear not in ``ignore``."""
    weights = {
        "num_bits": bits, "type": "int", "symmetric": symmetric,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False, "actorder": None, "observer": "minmax",
    }
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "ignore": ignore,
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"], "format": "pack-quantized", "weights": weights,
                "input_activations": None, "output_activations": None,
            }
        },
    }
    if not symmetric:
        # transformers (5.24 with compressed-tensors 0.20) lays out the compressed modules from meta tensors and
        # then expects the zero points unpacked, so its default route rejects the packed ones every other reader
        # (vLLM, compressed-tensors' own decompress) takes: load these by dequantizing at load time instead.
        config["dequantize"] = True
    return config


def save_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Optional[Any] = None) -> ExportReport:
    """Write a compressed-tensors ``pack-quantized`` checkpoint folder (2/4/8 bits, group or channel, sym or asym).

    The scales are stored in float32, so the weights are exactly the model's. Linear layers that ZeroQAT did not
    quantize (lm_head) are listed in ``ignore``.
    """
    layers = quantized_linears(model)
    refuse_smoothing(layers, "compressed-tensors")
    bits, group_size, symmetric = common_setting(layers, "compressed-tensors")
    dropped = warn_dropped_activation_quantization(model)
    tensors = float_tensors(model)
    for name, q in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in compressed_tensors_tensors(q).items()})
    config = compressed_tensors_quantization_config(bits, group_size, symmetric, plain_linears(model))
    with new_folder(out_dir) as folder:
        write_safetensors(folder, tensors)
        write_model_files(folder, model, tokenizer, config)
    return ExportReport(Path(out_dir), "compressed-tensors (pack-quantized)", dropped, 0.0)
