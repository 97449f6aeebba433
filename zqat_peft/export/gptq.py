"""GPTQ checkpoints (transformers via optimum + GPTQModel, GPTQModel, vLLM).

Per quantized Linear ``X``: ``X.qweight`` int32 [in*bits/32, out] (codes packed along the input),
``X.qzeros`` int32 [n_groups, out*bits/32] (zero points packed along the output), ``X.scales`` float16
[n_groups, out], ``X.g_idx`` int32 [in] (``i // group_size``, no act-order) and ``X.bias``. The bit order
is the dense little-endian stream of ``zqat_peft.quant.packing`` (3-bit values straddle words), which is
GPTQ's.

Zero points: the original format (``gptq``, "v1") stores ``z - 1`` and its readers add 1 back, so a group
with ``z = 0`` cannot be written (its -1 borrows from the neighbouring field). ``gptq_v2`` stores ``z``.
A checkpoint is written as v1 when every zero point is at least 1 (any loader reads it), else as v2
(GPTQModel, transformers with GPTQModel, vLLM's gptq_gemm).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import __version__
from ..quant import pack_int, packed_shape, unpack_int
from ..tuner.layer import LayerQuantSpec, PackedWeight
from .folder import new_folder, write_model_files, write_safetensors
from .report import ExportReport
from .weights import (
    FLOAT_SCALE_DTYPES, QuantizedLinear, base_model, check_g_idx, check_layer_tensors, check_tensor, common_setting,
    float_tensors, plain_linears, quantized_linears, refuse_input_transforms, tied_output_embedding_name,
    warn_dropped_activation_quantization, warn_fp16_scales,
)

GPTQ_V1, GPTQ_V2 = "gptq", "gptq_v2"
GPTQ_BITS = (2, 3, 4, 8)


def gptq_qweight(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [out, in] -> int32 [in*bits/32, out], packed along the input dimension."""
    return pack_int(codes.t(), bits)


def gptq_qzeros(zero: Tensor, bits: int, checkpoint_format: str) -> Tensor:
    """uint8 zero points [out, n_groups] -> int32 [n_groups, out*bits/32]; v1 stores ``z - 1``."""
    stored = zero.to(torch.int64)
    if checkpoint_format == GPTQ_V1:
        if bool((stored < 1).any()):
            raise ValueError("a zero point of 0 cannot be written in the gptq (v1) format; write gptq_v2")
        stored = stored - 1
    return pack_int(stored, bits).t().contiguous()


