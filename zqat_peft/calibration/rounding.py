"""GPTQ rounding of one decoder block's layers, on the inputs they receive in the quantized model.

Layers that read the same tensor (q/k/v; gate/up) are rounded together, in the order the block calls
them, and each set's input statistics are gathered after the sets before it are rounded: a layer's
Hessian is that of the inputs it will really see (the earlier layers' rounding, activation
quantization and smoothing included). The grid is the one calibration chose (clipping, smoothing
folded in), or without learned clipping the grid search weighted by each input's power; `gptq_round`
picks the codes. The layer's master weight becomes either the rounded weight (clipping off: it lies on
the grid and spans it) or the weight as GPTQ compensated it (clipping kept: it rounds to the same codes),
so that fake quantization reproduces the codes, packing stores them, and ZO training starts from them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import dequantize_weight, quantize_weight, weight_qparams
from ..tuner.config import ZeroQATConfig
from ..tuner.layer import CLIP_INIT_LOGIT, ZQATLinear
from .blocks import BlockInput, run_block
from .clipping import init_clipping
from .gptq import add_to_hessian, gptq_round


class _Stop(Exception):
    pass


@torch.no_grad()
def gptq_round_block(
    block: nn.Module, layers: list[ZQATLinear], inputs: list[BlockInput], adapter: str, config: ZeroQATConfig
) -> dict[ZQATLinear, float]:
    """Round every layer of a calibrated block with GPTQ; returns each layer's output error (per token)."""
    dtype = next(block.parameters()).dtype
    errors = {}
    for stage in layers_by_input(block, layers, inputs[0], dtype):
        hessians = _stage_hessians(block, stage, inputs, dtype, adapter)
        for layer in stage:
            errors[layer] = round_layer(layer, hessians[layer], adapter, config)
    return errors


def round_layer(layer: ZQATLinear, hessian: torch.Tensor, adapter: str, config: ZeroQATConfig) -> float:
    """Replace the layer's master weight by its GPTQ rounding on the grid its clipping gives.

    ``config.gptq_master`` says which: ``"rounded"``, the dequantized codes (clipping then off: the rounded
    weight spans the clipped range), or ``"compensated"``, the weight as GPTQ rounded it (clipping kept),
    which ZO then moves from a point inside each code's interval rather than its centre.
    """
    spec = layer.zqat_spec[adapter]
    if config.calib_epochs == 0:  # the grid was not learned: search it again, weighted by the input power
        init_clipping(layer, adapter, input_power=hessian.diagonal())
    master = layer.zqat_weight[adapter]
    clip_lower, clip_upper = layer.zqat_clip_lower[adapter], layer.zqat_clip_upper[adapter]
    scale, zero = weight_qparams(master, spec.w_bits, spec.group_size, spec.symmetric, clip_lower, clip_upper)
    try:
        result = gptq_round(master, hessian, scale, zero, spec.w_bits, spec.symmetric,
                            config.gptq_block_size, config.gptq_damp, act_order=config.gptq_act_order)
    except ValueError as e:
        raise ValueError(f"GPTQ rounding of a {layer.out_features}x{layer.in_features} layer failed: {e}") from e
    rounded = dequantize_weight(result.codes, scale, zero, dtype=master.dtype)
    if config.gptq_master == "compensated":
        master.data.copy_(_on_codes(result.compensated.to(master.dtype), rounded, result.codes, spec,
                                    clip_lower, clip_upper))
    else:
        master.data.copy_(rounded)
        clip_lower.data.fill_(CLIP_INIT_LOGIT)  # the rounded weight spans exactly the clipped range
        clip_upper.data.fill_(CLIP_INIT_LOGIT)
    return result.output_error


def _on_codes(compensated: torch.Tensor, rounded: torch.Tensor, codes: torch.Tensor, spec, clip_lower, clip_upper):
    """``compensated``, except where the layer's own quantizer would not give it GPTQ's code (a value on a
    rounding boundary, or a grid that float rounding re-derives differently): there the rounded weight."""
    scale, zero = weight_qparams(compensated, spec.w_bits, spec.group_size, spec.symmetric, clip_lower, clip_upper)
    agrees = quantize_weight(compensated, scale, zero, spec.w_bits) == codes
    return torch.where(agrees, compensated, rounded)


def layers_by_input(block: nn.Module, layers: list[ZQATLinear], inp: BlockInput, dtype: torch.dtype) -> list[list[ZQATLinear]]:
    """The block's layers grouped by the tensor they read, groups in the order the block calls them."""
    groups: list[tuple[torch.Tensor, list[ZQATLinear]]] = []  # holding the tensors keeps their ids unique

    def hook(layer, args):
        for tensor, group in groups:
            if tensor is args[0]:
                group.append(layer)
                return
        groups.append((args[0], [layer]))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        run_block(block, inp, dtype)
    finally:
        for h in handles:
            h.remove()
    return [group for _, group in groups]


def _stage_hessians(block, stage, inputs, dtype, adapter) -> dict[ZQATLinear, torch.Tensor]:
    """Each stage layer's Hessian over all inputs; the forward stops once the stage has run."""
    hessians = {l: torch.zeros(l.in_features, l.in_features, device=inputs[0].hidden.device) for l in stage}
    counts = {l: 0 for l in stage}
    seen: set[ZQATLinear] = set()

    def hook(layer, args):
        counts[layer] = add_to_hessian(hessians[layer], counts[layer], _matmul_input(layer, args[0], adapter))
        seen.add(layer)
        if len(seen) == len(stage):
            raise _Stop

    handles = [layer.register_forward_pre_hook(hook) for layer in stage]
    try:
        for inp in inputs:
            seen.clear()
            try:
                run_block(block, inp, dtype)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return hessians


def _matmul_input(layer: ZQATLinear, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """What the layer multiplies its weight with: its input, rotated, smoothed and activation-quantized."""
    return layer.quantized_input(x, adapter)
