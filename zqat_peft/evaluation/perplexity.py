"""Paper-style token-level perplexity: the texts joined with "\\n\\n", cut into non-overlapping windows.

This is the number quantization papers report (GPTQ/OmniQuant/ZeroQAT), not lm-eval's word
perplexity: exp of the mean next-token negative log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


def token_windows(token_ids: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows of a 1-D token stream (the ragged tail is dropped)."""
    n = token_ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"The text has {token_ids.numel()} tokens, fewer than one window of {seq_len}.")
    windows = token_ids[: n * seq_len].reshape(n, seq_len)
    return windows if max_windows is None else windows[:max_windows]


def encode_joined(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    return tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(mean NLL) of every predicted token in `windows` [n, seq_len]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return math.exp(nll / count)
