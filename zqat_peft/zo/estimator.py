"""The two-point SPSA estimator and the update it drives.

For a seed s with noise z = z(s, p) for every trainable parameter p:
    L+ = L(p + eps z),  L- = L(p - eps z),  g = (L+ - L-) / (2 eps)   (the projected gradient)
    p <- p - lr * g * z                                                 (averaged over q seeds)
z is regenerated from s at every use and never stored.
"""

from __future__ import annotations

import zlib
from typing import Callable, Optional, Sequence

import torch

from ..noise import add_noise_update_
from .perturbation import ZOParameter, perturbed


def step_seeds(base_seed: int, step: int, num_queries: int) -> list[int]:
    """The seeds of one optimizer step: a pure function of (base seed, step, query), so resume replays them."""
    return [zlib.crc32(f"zo/{base_seed}/{step}/{q}".encode()) for q in range(num_queries)]


def spsa_losses(
    params: list[ZOParameter], loss_fn: Callable[[], torch.Tensor], seed: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses at +eps z and -eps z. loss_fn runs a forward and returns a scalar loss tensor."""
    with perturbed(params, seed, eps):
        loss_pos = loss_fn().detach()
    with perturbed(params, seed, -eps):
        loss_neg = loss_fn().detach()
    return loss_pos, loss_neg


def projected_gradient(loss_diff: float, eps: float, clip: Optional[float] = None) -> float:
    """g = (L+ - L-) / (2 eps), optionally clipped to [-clip, clip]."""
    g = loss_diff / (2.0 * eps)
    if clip is not None and clip > 0:
        g = max(-clip, min(clip, g))
    return g


def loss_difference(loss_pos: torch.Tensor, loss_neg: torch.Tensor) -> torch.Tensor:
    """L+ - L- in float64: each loss is upcast first, so a low-precision loss's difference is not rounded again."""
    return loss_pos.detach().double() - loss_neg.detach().double()


@torch.no_grad()
def zo_update(
    params: list[ZOParameter],
    seeds: Sequence[int],
    grads: Sequence[float],
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """p <- p (1 - lr wd) - lr * mean_i(g_i z_i) for every p in params (the caller decides which decay).

    Deterministic: replaying it gives the same bits. bfloat16/float16 parameters are rounded
    stochastically, with bits drawn from the step's first seed (``add_noise_update_``).
    """
    terms = [(seed, -lr * g / len(seeds)) for seed, g in zip(seeds, grads) if g != 0.0]
    decay = 1.0 - lr * weight_decay
    for p in params:
        add_noise_update_(p.param, p.key, terms, decay, rounding_seed=seeds[0])
