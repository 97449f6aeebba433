"""Bit packing of integer codes into GPTQ's int32 layout.

Layout: codes are packed along dim 0 in chunks of 32 rows. Each chunk is one little-endian
bitstream of ``32 * bits`` bits stored in ``bits`` consecutive int32 words: row ``j`` of the chunk
occupies stream bits ``[j*bits, (j+1)*bits)`` and word ``k`` holds stream bits ``[32k, 32k+32)``.

This matches the packing loop of GPTQ / AutoGPTQ (``QuantLinear.pack``): for 2/4/8 bits each
word holds ``32 // bits`` whole values, lowest row in the lowest bits; for 3 bits 32 values fill
3 words, with value 10 split across words 0/1 (2 low bits at bit 30 of word 0, top bit at bit 0
of word 1) and value 21 split across words 1/2 (low bit at bit 31 of word 1, 2 high bits at
bits 0-1 of word 2), which is exactly where a continuous bitstream puts them.

GPTQ's ``qweight`` is ``[in * bits / 32, out]``, so callers pack the transposed code matrix
``codes.T`` ([in, out]). Its ``qzeros`` is packed along the *output* dimension instead; pack
``zeros.T`` and transpose the result back for that.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from .primitives import check_weight_bits, cuda_kernels_for, dequantize_weight

_ROWS_PER_CHUNK = 32
_WORD_BITS = 32
# What the packed CUDA kernels write.
_KERNEL_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def packed_shape(rows: int, cols: int, bits: int) -> tuple[int, int]:
    """Shape of ``pack_int`` output for a [rows, cols] code matrix: ``(ceil(rows/32)*bits, cols)``."""
    check_weight_bits(bits)
    return math.ceil(rows / _ROWS_PER_CHUNK) * bits, cols


def _bit_position(row_in_chunk: int, bits: int) -> tuple[int, int]:
    """(word index within the chunk, bit offset within that word) where a row's value starts."""
    start = row_in_chunk * bits
    return start // _WORD_BITS, start % _WORD_BITS