def gptq_g_idx(in_features: int, group_size: int) -> Tensor:
    """int32 [in]: the group of each input column."""
    return (torch.arange(in_features, dtype=torch.int32) // group_size).to(torch.int32)


def gptq_tensors(q: QuantizedLinear, checkpoint_format: str) -> dict[str, Tensor]:
    """The GPTQ tensors of one layer, by their suffix (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``)."""
    for what, size in (("in_features", q.in_features), ("out_features", q.out_features)):
        if size % 32:
            raise ValueError(f"GPTQ packs 32 values per {q.bits} words: {what}={size} is not a multiple of 32")
    tensors = {
        "qweight": gptq_qweight(q.codes, q.bits),
        "qzeros": gptq_qzeros(q.zero, q.bits, checkpoint_format),
        "scales": q.scale.t().contiguous().to(torch.float16),
        "g_idx": gptq_g_idx(q.in_features, q.group_size),
    }
    if q.bias is not None:
        tensors["bias"] = q.bias
    return tensors


def choose_checkpoint_format(layers: dict[str, QuantizedLinear]) -> str:
    """v1 when it is exact (every zero point >= 1), else v2."""
    return GPTQ_V1 if all(bool((q.zero >= 1).all()) for q in layers.values()) else GPTQ_V2


def gptq_quantization_config(bits: int, group_size: int, symmetric: bool, checkpoint_format: str) -> dict[str, Any]:
    """``quantization_config`` of config.json, as transformers' GPTQConfig and vLLM read it."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": symmetric,
        "lm_head": False,
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "true_sequential": True,
        "meta": {"quantizer": [f"zqat_peft:{__version__}"]},
    }


def save_gptq(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Optional[Any] = None,
    checkpoint_format: Optional[str] = None,
) -> ExportReport:
    """Write a GPTQ checkpoint folder of a ZeroQAT model (trained layers quantized with their clipping).

    ``checkpoint_format``: ``"gptq"`` (v1), ``"gptq_v2"`` or None (v1 when exact, else v2).
    Refuses smoothed layers, mixed settings and plain linear layers inside the decoder blocks (GPTQ loaders
    quantize all of them); the scales are stored in float16 (a warning gives the largest weight change).
    """
    layers = quantized_linears(model)
    refuse_input_transforms(layers, "GPTQ")
    bits, group_size, symmetric = common_setting(layers, "GPTQ")
    plain = [n for n in plain_linears(model) if f"{n}.weight" != _output_embedding_weight(model)]
    if plain:
        raise ValueError(
            f"GPTQ loaders quantize every linear layer of the decoder blocks, but {plain[:3]} are not quantized; "
            "export with format 'compressed-tensors' (which lists them as ignored) or 'merged'"
        )
    chosen = checkpoint_format or choose_checkpoint_format(layers)
    if chosen not in (GPTQ_V1, GPTQ_V2):
        raise ValueError(f"checkpoint_format must be {GPTQ_V1!r} or {GPTQ_V2!r}, got {chosen!r}")
    dropped = warn_dropped_activation_quantization(model)
    change = warn_fp16_scales(layers, "GPTQ")
    tensors = float_tensors(model)
    for name, q in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in gptq_tensors(q, chosen).items()})
    with new_folder(out_dir) as folder:
        write_safetensors(folder, tensors)
        write_model_files(folder, model, tokenizer, gptq_quantization_config(bits, group_size, symmetric, chosen))
    return ExportReport(Path(out_dir), f"gptq ({chosen})", dropped, change)


def _output_embedding_weight(model: nn.Module) -> Optional[str]:
    base = base_model(model)
    out = base.get_output_embeddings()
    if out is None:
        return None
    return tied_output_embedding_name(base) or next(f"{n}.weight" for n, m in base.named_modules() if m is out)


# ------------------------------------------------------------------------------------------ reading


def gptq_setting(quantization_config: dict[str, Any]) -> tuple[int, int, bool, str]:
    """(bits, group size or -1, symmetric, checkpoint format) of a GPTQ ``quantization_config``; refuses what a
    packed ZeroQAT layer cannot hold exactly."""
    qc = quantization_config
    bits, group_size = qc.get("bits"), qc.get("group_size")
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits={bits!r}: ZeroQAT holds {GPTQ_BITS}-bit weights")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"GPTQ group_size={group_size!r}: ZeroQAT takes a positive group size or -1 (per channel)")
    if qc.get("desc_act"):
        raise ValueError("GPTQ desc_act=true (act-order): its groups are not runs of consecutive input columns, "
                         "which is all a ZeroQAT layer holds; quantize without act-order")
    if qc.get("lm_head"):
        raise ValueError("GPTQ lm_head=true: ZeroQAT does not quantize the output embedding")
    if qc.get("dynamic"):
        raise ValueError("GPTQ 'dynamic' per-layer settings: ZeroQAT holds one setting for every layer")
    if qc.get("pack_dtype", "int32") != "int32":
        raise ValueError(f"GPTQ pack_dtype={qc['pack_dtype']!r}: only int32 words are read")
    formats = {qc[key] for key in ("checkpoint_format", "format") if qc.get(key) is not None} or {GPTQ_V1}
    if len(formats) != 1 or not formats <= {GPTQ_V1, GPTQ_V2}:
        raise ValueError(f"GPTQ checkpoint_format/format {sorted(formats)}: only {GPTQ_V1!r} (v1) and {GPTQ_V2!r} "
                         "are read (other formats repack the weights for one kernel)")
    return bits, group_size, bool(qc.get("sym", True)), formats.pop()


def gptq_packed(
    name: str, tensors: dict[str, Tensor], spec: LayerQuantSpec, in_features: int, out_features: int,
    checkpoint_format: str,
) -> PackedWeight:
    """One layer's GPTQ tensors (by suffix, bias excepted) as ZeroQAT's packed storage for ``spec``. The codes are
    GPTQ's words unchanged (the same layout); the zero points are unpacked (and v1's ``z - 1`` undone), the
    float16 scales widened to float32 (exactly)."""
    bits, group_size = spec.w_bits, spec.group_size
    check_layer_tensors(name, tensors, required=("qweight", "qzeros", "scales"), optional=("g_idx",))
    n_groups = in_features // group_size
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    check_tensor(name, "qweight", qweight, packed_shape(in_features, out_features, bits), (torch.int32,))
    zeros_shape = packed_shape(out_features, n_groups, bits)[::-1]
    check_tensor(name, "qzeros", qzeros, zeros_shape, (torch.int32,))
    check_tensor(name, "scales", scales, (n_groups, out_features), FLOAT_SCALE_DTYPES)
    if "g_idx" in tensors:
        check_g_idx(name, tensors["g_idx"], in_features, group_size)
    zero = unpack_int(qzeros.t().contiguous(), bits, out_features)
    if checkpoint_format == GPTQ_V1:
        if bool((zero == 2**bits - 1).any()):
            raise ValueError(f"{name}: a gptq (v1) zero point field of all ones is a zero point of 0 written as -1, "
                             "whose bits spill into the neighbouring fields: v1 cannot hold it; export as gptq_v2")
        zero = zero + 1
    return PackedWeight(qweight.contiguous(), scales.t().float().contiguous(), zero.contiguous())
