"""Finding a decoder-only model's blocks and the inputs they receive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn


def find_decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: its longest nn.ModuleList of same-class modules.

    Raises a ValueError naming the architecture when there is none (calibration works block by block).
    """
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            same_class = len({type(m) for m in module}) == 1
            has_linear = any(isinstance(m, nn.Linear) for m in module[0].modules())
            if same_class and has_linear and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        arch = type(_unwrap(model)).__name__
        raise ValueError(
            f"Could not find the decoder blocks of {arch}: calibration needs an nn.ModuleList of identical blocks "
            "containing linear layers (model.model.layers in LLaMA-style models). Use init='rtn' for this model."
        )
    return best


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@dataclass
class BlockInput:
    """What one calibration batch feeds a block: the hidden states and the keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable[torch.Tensor]) -> list[BlockInput]:
    """Run the model up to its first block for every batch of input ids and keep what the block receives."""
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append(BlockInput(hidden.detach().float(), kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = model.get_input_embeddings().weight.device  # the ids go where the embedding lives
    try:
        for input_ids in batches:
            try:
                model(input_ids=input_ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inp: BlockInput, dtype: torch.dtype) -> torch.Tensor:
    """The block's output hidden states (blocks return a tensor or a tuple led by it)."""
    out = block(inp.hidden.to(dtype), **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out


def move_input(inp: BlockInput, device: torch.device) -> BlockInput:
    kwargs = {k: _to(v, device) for k, v in inp.kwargs.items()}
    return BlockInput(inp.hidden.to(device), kwargs)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def calibration_batches(token_ids: torch.Tensor, n_samples: int, seq_len: int, batch_size: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """`n_samples` random windows of `seq_len` tokens from a 1-D token stream, grouped in batches."""
    token_ids = token_ids.reshape(-1)
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    if token_ids.numel() < seq_len + 1:
        raise ValueError(
            f"The calibration text has {token_ids.numel()} tokens, fewer than the sequence length {seq_len}: "
            "give more text or a shorter calibration sequence length."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len, (n_samples,), generator=gen)
    windows = torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])
    return list(windows.split(batch_size))
