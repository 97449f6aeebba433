"""Reading a GPTQ or compressed-tensors checkpoint folder back into a packed ZeroQAT model.

The model is built on the meta device (``zqat_peft.build``), wrapped with a ZeroQATConfig of the checkpoint's
setting, and each quantized layer's codes, scales and zero points go from the checkpoint's tensors straight
into its packed storage: no quantized layer ever has a float weight. Everything else (embeddings, norms, the
output embedding, biases) is read as it is. What a packed layer cannot hold exactly is refused.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Union

import torch
from peft import PeftModel
from transformers import AutoConfig, PretrainedConfig

from ..build import build_packed_model, checkpoint_tensor_names
from ..tuner import ZeroQATConfig
from .compressed_tensors import compressed_tensors_packed, compressed_tensors_setting
from .gptq import gptq_packed, gptq_setting

# quant_method -> the suffix of the tensor that marks a quantized layer in the checkpoint
QUANTIZED_WEIGHT_SUFFIX = {"gptq": "qweight", "compressed-tensors": "weight_packed"}


def load_quantized(
    folder: Union[str, os.PathLike], dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"
) -> PeftModel:
    """A ZeroQAT model (eval mode) from a GPTQ (v1 or gptq_v2) or compressed-tensors ``pack-quantized`` folder.

    Every quantized layer is a packed ``ZQATLinear`` whose per-group scales are what ZO training updates
    (``trainable="scales"``; call ``.train()`` to train); the other tensors are read in ``dtype``. The layers'
    weights equal the checkpoint's exactly (float16 GPTQ scales widen to float32 exactly). Refused, with what
    the checkpoint says: act-order, bit widths or group sizes ZeroQAT does not hold, activation or KV-cache
    quantization, per-layer settings, zero points a symmetric layer cannot have, and formats other than these.
    """
    folder = Path(folder)
    model_config = AutoConfig.from_pretrained(folder)
    quantization = _quantization_config(model_config, folder)
    method = quantization.get("quant_method")
    if method not in QUANTIZED_WEIGHT_SUFFIX:
        raise ValueError(f"{folder}: quant_method {method!r}; ZeroQAT reads {sorted(QUANTIZED_WEIGHT_SUFFIX)} "
                         "checkpoints (load others with transformers and export them again)")
    try:
        if method == "gptq":
            bits, group_size, symmetric, checkpoint_format = gptq_setting(quantization)
            read_packed = functools.partial(gptq_packed, checkpoint_format=checkpoint_format)
        else:
            bits, group_size, symmetric = compressed_tensors_setting(quantization)
            read_packed = compressed_tensors_packed
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e
    config = ZeroQATConfig(
        w_bits=bits, group_size=group_size, symmetric=symmetric, trainable="scales",
        target_modules=_quantized_layer_names(folder, QUANTIZED_WEIGHT_SUFFIX[method]),
    )
    if hasattr(model_config, "quantization_config"):  # the model built holds its quantization in its ZeroQAT layers
        del model_config.quantization_config
    return build_packed_model(model_config, config, dtype=dtype, device=device, checkpoint=folder,
                              read_packed=read_packed)


def _quantization_config(model_config: PretrainedConfig, folder: Path) -> dict[str, Any]:
    """config.json's ``quantization_config``, else GPTQModel's ``quantize_config.json`` next to it."""
    quantization = getattr(model_config, "quantization_config", None)
    if quantization is None and (folder / "quantize_config.json").is_file():
        quantization = {"quant_method": "gptq", **json.loads((folder / "quantize_config.json").read_text())}
    if quantization is None:
        raise ValueError(f"{folder} holds no quantization_config: it is not a quantized checkpoint. Load a float "
                         "checkpoint with transformers and wrap it with get_peft_model(model, ZeroQATConfig(...))")
    return quantization if isinstance(quantization, dict) else quantization.to_dict()


def _quantized_layer_names(folder: Path, suffix: str) -> list[str]:
    names = sorted(key[: -len(suffix) - 1] for key in checkpoint_tensor_names(folder) if key.endswith(f".{suffix}"))
    if not names:
        raise ValueError(f"{folder}: no tensor ends in .{suffix}, so no layer is stored quantized as the "
                         "quantization_config says")
    return names
