"""Plain float checkpoints: every quantized weight dequantized, smoothing folded in.

A smoothed layer computes ``(x * input_scale) @ Q(W s)^T``; a plain Linear has no input scale, so its
weight becomes ``Q(W s) * input_scale`` per input column: the same function in float activations, on the
grid only up to that per-input-channel scale. A layer with an online Hadamard H (``x H`` first) gets that
weight times H^T. Any runtime loads the result; it is as large as the base model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..hadamard import apply_hadamard, hadamard_factors
from .folder import new_folder, write_model_files, write_safetensors
from .report import ExportReport
from .weights import QuantizedLinear, base_model, float_tensors, quantized_linears, warn_dropped_activation_quantization


def merged_weight(q: QuantizedLinear, dtype: torch.dtype) -> Tensor:
    """[out, in] float weight of one layer, with its smoothing factor folded into the input columns and its
    online Hadamard undone."""
    weight = q.dequantize(torch.float32)
    if q.input_scale is not None:
        weight = weight * q.input_scale.unsqueeze(0)
    if q.input_hadamard:
        weight = apply_hadamard(weight.double(), hadamard_factors(q.input_hadamard), transpose=True)
    return weight.to(dtype)


def save_merged(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Optional[Any] = None) -> ExportReport:
    """Write a plain transformers checkpoint of a ZeroQAT model (float weights in the model's dtype)."""
    dtype = base_model(model).get_input_embeddings().weight.dtype
    dropped = warn_dropped_activation_quantization(model)
    tensors = float_tensors(model)
    for name, q in quantized_linears(model).items():
        tensors[f"{name}.weight"] = merged_weight(q, dtype)
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias
    with new_folder(out_dir) as folder:
        write_safetensors(folder, tensors)
        write_model_files(folder, model, tokenizer, None)
    return ExportReport(Path(out_dir), f"merged float ({str(dtype).removeprefix('torch.')})", dropped, 0.0)
