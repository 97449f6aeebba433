"""Scale refinement after rounding: the codes stay, each group's scale (and the block's saved norms) moves.

Rounding (GPTQ, or to nearest) picks each weight's code on a grid chosen before the codes were known. Once
they are fixed, a group's scale is a free factor of its 64 weights, and the block's output decides it better
than the grid search did: a few epochs of Adam on the block's output MSE against its full-precision output
(the block-wise reconstruction of the ZeroQAT paper's initialization, here on the scales of packed layers
only, so the codes GPTQ chose are kept). The RMSNorm weights the adapter saves (``modules_to_save``) move
with them: a per-input-channel factor the per-group scales cannot express; so do the layers' activation clipping
ratios (``act_clip``), whose best value depends on the scales and the block around them.

Each tensor p is trained as p0 * (1 + d) with d starting at zero, so one learning rate is a relative step
for scales that differ by orders of magnitude between layers.
"""

from __future__ import annotations

import contextlib

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..tuner.layer import ZQATLinear
from .blocks import BlockInput, run_block


def refine_block(
    block: nn.Module,
    layers: list[ZQATLinear],
    inputs: list[BlockInput],
    targets: list[torch.Tensor],
    adapter: str,
    epochs: int,
    lr: float,
) -> None:
    """Train the packed layers' scales and clipping ratios and the block's saved norm copies on the block output;
    write them back."""
    tensors = _refined_tensors(block, layers, adapter)
    if not tensors or not epochs:
        return
    deltas = [torch.zeros_like(holder._parameters[name], requires_grad=True) for holder, name in tensors]
    optimizer = torch.optim.Adam(deltas, lr=lr)
    dtype = next(block.parameters()).dtype
    for _ in range(epochs):
        for inp, target in zip(inputs, targets):
            with torch.enable_grad(), _scaled(tensors, deltas):
                loss = nn.functional.mse_loss(run_block(block, inp, dtype).float(), target)
            if not torch.isfinite(loss):
                raise FloatingPointError("Scale refinement's loss became NaN/inf: lower calib_refine_lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        for (holder, name), delta in zip(tensors, deltas):
            param = holder._parameters[name]
            param.mul_(1 + delta.to(param.dtype))


def _refined_tensors(block: nn.Module, layers: list[ZQATLinear], adapter: str) -> list[tuple[nn.Module, str]]:
    """(holder, name) of each tensor refinement trains: packed scales, activation clipping ratios, then the saved
    norms' weights."""
    tensors = [(layer.zqat_scales, adapter) for layer in layers if layer.is_packed(adapter)]
    tensors += [(layer.zqat_act_clip, adapter) for layer in layers
                if layer.is_packed(adapter) and adapter in layer.zqat_act_clip]
    for module in block.modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            copy = module.modules_to_save[adapter]
            tensors += [(owner, name) for owner in copy.modules() for name, p in owner._parameters.items()
                        if p is not None and p.is_floating_point()]
    return tensors


@contextlib.contextmanager
def _scaled(tensors: list[tuple[nn.Module, str]], deltas: list[torch.Tensor]):
    """While training, each module sees p0 * (1 + d) in place of its parameter p0."""
    originals = [holder._parameters[name] for holder, name in tensors]
    for (holder, name), p, d in zip(tensors, originals, deltas):
        holder._parameters[name] = p.detach() * (1 + d.to(p.dtype))
    try:
        yield
    finally:
        for (holder, name), p in zip(tensors, originals):
            holder._parameters[name] = p
