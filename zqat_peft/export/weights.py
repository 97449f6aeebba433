"""What an export reads from a ZeroQAT model: each quantized layer's codes, scales and zero points, and the
float tensors of everything else.

A trained layer is quantized from its master weight with its learned clipping (what ``ZQATLinear.pack``
would store); a packed layer gives its stored codes. Both come out as one `QuantizedLinear`, so every format
writes from the same integers. Nothing here changes the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..quant import dequantize_weight, quantize_weight, unpack_int, weight_qparams
from ..tuner import ZQATLinear


class ExportWarning(UserWarning):
    """Something the exported checkpoint does not carry (activation quantization, scale precision)."""


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized nn.Linear: ``weight = (codes - zero) * scale`` per group of ``group_size`` input columns.

    codes: uint8 [out, in] in [0, 2**bits); scale: float32 [out, n_groups]; zero: uint8 [out, n_groups].
    ``input_scale`` is the smoothing factor 1/s per input channel (float32 [in]) or None; the layer then
    computes ``(x * input_scale) @ weight^T``. ``input_hadamard`` is the size of the Hadamard matrix H the
    layer multiplies its input by first (``((x H) * input_scale) @ weight^T``), 0 for none.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    symmetric: bool
    bias: Optional[Tensor] = None
    input_scale: Optional[Tensor] = None
    input_hadamard: int = 0

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight on the grid, [out, in] (the smoothing factor not applied)."""
        return dequantize_weight(self.codes, self.scale, self.zero, dtype=dtype)

    def is_smoothed(self) -> bool:
        return self.input_scale is not None and not bool(torch.all(self.input_scale == 1))


@torch.no_grad()
def quantized_linear(layer: ZQATLinear, adapter: Optional[str] = None) -> QuantizedLinear:
    """The codes, scales and zero points of one ZeroQAT layer (CPU tensors)."""
    adapter = adapter or layer.active_adapters[0]
    spec = layer.zqat_spec[adapter]
    if layer.is_packed(adapter):
        codes = unpack_int(layer.zqat_qweight[adapter].cpu(), spec.w_bits, layer.in_features).t()
        scale = layer.zqat_scales[adapter].detach().float().cpu()
        zero = layer.zqat_zeros[adapter].cpu().to(torch.uint8)
    else:
        master = layer.zqat_weight[adapter].detach().cpu()
        clips = (layer.zqat_clip_lower[adapter].detach().cpu(), layer.zqat_clip_upper[adapter].detach().cpu())
        scale, zero = weight_qparams(master, spec.w_bits, spec.group_size, spec.symmetric, *clips)
        codes = quantize_weight(master, scale, zero, spec.w_bits)
        zero = zero.to(torch.uint8)
    bias = layer.get_base_layer().bias
    input_scale = layer.zqat_input_scale[adapter].detach().float().cpu() if adapter in layer.zqat_input_scale else None
    return QuantizedLinear(
        codes=codes.contiguous(), scale=scale.contiguous(), zero=zero.contiguous(), bits=spec.w_bits,
        group_size=spec.group_size, symmetric=spec.symmetric,
        bias=None if bias is None else bias.detach().cpu(), input_scale=input_scale,
        input_hadamard=spec.input_hadamard,
    )


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def zqat_layers(model: nn.Module) -> dict[str, ZQATLinear]:
    """Every ZeroQAT layer by its name in the transformers model (e.g. ``model.layers.0.self_attn.q_proj``)."""
    layers = {name: m for name, m in base_model(model).named_modules() if isinstance(m, ZQATLinear)}
    if not layers:
        raise ValueError("the model has no ZeroQAT layers: export a model wrapped by get_peft_model(model, ZeroQATConfig(...))")
    return layers


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: quantized_linear(layer) for name, layer in zqat_layers(model).items()}


def float_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors of everything that is not a ZeroQAT layer, by their plain checkpoint names.

    The output embedding is left out when it is tied to the input embedding (the loaders tie it again).
    """
    base = base_model(model)
    skip = tuple(f"{name}." for name in zqat_layers(model))
    named = ((checkpoint_name(name), t) for name, t in base.state_dict().items() if not name.startswith(skip))
    tensors = {name: t.detach().cpu() for name, t in named if name is not None}
    tied = tied_output_embedding_name(base)
    if tied is not None:
        tensors.pop(tied, None)
    return tensors


def checkpoint_name(name: str) -> Optional[str]:
    """The plain checkpoint name of a tensor or module of the base model: a module trained through peft's
    ``modules_to_save`` (``X.modules_to_save.<adapter>.weight``) is written as the module itself (``X.weight``);
    its frozen original (``X.original_module.weight``) is not written (None). A ZeroQAT model has one adapter."""
    parts = name.split(".")
    if "original_module" in parts:
        return None
    if "modules_to_save" in parts:
        at = parts.index("modules_to_save")
        del parts[at:at + 2]
    return ".".join(parts)


def tied_output_embedding_name(base: nn.Module) -> Optional[str]:
    """The checkpoint name of the output embedding's weight when it is the input embedding's, else None."""
    out, inp = base.get_output_embeddings(), base.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    return next(f"{name}.weight" for name, m in base.named_modules() if m is out)


def plain_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers that ZeroQAT does not quantize (the output embedding included)."""
    base = base_model(model)
    inside_zqat = {id(layer.get_base_layer()) for layer in zqat_layers(model).values()}
    plain = (name for name, m in base.named_modules() if type(m) is nn.Linear and id(m) not in inside_zqat)
    return [name for name in map(checkpoint_name, plain) if name is not None]


