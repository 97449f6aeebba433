"""GPTQ rounding: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the layer's input statistics (Frantar et al., 2022).

A layer computes ``y = x W^T``; with ``H = 2/n sum_t x_t x_t^T`` over the calibration tokens, the
output error of a quantized weight ``Q`` is ``tr((W - Q) H (W - Q)^T) / 2`` per token. Rounding the
columns in order and correcting the later ones with the upper Cholesky factor ``U`` of ``H^-1``
(``w[:, k] -= e_j U[j, k]`` for ``k > j``, ``e_j = (w_j - q_j) / U[j, j]``) minimises it greedily,
one column at a time; blocks of columns defer the update of the columns after the block to one
matrix product. Columns go in their natural order (no act-order), so groups keep the layout the
packed format and the GPTQ export expect.

The quantization grid (per-group ``scale`` and ``zero``) is given and fixed: calibration chooses it
(learned or MSE-searched clipping); this module only chooses the codes. Everything here is a pure
function of tensors; walking a model's blocks is `zqat_peft.calibration.rounding`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from ..quant import check_weight_bits


def add_to_hessian(hessian: Tensor, n_tokens: int, inputs: Tensor) -> int:
    """Fold a batch of layer inputs into the running ``H = 2/n sum x x^T``, in place.

    Args:
        hessian: float32 [in, in], the mean over the ``n_tokens`` tokens seen so far (zeros at first).
        n_tokens: how many tokens ``hessian`` averages.
        inputs: [..., in], any float dtype: one row per token.

    Returns:
        The new token count.
    """
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(hessian.dtype)
    total = n_tokens + x.shape[0]
    hessian.mul_(n_tokens / total)
    hessian.addmm_(x.t(), x, alpha=2.0 / total)
    return total


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The codes GPTQ may choose: the whole ``[0, 2**bits - 1]``, or for symmetric quantization
    (zero at ``2**(bits-1)``) the ``2**bits - 1`` codes symmetric about zero, ``[1, 2**bits - 1]``."""
    check_weight_bits(bits)
    return (1 if symmetric else 0), 2**bits - 1


class GPTQRounding(NamedTuple):
    """What `gptq_round` gives.

    codes: uint8 [out, in], in `code_range`.
    compensated: float32 [out, in], a weight that rounds to ``codes`` on the grid: each column as GPTQ
        rounded it, i.e. after the compensation of the columns before it, kept within its group's
        ``[min, max]`` (and, with ``keep_range``, the group's extremes at their own values), so that it
        re-derives the same grid. A master weight set to it starts where GPTQ ends, off the grid points.
    output_error: the squared output error per token summed over outputs,
        ``tr((W - Q) H (W - Q)^T) / 2`` with the undamped H.
    """

    codes: Tensor
    compensated: Tensor
    output_error: float


def gptq_round(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    symmetric: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    keep_range: bool = True,
    act_order: bool = False,
) -> GPTQRounding:
    """GPTQ codes for ``weight`` on the grid ``(scale, zero)``.

    Args:
        weight: [out, in], any float dtype (computed in float32).
        hessian: [in, in], ``2/n sum x x^T`` of the layer's inputs (see `add_to_hessian`).
        scale, zero: float [out, n_groups], groups of ``in // n_groups`` columns (as `weight_qparams`
            gives them); codes dequantize as ``(code - zero) * scale``.
        bits: one of ``WEIGHT_BITS``.
        symmetric: codes stay in the symmetric range (`code_range`).
        block_size: columns per block of deferred updates (speed only; the result does not depend on it
            beyond float rounding).
        damp: fraction of the mean of ``diag(H)`` added to its diagonal before inverting (GPTQ's
            dampening: keeps the inverse stable when inputs are nearly collinear).
        keep_range: the weights at each group's minimum and maximum keep the codes round-to-nearest gives
            them (the ends of the clipped range), so that the quantized group still spans the whole grid: a
            master weight set to ``dequantize(codes)`` then re-derives the same ``scale`` and ``zero`` (and the
            same codes) when it is fake-quantized. Their rounding error is compensated like any other.
        act_order: visit the columns in decreasing ``diag(H)`` order, each in its own group (see above).

    Returns:
        `GPTQRounding`: the codes, the compensated weight, the output error.

    Raises:
        ValueError: shapes disagree, or H is not positive definite even after dampening.
    """
    check_weight_bits(bits)
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian must be [in, in] = [{in_features}, {in_features}], got {tuple(hessian.shape)}")
    if scale.shape != zero.shape or scale.shape[0] != out_features or in_features % scale.shape[1]:
        raise ValueError(f"scale/zero {tuple(scale.shape)} do not fit a weight {tuple(weight.shape)} in groups")
    if block_size < 1 or damp < 0:
        raise ValueError(f"block_size must be positive and damp non-negative, got {block_size} and {damp}")
    group_size = in_features // scale.shape[1]
    col_scale = scale.float().repeat_interleave(group_size, dim=1)  # [out, in]
    col_zero = zero.float().repeat_interleave(group_size, dim=1)
    lo, hi = code_range(bits, symmetric)
    pins = _range_pins(weight.float(), col_scale, col_zero, group_size, lo, hi) if keep_range else None
    pinned = pins[0] if pins is not None else None  # in the weight's own column order

    work = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # inputs that are always zero: their weights never matter
    h.diagonal()[dead] = 1.0
    work[:, dead] = 0.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:  # round in this order: permute the columns, round, permute back
        work, h, col_scale, col_zero = work[:, order], h[order][:, order], col_scale[:, order], col_zero[:, order]
        pins = (pins[0][:, order], pins[1][:, order]) if pins is not None else None
    u = _inverse_cholesky_upper(h, damp)

    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    compensated = torch.empty_like(work)
    with _one_cpu_thread():
        _round_columns(work, u, col_scale, col_zero, pins, lo, hi, block_size, codes, compensated)
    if order is not None:
        inverse = torch.argsort(order)
        codes, compensated, col_scale, col_zero = (
            t[:, inverse] for t in (codes, compensated, col_scale, col_zero))
    compensated = _within_group_range(compensated, weight.float(), group_size)
    if pinned is not None:  # the extremes at their own values (their codes are round-to-nearest's)
        compensated = torch.where(pinned, weight.float(), compensated)

    diff = weight.float() - (codes.float() - col_zero) * col_scale
    output_error = ((diff @ hessian.float()) * diff).sum().item() / 2
    return GPTQRounding(codes, compensated, output_error)


