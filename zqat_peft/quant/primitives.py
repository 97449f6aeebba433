"""Quantization primitives: group-wise weight quantization and per-token activation fake quantization.

Conventions (shared with the GPTQ export path):

* A weight is ``[out_features, in_features]``. Groups run along the input dimension, so
  ``scale`` and ``zero`` are ``[out_features, n_groups]`` with
  ``n_groups = in_features // group_size``.
* Codes are unsigned integers in ``[0, 2**bits - 1]`` and dequantize as
  ``(code - zero) * scale``. ``zero`` is stored as float32 but always holds an integer value,
  so it can be packed into GPTQ's ``qzeros`` without loss.
* All arithmetic is float32 regardless of the input dtype, so bf16/fp16 models quantize to the
  same codes as their float32 upcast.

Without autograd, contiguous CUDA tensors go through the CUDA kernels of ``zqat_peft/cuda_ext/`` (one pass over
the tensor instead of a chain of PyTorch ops); they compute the same bits (tests/test_kernels.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..kernels import cuda_ext
from ..noise import WeightNoise

WEIGHT_BITS: tuple[int, ...] = (2, 3, 4, 8)
# 16 means "activation quantization off"; it is accepted so configs can name it explicitly.
ACT_BITS: tuple[int, ...] = (4, 6, 8, 16)

# Lower bound on scales: an all-zero group would otherwise give scale 0 and divide by zero.
# 1e-8 is far below any real weight/activation range, so it only ever triggers on such groups.
_MIN_SCALE = 1e-8
# The smallest activation clipping ratio: below it a token's range is mostly saturated (a ZO perturbation may push
# a trained ratio anywhere; the forward clamps it here and to 1).
MIN_CLIP_RATIO = 0.05
_M32 = 0xFFFFFFFF  # the noise kernels take seed and key mod 2**32, as zqat_peft.noise does


def check_weight_bits(bits: int, what: str = "w_bits") -> None:
    """Raise ``ValueError`` unless ``bits`` is a supported weight bit width (``WEIGHT_BITS``)."""
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ValueError(f"{what} must be one of {WEIGHT_BITS}, got {bits!r}")


def check_act_bits(bits: int, what: str = "a_bits") -> None:
    """Raise ``ValueError`` unless ``bits`` is a supported activation bit width (``ACT_BITS``)."""
    if isinstance(bits, bool) or bits not in ACT_BITS:
        raise ValueError(f"{what} must be one of {ACT_BITS} (16 = off), got {bits!r}")


def _suggest_group_size(group_size: int, in_features: int) -> int:
    """Largest power of two <= ``group_size`` that divides ``in_features`` (at least 1)."""
    candidate = 1
    while candidate * 2 <= group_size and in_features % (candidate * 2) == 0:
        candidate *= 2
    return candidate


def resolve_group_size(group_size: int, in_features: int, layer_name: str = "") -> int:
    """Turn a configured group size into the actual number of input columns per group.

    Args:
        group_size: -1 for one group per output channel, otherwise a positive divisor of
            ``in_features``.
        in_features: the layer's input dimension.
        layer_name: only used to make the error message point at the offending layer.

    Returns:
        The group size as a positive int (``in_features`` when ``group_size == -1``).
    """
    if group_size == -1:
        return in_features
    where = f"layer {layer_name!r}: " if layer_name else ""
    if group_size <= 0:
        raise ValueError(f"{where}group_size must be -1 (per output channel) or positive, got {group_size}")
    if in_features % group_size != 0:
        suggestion = _suggest_group_size(group_size, in_features)
        hint = f"group_size={suggestion} or -1" if suggestion > 1 else "group_size=-1"
        raise ValueError(
            f"{where}group_size={group_size} does not divide in_features={in_features}; "
            f"use {hint} (per output channel)"
        )
    return group_size


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (ties to even), with a straight-through gradient when one is needed.

    The STE form ``x + (round(x) - x).detach()`` has the same forward value up to float
    rounding; using plain ``round`` whenever no gradient is requested keeps inference and
    export paths exact.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (x.round() - x).detach()
    return x.round()


def _group_view(weight: Tensor, group_size: int) -> Tensor:
    """float32 view of ``weight`` [out, in] as [out, n_groups, group_size]."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    group_size = resolve_group_size(group_size, in_features)
    return weight.float().reshape(out_features, in_features // group_size, group_size)


def weight_qparams(
    weight: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_lower: Tensor | None = None,
    clip_upper: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-group scale and zero point for a weight matrix (min/max, optionally learnably clipped).

    Args:
        weight: [out, in], any float dtype.
        bits: one of ``WEIGHT_BITS``.
        group_size: -1 (per output channel) or a positive divisor of ``in``.
        symmetric: if True, ``zero`` is fixed at ``2**(bits-1)`` (GPTQ's unsigned-code symmetric
            convention) and ``scale = absmax / (2**(bits-1) - 1)``.
        clip_lower, clip_upper: OmniQuant-style learnable-weight-clipping logits, float
            [out, n_groups], or None for no clipping. The group range is shrunk to
            ``wmin * sigmoid(clip_lower)`` / ``wmax * sigmoid(clip_upper)``.

    Returns:
        ``(scale, zero)``, both float32 [out, n_groups]; ``scale >= 1e-8`` and ``zero`` holds
        integers in ``[0, 2**bits - 1]``. Differentiable w.r.t. the clip logits (and weight)
        through ``round_ste``.
    """
    check_weight_bits(bits)
    groups = _group_view(weight, group_size)
    # Including 0 in the range (as GPTQ does) makes 0.0 exactly representable.
    wmin = groups.amin(dim=-1).clamp(max=0.0)
    wmax = groups.amax(dim=-1).clamp(min=0.0)
    if clip_lower is not None:
        wmin = wmin * torch.sigmoid(clip_lower.float())
    if clip_upper is not None:
        wmax = wmax * torch.sigmoid(clip_upper.float())

    qmax = 2**bits - 1
    if symmetric:
        absmax = torch.maximum(-wmin, wmax)
        scale = (absmax / (2 ** (bits - 1) - 1)).clamp(min=_MIN_SCALE)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = ((wmax - wmin) / qmax).clamp(min=_MIN_SCALE)
        zero = round_ste(-wmin / scale).clamp(0, qmax)
    return scale, zero


def quantize_weight(weight: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Map a weight to integer codes: ``clamp(round(w / scale) + zero, 0, 2**bits - 1)``.

    Args:
        weight: [out, in], any float dtype (computed in float32).
        scale, zero: float [out, n_groups]; the group size is ``in // n_groups``.
        bits: one of ``WEIGHT_BITS``.

    Returns:
        Codes, uint8 [out, in]. Not differentiable (codes are integers).
    """
    check_weight_bits(bits)
    out_features, in_features = weight.shape
    groups = _group_view(weight, in_features // scale.shape[1])
    scale3, zero3 = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    codes = (torch.round(groups / scale3) + zero3).clamp(0, 2**bits - 1)
    return codes.reshape(out_features, in_features).to(torch.uint8)


@torch.no_grad()
def rounding_margin(weight: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """How far each element of a weight can move before the weight the forward uses changes, float32 [out, in].

    An element's quantized value changes when it crosses a rounding boundary (a half code) inside the grid
    (``scale``, ``zero``: ``weight_qparams`` of this weight); and the whole group's values change when its range
    does, which an element moves by becoming its group's minimum or maximum. The margin is the distance, in the
    weight's units, to the nearest of these: a rounding boundary, the group's minimum, its maximum (0 for the
    elements that set the range).
    """
    out_features, in_features = weight.shape
    groups = _group_view(weight, in_features // scale.shape[1])
    scale3 = scale.float().unsqueeze(-1)
    # in place where it can be: this runs on every trained weight once per ZO step
    position = (groups / scale3).add_(zero.float().unsqueeze(-1))  # in codes, before rounding and clamping
    qmax = 2**bits - 1
    boundary = torch.floor(position).add_(0.5).clamp_(0.5, qmax - 0.5)  # the nearest half code the grid has
    margin = position.sub_(boundary).abs_().mul_(scale3)
    to_min = groups - groups.amin(dim=-1, keepdim=True)
    to_max = torch.sub(groups.amax(dim=-1, keepdim=True), groups, out=boundary)
    margin = torch.minimum(margin, torch.minimum(to_min, to_max, out=to_min), out=margin)
    return margin.reshape(out_features, in_features)


def dequantize_weight(
    codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of ``quantize_weight``: ``(codes - zero) * scale`` in float32, cast to ``dtype``.

    Args:
        codes: integer [out, in].
        scale, zero: float [out, n_groups].
        dtype: dtype of the result.

    Returns:
        [out, in] tensor of ``dtype``.
    """
    out_features, in_features = codes.shape
    groups = _group_view(codes, in_features // scale.shape[1])
    weight = (groups - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return weight.reshape(out_features, in_features).to(dtype)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_kernels_for(x: Tensor, *others: Tensor | None) -> Optional[Any]:
    """The CUDA extension when ``x`` (and every other tensor given) is a contiguous CUDA tensor in a dtype
    the kernels take and nothing needs a gradient; else None (the PyTorch path runs)."""
    tensors = (x, *(t for t in others if t is not None))
    if not x.is_cuda or x.dtype not in _KERNEL_DTYPES or _needs_grad(*tensors):
        return None
    if not all(t.is_cuda and t.is_contiguous() for t in tensors):
        return None
    return cuda_ext()


def fake_quantize_weight(
    weight: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_lower: Tensor | None = None,
    clip_upper: Tensor | None = None,
    noise: WeightNoise | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Quantize-then-dequantize a weight, keeping its shape [out, in].

    Without gradients this is literally ``dequantize_weight(quantize_weight(...))``, so it agrees
    bit for bit with what an exported (packed) checkpoint computes. When the weight or a clip
    logit requires grad, the same formula is evaluated with ``round_ste`` so gradients reach the
    clip logits (through scale and zero) and the weight (straight-through inside the range).
    See ``weight_qparams`` for the arguments.

    ``noise`` quantizes ``noise.applied_to(weight)`` instead of ``weight`` (a ZO perturbation), bit for bit;
    the CUDA kernel generates the noise while it quantizes, so no perturbed copy of the weight is written (a
    noise with a mask, which the kernel does not take, runs the PyTorch path). It takes no gradient.

    The result is computed in float32 and rounded once to ``dtype`` (default: the weight's), so a forward
    in bfloat16 gets its weight without a float32 copy in between (the CUDA kernel writes ``dtype``).
    """
    if noise is not None and _needs_grad(weight, clip_lower, clip_upper):
        raise ValueError("fake_quantize_weight: a noise-perturbed weight takes no gradient; run it under torch.no_grad()")
    clips_float32 = all(c is None or c.dtype == torch.float32 for c in (clip_lower, clip_upper))
    dtype = dtype or weight.dtype
    kernel_ok = clips_float32 and dtype in _KERNEL_DTYPES and (noise is None or noise.mask is None)
    ext = cuda_kernels_for(weight, clip_lower, clip_upper) if kernel_ok else None
    if ext is not None:
        seed, key, scale = (noise.seed, noise.key, noise.scale) if noise is not None else (0, 0, 0.0)
        out = torch.empty_like(weight, dtype=dtype)
        ext.perturbed_fake_quant_weight(weight, out, seed & _M32, key & _M32, float(scale), clip_lower, clip_upper,
                                        bits, group_size, symmetric)
        return out
    if noise is not None:
        weight = noise.applied_to(weight)
    scale, zero = weight_qparams(weight, bits, group_size, symmetric, clip_lower, clip_upper)
    if not _needs_grad(weight, clip_lower, clip_upper):
        codes = quantize_weight(weight, scale, zero, bits)
        return dequantize_weight(codes, scale, zero, dtype=dtype)

    out_features, in_features = weight.shape
    groups = _group_view(weight, in_features // scale.shape[1])
    scale3, zero3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
    codes = (round_ste(groups / scale3) + zero3).clamp(0, 2**bits - 1)
    fake = (codes - zero3) * scale3
    return fake.reshape(out_features, in_features).to(dtype)


def fake_quantize_activation(
    x: Tensor, bits: int, group_size: int = -1, clip_ratio: Optional[Tensor] = None
) -> Tensor:
    """Per-token dynamic asymmetric fake quantization along the last dimension.

    Each token (and, with ``group_size``, each slice of ``group_size`` channels, e.g. one
    attention head) gets its own min/max range, widened to include 0.

    Args:
        x: [..., D], any float dtype (computed in float32).
        bits: one of ``ACT_BITS``; 16 returns ``x`` itself unchanged.
        group_size: -1 for the whole last dim, else a positive divisor of D.
        clip_ratio: a scalar tensor in (0, 1] (clamped to [``MIN_CLIP_RATIO``, 1]): each range is shrunk to
            this fraction of itself and the values beyond it saturate (QuaRot clips activations at 0.9). At 4
            bits a few outlier values per token otherwise set a step too coarse for the rest. None: no clipping.
            The CUDA kernel has no clipping: with a ratio the PyTorch path runs on every device.

    Returns:
        Tensor with the shape and dtype of ``x``. Differentiable via ``round_ste``.
    """
    check_act_bits(bits)
    if bits == 16:
        return x
    last = x.shape[-1]
    group_size = resolve_group_size(group_size, last, layer_name="activation")
    ext = cuda_kernels_for(x) if clip_ratio is None else None
    if ext is not None:
        out = torch.empty_like(x)
        ext.fake_quant_activation(x, out, bits, group_size)
        return out
    groups = x.float().reshape(*x.shape[:-1], last // group_size, group_size)

    qmax = 2**bits - 1
    xmin = groups.amin(dim=-1, keepdim=True).clamp(max=0.0)
    xmax = groups.amax(dim=-1, keepdim=True).clamp(min=0.0)
    if clip_ratio is not None:
        ratio = clip_ratio.float().clamp(MIN_CLIP_RATIO, 1.0)
        xmin, xmax = xmin * ratio, xmax * ratio
    scale = ((xmax - xmin) / qmax).clamp(min=_MIN_SCALE)
    zero = torch.round(-xmin / scale)
    codes = (round_ste(groups / scale) + zero).clamp(0, qmax)
    return ((codes - zero) * scale).reshape(x.shape).to(x.dtype)