def pack_int(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes along dim 0 into int32 words (GPTQ layout, see module docstring).

    Args:
        codes: integer tensor [rows, cols] with values in ``[0, 2**bits)``.
        bits: one of ``WEIGHT_BITS``.

    Returns:
        int32 [ceil(rows/32) * bits, cols]. Rows are zero-padded to a multiple of 32. Words are
        the two's-complement reinterpretation of the unsigned 32-bit patterns.
    """
    check_weight_bits(bits)
    if codes.dim() != 2 or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be a 2-D integer tensor, got {codes.dtype} {tuple(codes.shape)}")
    rows, cols = codes.shape
    n_rows_packed, _ = packed_shape(rows, cols, bits)
    n_chunks = n_rows_packed // bits
    # int64 so that shifts into bit 31 and beyond never overflow a signed 32-bit value.
    wide = codes.to(torch.int64)
    if wide.numel() and (wide.min() < 0 or wide.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}")

    padded = torch.zeros(n_chunks * _ROWS_PER_CHUNK, cols, dtype=torch.int64, device=codes.device)
    padded[:rows] = wide
    chunks = padded.view(n_chunks, _ROWS_PER_CHUNK, cols)

    words = torch.zeros(n_chunks, bits, cols, dtype=torch.int64, device=codes.device)
    for j in range(_ROWS_PER_CHUNK):
        word, offset = _bit_position(j, bits)
        value = chunks[:, j]
        words[:, word] |= (value << offset) & 0xFFFFFFFF
        spill = offset + bits - _WORD_BITS
        if spill > 0:  # the value straddles into the next word (3-bit only)
            words[:, word + 1] |= value >> (bits - spill)

    # Wrap [0, 2**32) into int32's range explicitly, rather than relying on a narrowing cast.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.view(n_rows_packed, cols).to(torch.int32)


def unpack_int(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Exact inverse of ``pack_int``.

    Args:
        packed: int32 [ceil(rows/32) * bits, cols].
        bits: one of ``WEIGHT_BITS``.
        rows: number of rows before padding.

    Returns:
        uint8 [rows, cols].
    """
    check_weight_bits(bits)
    n_rows_packed, cols = packed.shape
    expected, _ = packed_shape(rows, cols, bits)
    if n_rows_packed != expected:
        raise ValueError(
            f"packed has {n_rows_packed} rows, expected {expected} for rows={rows}, bits={bits}"
        )
    n_chunks = n_rows_packed // bits
    # Back to the unsigned 32-bit pattern, held in int64 so right shifts don't sign-extend.
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(n_chunks, bits, cols)

    mask = 2**bits - 1
    values = []
    for j in range(_ROWS_PER_CHUNK):
        word, offset = _bit_position(j, bits)
        value = words[:, word] >> offset
        spill = offset + bits - _WORD_BITS
        if spill > 0:
            value = value | (words[:, word + 1] << (bits - spill))
        values.append(value & mask)
    codes = torch.stack(values, dim=1).view(n_chunks * _ROWS_PER_CHUNK, cols)
    return codes[:rows].to(torch.uint8)


def packed_cuda_kernels_for(qweight: Tensor, scale: Tensor, zero: Tensor) -> Optional[Any]:
    """The CUDA extension when its packed-weight kernels take these tensors: int32 codes, float32 scales
    and uint8 zeros, contiguous on CUDA, no gradient needed; else None (the PyTorch path runs).

    The scales decide (``cuda_kernels_for`` checks the dtype of its first tensor only): the codes are
    int32, a dtype the elementwise kernels never take, and must not turn the packed kernels away.
    """
    if qweight.dtype != torch.int32 or scale.dtype != torch.float32 or zero.dtype != torch.uint8:
        return None
    return cuda_kernels_for(scale, qweight, zero)


def dequantize_packed(
    qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, in_features: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The weight [out, in] of GPTQ-packed codes: ``dequantize_weight(unpack_int(qweight).t(), scale, zero)``.

    On CUDA (no autograd, float32 scales, uint8 zeros) one kernel unpacks and dequantizes into W^T,
    returned as a transposed view; it computes the same bits.
    """
    ext = packed_cuda_kernels_for(qweight, scale, zero) if dtype in _KERNEL_OUT_DTYPES else None
    if ext is not None:
        wt = torch.empty(in_features, qweight.shape[1], dtype=dtype, device=qweight.device)
        ext.dequant_packed(qweight, scale, zero, wt, bits, in_features, 0)
        return wt.t()
    codes = unpack_int(qweight, bits, in_features).t()
    return dequantize_weight(codes, scale, zero, dtype=dtype)


def packed_linear(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, in_features: int, bias: Optional[Tensor] = None
) -> Tensor:
    """``F.linear(x, dequantize_packed(qweight, scales, zeros, bits, in_features, x.dtype), bias)``, on a kernel
    that never holds the whole float weight where one is built.

    Args:
        x: [..., in_features], float32 or bfloat16 for the CPU kernel (float16 too on CUDA).
        qweight, scales, zeros: the packed layer (int32 codes, float32 [out, n_groups], uint8 [out, n_groups]);
            ``scales`` is read at call time, so a perturbed tensor swapped in for it is what the kernel sees.
        bias: [out] in x's dtype, or None.

    Returns:
        [..., out] in x's dtype: the reference up to the GEMM's summation order (the decoded weights are the
        same bits). The kernels take no gradient: when x, scales or bias needs one, or no kernel is built for
        x's device and dtype (``ZQAT_NO_EXT=1``), the PyTorch reference above runs.
    """
    if packed_kernel_for(x, qweight, scales, zeros, bias) is not None:
        return torch.ops.zqat.packed_linear(x, qweight, scales, zeros, bias, bits, in_features)
    return F.linear(x, dequantize_packed(qweight, scales, zeros, bits, in_features, dtype=x.dtype), bias)


def packed_kernel_for(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor] = None
) -> Optional[Any]:
    """The extension ``zqat::packed_linear`` will run for these tensors, or None where the reference must run."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scales, bias)):
        return None
    if bias is not None and bias.dtype != x.dtype:
        return None
    if x.is_cuda:
        return packed_cuda_kernels_for(qweight, scales, zeros) if x.dtype in _KERNEL_OUT_DTYPES else None
    if x.device.type != "cpu" or x.dtype not in kernels.CpuPackedKernels.DTYPES:
        return None
    if qweight.dtype != torch.int32 or scales.dtype != torch.float32 or zeros.dtype != torch.uint8:
        return None
    return kernels.cpu_packed_ext()