def _within_group_range(compensated: Tensor, weight: Tensor, group_size: int) -> Tensor:
    """``compensated`` clamped to each group's ``[min, max]`` of ``weight``: a value beyond the range has the
    end's code anyway, and within it the result re-derives the weight's grid."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, -1, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    return torch.minimum(torch.maximum(compensated.reshape_as(groups), low), high).reshape(out_features, in_features)


def _round_columns(work: Tensor, u: Tensor, col_scale: Tensor, col_zero: Tensor, pins, lo: int, hi: int,
                   block_size: int, codes: Tensor, compensated: Tensor) -> None:
    """GPTQ's column loop: rounds ``work`` [out, in] column by column into ``codes``, spreading each
    column's error over the columns after it (``work`` is updated in place); each column's value at
    its rounding goes to ``compensated``."""
    in_features = work.shape[1]
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = work[:, start:end]  # a view: updated in place
        scaled_errors = torch.empty_like(block)
        for j in range(end - start):
            col = start + j
            compensated[:, col] = block[:, j]
            code = (torch.round(block[:, j] / col_scale[:, col]) + col_zero[:, col]).clamp(lo, hi)
            if pins is not None:
                code = torch.where(pins[0][:, col], pins[1][:, col], code)
            quantized = (code - col_zero[:, col]) * col_scale[:, col]
            err = (block[:, j] - quantized) / u[col, col]
            block[:, j:] -= err[:, None] * u[col, col:end][None, :]
            scaled_errors[:, j] = err
            codes[:, col] = code.to(torch.uint8)
        work[:, end:] -= scaled_errors @ u[start:end, end:]


@contextmanager
def _one_cpu_thread():
    """The column loop is thousands of operations on vectors of a few hundred floats: split across threads,
    each waits on the others, which costs more than it saves (a 1536 x 576 layer: 3 s on one thread, 30 s
    on two of a busy 2-core CPU). The thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_cholesky_upper(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, float32 (factorized in float64)."""
    h = hessian.double()
    h.diagonal().add_(damp * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(
            "The layer's input Hessian is not positive definite even after dampening: raise gptq_damp "
            "(e.g. 0.1) or give more calibration tokens."
        )
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True).float()


def _range_pins(weight: Tensor, col_scale: Tensor, col_zero: Tensor, group_size: int, lo: int, hi: int):
    """(mask, codes) [out, in]: each group's smallest and largest weight, at its round-to-nearest code."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, -1, group_size)
    offsets = torch.arange(0, in_features, group_size, device=weight.device)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool, device=weight.device)
    for extreme in (groups.argmin(dim=-1), groups.argmax(dim=-1)):
        mask.scatter_(1, extreme + offsets, True)
    rtn = (torch.round(weight / col_scale) + col_zero).clamp(lo, hi)
    return mask, rtn