def common_setting(layers: dict[str, QuantizedLinear], fmt: str) -> tuple[int, int, bool]:
    """(bits, group size or -1 for per channel, symmetric), the same for every layer; else a clear error."""
    settings = {(q.bits, -1 if q.per_channel else q.group_size, q.symmetric) for q in layers.values()}
    if len(settings) != 1:
        raise ValueError(
            f"{fmt} holds one quantization setting per checkpoint, but the layers use {sorted(settings)} "
            "(bits, group size, symmetric); export with format 'merged' instead"
        )
    return settings.pop()


def refuse_input_transforms(layers: dict[str, QuantizedLinear], fmt: str) -> None:
    """Refuse layers that transform their input before the weight: a smoothing scale folded into the weight
    puts it on the grid only up to a per-input-channel scale; an online Hadamard is a runtime operation."""
    smoothed = [name for name, q in layers.items() if q.is_smoothed()]
    if smoothed:
        raise ValueError(
            f"{len(smoothed)} layers (e.g. {smoothed[0]}) carry a smoothing scale (weight-activation calibration): "
            f"folded into the weight it is on the quantization grid only up to a per-input-channel scale, which "
            f"{fmt} cannot hold. Export with format 'merged' (float weights computing the same function) instead"
        )
    rotated = [name for name, q in layers.items() if q.input_hadamard]
    if rotated:
        raise ValueError(
            f"{len(rotated)} layers (e.g. {rotated[0]}) multiply their input by a Hadamard matrix at run time "
            f"(rotate=True with online_hadamard): {fmt} has no such operation, and folded into the weight it "
            "leaves the quantization grid. Export with format 'merged' (float weights computing the same "
            "function), or quantize with online_hadamard=False"
        )


def warn_dropped_activation_quantization(model: nn.Module) -> list[str]:
    """Warn that activation/KV quantization is not part of a weight-only checkpoint; returns what was dropped."""
    dropped = set()
    for layer in zqat_layers(model).values():
        for spec in layer.zqat_spec.values():
            if spec.a_bits < 16:
                clipped = ", clipped to a trained fraction of each token's range" if layer.zqat_act_clip else ""
                dropped.add(f"input activations at {spec.a_bits} bits{clipped}")
            if spec.out_bits < 16:
                dropped.add(f"key/value outputs at {spec.out_bits} bits")
    if dropped:
        warnings.warn(
            f"activation quantization is not part of the exported checkpoint ({', '.join(sorted(dropped))}): "
            "it runs its activations in full precision", ExportWarning, stacklevel=3,
        )
    return sorted(dropped)


def fp16_scale_change(layers: dict[str, QuantizedLinear]) -> float:
    """Largest change of any weight when the scales are stored in float16 (0.0 when they are exact)."""
    largest = 0.0
    for name, q in layers.items():
        half = q.scale.half()
        if not torch.isfinite(half).all() or bool(((half == 0) & (q.scale != 0)).any()):
            raise ValueError(f"{name}: a scale lies outside float16's range, which this format stores scales in")
        if torch.equal(half.float(), q.scale):
            continue
        exact = q.dequantize()
        rounded = dequantize_weight(q.codes, half.float(), q.zero)
        largest = max(largest, float((rounded - exact).abs().max()))
    return largest


def warn_fp16_scales(layers: dict[str, QuantizedLinear], fmt: str) -> float:
    change = fp16_scale_change(layers)
    if change > 0:
        warnings.warn(
            f"{fmt} stores scales in float16: rounding the float32 scales changes weights by up to {change:.3g}",
            ExportWarning, stacklevel=3,
        )
    return change


# ------------------------------------------------------------------------------------------ reading back

# Scale dtypes read exactly into ZeroQAT's float32 scales.
FLOAT_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_layer_tensors(
    name: str, tensors: dict[str, Tensor], required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    """Refuse a quantized layer's checkpoint tensors that lack one it needs or hold one not understood (an
    activation scale, say, which the packed layer would silently not apply)."""
    missing = [s for s in required if s not in tensors]
    unknown = sorted(set(tensors) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(f"{name}: the checkpoint's tensors {sorted(tensors)} "
                         + (f"lack {missing}" if missing else f"include {unknown}, which a ZeroQAT layer cannot hold"))


def check_tensor(name: str, what: str, tensor: Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype not in dtypes:
        allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}.{what}: {tensor.dtype} {tuple(tensor.shape)} in the checkpoint, expected {allowed} "
                         f"{tuple(shape)} for this layer and the quantization_config")


def check_g_idx(name: str, g_idx: Tensor, in_features: int, group_size: int) -> None:
    """A group index is held exactly only when it puts consecutive columns in each group (no act-order)."""
    expected = torch.arange(in_features, dtype=torch.int64) // group_size
    if tuple(g_idx.shape) != (in_features,) or not torch.equal(g_idx.to(torch.int64), expected):
        raise ValueError(f"{name}: its group index reorders the input columns (act-order): a ZeroQAT layer holds "
                         "groups of consecutive columns only; quantize without act-order")
