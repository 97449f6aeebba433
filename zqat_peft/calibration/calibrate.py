"""Block-wise calibration (OmniQuant-style, short): learn clipping and smoothing one block at a time.

For each decoder block: the block's full-precision output on the inputs it receives in the
quantized model is the target; the clipping logits of its layers (and, with activation
quantization, a smoothing scale s per group of layers that share an input, initialised
SmoothQuant-style from activation maxima) are trained with Adam to minimise the MSE between the
quantized block's output and that target. Then s is folded into the master weights, with
``rounding="gptq"`` each layer is rounded by GPTQ on that grid (`rounding.py`; with ``calib_epochs=0`` on the
grid searched by input-weighted error, `clipping.py`), frozen layers are packed, with
``calib_refine_epochs`` their scales (and the block's saved norms) are refined on the codes (`refine.py`),
and the quantized block's outputs become the next block's inputs. Peak memory is one block plus the
cached hidden states of the calibration set. Targeted layers outside the blocks (OPT's project_in /
project_out) get the clipping grid's best start only, and are packed if frozen, so a calibrated model
holds no frozen float layer.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..tuner.config import ZeroQATConfig
from ..tuner.layer import ZQATLinear
from .blocks import BlockInput, capture_first_block_inputs, find_decoder_blocks, move_input, run_block
from .clipping import init_clipping
from .refine import refine_block
from .rounding import gptq_round_block

def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    epochs: Optional[int] = None,
    lr: Optional[float] = None,
    smooth_lr: Optional[float] = None,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
) -> nn.Module:
    """Calibrate a ZeroQAT model created with ``init="calibrate"``; returns it, packed and ready to train.

    `batches` yields input-id tensors [batch, seq]. Settings default to the config's calib_* fields.
    With `device`, each block is moved there for its calibration and back afterwards, so a model far
    larger than the device calibrates in one block's memory plus the cached hidden states.
    """
    adapter, config = _zqat_config(model)
    epochs = config.calib_epochs if epochs is None else epochs
    lr = config.calib_lr if lr is None else lr
    smooth_lr = config.calib_smooth_lr if smooth_lr is None else smooth_lr
    batches = _check_batches(batches)
    blocks = find_decoder_blocks(model)
    was_training = model.training
    model.eval()
    quantize_layers_outside_blocks(model, blocks, adapter)  # before the first block's inputs pass through them
    inputs = capture_first_block_inputs(model, blocks[0], batches)
    home = inputs[0].hidden.device
    device = torch.device(device) if device is not None else home
    inputs = [move_input(inp, device) for inp in inputs]
    for block in tqdm(blocks, desc="calibrating blocks", disable=not progress):
        block.to(device)
        layers = [m for m in block.modules() if isinstance(m, ZQATLinear)]
        dtype = next(block.parameters()).dtype
        with _full_precision(layers), torch.no_grad():  # the targets of learned clipping and of refinement
            needed = epochs or config.calib_refine_epochs
            targets = [run_block(block, inp, dtype).float() for inp in inputs] if needed else []
        calibrate_block(block, layers, inputs, targets, adapter, config, epochs, lr, smooth_lr)
        if config.rounding == "gptq":
            gptq_round_block(block, layers, inputs, adapter, config)
        for layer in layers:
            if not layer.is_trained(adapter):
                layer.pack(adapter)
        refine_block(block, layers, inputs, targets, adapter, config.calib_refine_epochs, config.calib_refine_lr)
        with torch.no_grad():
            inputs = [BlockInput(run_block(block, inp, dtype).float(), inp.kwargs) for inp in inputs]
        block.to(home)
    config.calibrated = True
    model.train(was_training)
    return model


@torch.no_grad()
def quantize_layers_outside_blocks(model: nn.Module, blocks: nn.ModuleList, adapter: str) -> None:
    """Layers outside the decoder blocks (OPT's project_in / project_out) have no block output to calibrate
    against: they get the grid clipping with the least weight error, and the frozen ones are packed."""
    in_blocks = {id(m) for m in blocks.modules()}
    for layer in model.modules():
        if isinstance(layer, ZQATLinear) and id(layer) not in in_blocks and not layer.is_packed(adapter):
            init_clipping(layer, adapter)
            if not layer.is_trained(adapter):
                layer.pack(adapter)


def calibrate_block(
    block: nn.Module,
    layers: list[ZQATLinear],
    inputs: list[BlockInput],
    targets: list[torch.Tensor],
    adapter: str,
    config: ZeroQATConfig,
    epochs: int,
    lr: float,
    smooth_lr: float,
) -> None:
    """Learn the block's clipping logits (and smoothing scales), then fold and freeze them."""
    dtype = next(block.parameters()).dtype
    groups = _smoothing_groups(block, layers, inputs, dtype, adapter, config) if config.smooths else []
    smooth_params = [g.scale for g in groups]
    masters = {layer: layer.zqat_weight[adapter] for layer in layers}
    with torch.no_grad(), _smoothed(groups, masters, adapter):
        for layer in layers:
            init_clipping(layer, adapter)  # on the smoothed weight it will quantize
    clips = [c for layer in layers for c in (layer.zqat_clip_lower[adapter], layer.zqat_clip_upper[adapter])]
    trainable_state = {p: p.requires_grad for p in masters.values()}
    for p in masters.values():
        p.requires_grad_(False)
    for p in clips + smooth_params:
        p.requires_grad_(True)
    param_groups = [{"params": clips, "lr": lr}]
    if smooth_params:
        param_groups.append({"params": smooth_params, "lr": smooth_lr})
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    for _ in range(epochs):
        for inp, target in zip(inputs, targets):
            with torch.enable_grad(), _smoothed(groups, masters, adapter):
                loss = nn.functional.mse_loss(run_block(block, inp, dtype).float(), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    "Calibration loss became NaN/inf: lower calib_lr / calib_smooth_lr, or use init='rtn'."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        for group in groups:
            group.fold(masters, adapter)
    for p in clips + smooth_params:
        p.requires_grad_(False)
        p.grad = None
    for p, trainable in trainable_state.items():
        p.requires_grad_(trainable)


class _SmoothingGroup:
    """Layers that read the same input tensor share one smoothing scale s (so s could be folded into
    the norm before them): each computes (x / s) @ (W s)^T."""

    def __init__(self, layers: list[ZQATLinear], act_max: torch.Tensor, adapter: str, alpha: float) -> None:
        self.layers = layers
        w_max = torch.stack(
            [l.zqat_weight[adapter].detach().abs().amax(dim=0).float() for l in layers]
        ).amax(dim=0)
        s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
        self.scale = nn.Parameter(s.clamp(min=1e-5))

    def fold(self, masters: dict[ZQATLinear, nn.Parameter], adapter: str) -> None:
        s = self.scale.detach().clamp(min=1e-5)
        for layer in self.layers:
            masters[layer].data.mul_(s.to(masters[layer].dtype))
            layer.zqat_input_scale[adapter].data.copy_(1.0 / s)


def _smoothing_groups(block, layers, inputs, dtype, adapter, config) -> list[_SmoothingGroup]:
    """Group the block's layers by the input tensor they read, with per-channel |x| maxima."""
    seen: dict[ZQATLinear, torch.Tensor] = {}
    act_max: dict[ZQATLinear, torch.Tensor] = {}

    def hook(layer, args):
        x = args[0]
        seen[layer] = x
        m = layer.rotated_input(x.detach(), adapter).abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        act_max[layer] = torch.maximum(act_max[layer], m) if layer in act_max else m

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        with _full_precision(layers), torch.no_grad():
            for inp in inputs:
                seen.clear()
                run_block(block, inp, dtype)
                by_input = {}
                for layer, x in seen.items():
                    by_input.setdefault(id(x), []).append(layer)
                groups_seen = list(by_input.values())
    finally:
        for h in handles:
            h.remove()
    return [
        _SmoothingGroup(group, torch.stack([act_max[l] for l in group]).amax(dim=0), adapter, config.calib_alpha)
        for group in groups_seen
    ]


@contextlib.contextmanager
def _smoothed(groups: list[_SmoothingGroup], masters, adapter: str):
    """While learning s, each layer of a group sees W s as its master and 1/s as its input scale."""
    swapped = []
    for group in groups:
        s = group.scale.clamp(min=1e-5)
        for layer in group.layers:
            weights = layer.zqat_weight._parameters
            scales = layer.zqat_input_scale._parameters
            swapped.append((weights, scales, weights[adapter], scales[adapter]))
            weights[adapter] = masters[layer] * s.to(masters[layer].dtype)
            scales[adapter] = 1.0 / s
    try:
        yield
    finally:
        for weights, scales, w, sc in swapped:
            weights[adapter] = w
            scales[adapter] = sc


@contextlib.contextmanager
def _full_precision(layers: list[ZQATLinear]):
    for layer in layers:
        layer.fake_quant = False
    try:
        yield
    finally:
        for layer in layers:
            layer.fake_quant = True


def _zqat_config(model: nn.Module) -> tuple[str, ZeroQATConfig]:
    configs = getattr(model, "peft_config", None) or {}
    for adapter, config in configs.items():
        if isinstance(config, ZeroQATConfig):
            if config.init != "calibrate":
                raise ValueError("calibrate() needs a model made with ZeroQATConfig(init='calibrate').")
            if config.calibrated:
                raise ValueError("This model is already calibrated (its frozen layers are packed).")
            return adapter, config
    raise ValueError("calibrate() needs a ZeroQAT model: get_peft_model(model, ZeroQATConfig(init='calibrate', ...)).")


def _check_batches(batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    batches = list(batches)
    if not batches:
        raise ValueError("The calibration set is empty: pass at least one batch of input ids.")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.numel() == 0:
            raise ValueError(f"Calibration batches must be non-empty [batch, seq] tensors of input ids, got {getattr(b, 'shape', type(b))}.")
    return batches
