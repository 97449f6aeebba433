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

from ..quant import pack_int, packed_shape, unpack_int
from ..tuner.layer import LayerQuantSpec, PackedWeight
from .folder import new_folder, write_model_files, write_safetensors
from .report import ExportReport
from .weights import (
    FLOAT_SCALE_DTYPES, QuantizedLinear, check_g_idx, check_layer_tensors, check_tensor, common_setting,
    float_tensors, plain_linears, quantized_linears, refuse_input_transforms, warn_dropped_activation_quantization,
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
    refuse_input_transforms(layers, "compressed-tensors")
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


# ------------------------------------------------------------------------------------------ reading

PACK_QUANTIZED = "pack-quantized"


def compressed_tensors_setting(quantization_config: dict[str, Any]) -> tuple[int, int, bool]:
    """(bits, group size or -1, symmetric) of a compressed-tensors ``quantization_config``; refuses what a packed
    ZeroQAT layer cannot hold exactly. ``dequantize: true`` is transformers' instruction to dequantize at load
    time: the tensors on disk are packed all the same, and are read as they are."""
    qc = quantization_config
    if qc.get("format") != PACK_QUANTIZED:
        raise ValueError(f"compressed-tensors format {qc.get('format')!r}: only {PACK_QUANTIZED!r} (integer codes "
                         "packed in int32 words) is read")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"compressed-tensors quantization_status {qc['quantization_status']!r}: the weights are not "
                         "stored compressed (packed); save the model compressed")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(key):
            raise ValueError(f"compressed-tensors {key}: a ZeroQAT model holds weight-only quantization, nothing more")
    groups = qc.get("config_groups") or {}
    settings = {_group_setting(name, group) for name, group in groups.items()}
    if len(settings) != 1:
        raise ValueError(f"compressed-tensors config_groups give {sorted(settings) or 'no'} weight settings (bits, "
                         "group size, symmetric): a ZeroQAT model holds exactly one")
    return settings.pop()


def _group_setting(name: str, group: dict[str, Any]) -> tuple[int, int, bool]:
    if group.get("format") not in (None, PACK_QUANTIZED):
        raise ValueError(f"compressed-tensors config group {name!r} has format {group['format']!r}, "
                         f"not {PACK_QUANTIZED!r}")
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError(f"compressed-tensors config group {name!r} quantizes activations: a ZeroQAT export is "
                         "weight-only and its activation quantization is not compressed-tensors'")
    w = group.get("weights") or {}
    bits = w.get("num_bits")
    if w.get("type", "int") != "int" or bits not in COMPRESSED_TENSORS_BITS:
        raise ValueError(f"compressed-tensors config group {name!r}: {w.get('type', 'int')} weights of {bits} bits; "
                         f"ZeroQAT reads int weights of {COMPRESSED_TENSORS_BITS} bits (3-bit has two layouts by "
                         "version)")
    if w.get("dynamic"):
        raise ValueError(f"compressed-tensors config group {name!r} has dynamic weight quantization")
    if w.get("actorder") in ("group", "dynamic"):
        raise ValueError(f"compressed-tensors config group {name!r} has actorder={w['actorder']!r}: its groups are not "
                         "runs of consecutive input columns, which is all a ZeroQAT layer holds")
    strategy, group_size = w.get("strategy"), w.get("group_size")
    if strategy == "group" and isinstance(group_size, int) and group_size > 0:
        return bits, group_size, bool(w.get("symmetric", True))
    if strategy == "channel":
        return bits, -1, bool(w.get("symmetric", True))
    raise ValueError(f"compressed-tensors config group {name!r}: strategy {strategy!r} with group_size {group_size!r}; "
                     "ZeroQAT holds 'group' (a positive group_size) or 'channel' quantization")


def compressed_tensors_packed(
    name: str, tensors: dict[str, Tensor], spec: LayerQuantSpec, in_features: int, out_features: int,
) -> PackedWeight:
    """One layer's pack-quantized tensors (by suffix, bias excepted) as ZeroQAT's packed storage for ``spec``. The
    codes are the words transposed (the same bit stream along the input); the zero points are unpacked (a
    symmetric layer has none on disk: 2**(bits-1)), the scales widened to float32 (exactly)."""
    bits, group_size, symmetric = spec.w_bits, spec.group_size, spec.symmetric
    optional = ("weight_g_idx", "weight_zero_point") if symmetric else ("weight_g_idx",)
    required = ("weight_packed", "weight_scale", "weight_shape") + (() if symmetric else ("weight_zero_point",))
    check_layer_tensors(name, tensors, required, optional)
    if tensors["weight_shape"].tolist() != [out_features, in_features]:
        raise ValueError(f"{name}.weight_shape is {tensors['weight_shape'].tolist()}, but the model's layer is "
                         f"[{out_features}, {in_features}]")
    n_groups = in_features // group_size
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    check_tensor(name, "weight_packed", packed, packed_shape(in_features, out_features, bits)[::-1], (torch.int32,))
    check_tensor(name, "weight_scale", scale, (out_features, n_groups), FLOAT_SCALE_DTYPES)
    if "weight_g_idx" in tensors:
        check_g_idx(name, tensors["weight_g_idx"], in_features, group_size)
    if "weight_zero_point" in tensors:
        stored = tensors["weight_zero_point"]
        check_tensor(name, "weight_zero_point", stored, packed_shape(out_features, n_groups, bits), (torch.int32,))
        zero = unpack_int(stored, bits, out_features)
    else:
        zero = torch.full((out_features, n_groups), 2 ** (bits - 1), dtype=torch.uint8)
    return PackedWeight(packed.t().contiguous(), scale.float().contiguous(), zero)
