"""The SPSA estimators and the update they drive.

For a seed s with noise z = z(s, p) for every trainable parameter p, the two-point estimator ("two_point",
2 forwards per query) and the one-sided one ("one_sided", q probes sharing one unperturbed forward: q + 1
forwards, as FZOO does) give the projected gradient
    two_point:  g = (L(p + eps z) - L(p - eps z)) / (2 eps)
    one_sided:  g = (L(p + eps z) - L(p)) / eps
and the update is p <- p - lr * g * z, averaged over the step's q seeds. The one-sided estimate's error is
O(eps) instead of O(eps^2), but its q directions cost q + 1 forwards instead of 2q: more directions per forward.
z is regenerated from s at every use and never stored. With the relative step (``ZOOptimizer(step="relative")``)
each tensor's perturbation and update are multiplied by its reference scale r_p (``ZOParameter.scale``), and
the g of the update is the projected gradient divided by its running RMS: the step moves each weight by
about lr * r_p, whatever the model's weight and loss scales.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Optional, Sequence

import torch

from ..noise import NOISE_MAX, add_noise_update_
from .perturbation import ZOParameter, perturbed


ZO_ESTIMATORS = ("two_point", "one_sided")
ZO_MASKS = ("none", "rounding")


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


def one_sided_losses(
    params: list[ZOParameter], loss_fn: Callable[[], torch.Tensor], seeds: Sequence[int], eps: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The unperturbed loss and the loss at +eps z for each seed: len(seeds) + 1 forwards."""
    with torch.no_grad():
        loss_base = loss_fn().detach()
    probes = []
    for seed in seeds:
        with perturbed(params, seed, eps):
            probes.append(loss_fn().detach())
    return loss_base, probes


def projected_gradient(loss_diff: float, eps: float, clip: Optional[float] = None,
                       estimator: str = "two_point") -> float:
    """g = (L+ - L-) / (2 eps) (two-point) or (L+ - L) / eps (one-sided), optionally clipped to [-clip, clip]."""
    g = loss_diff / (2.0 * eps if estimator == "two_point" else eps)
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
    """p <- p (1 - lr wd) - lr * p.scale * mean_i(g_i z_i) for every p in params (the caller decides which decay);
    where a parameter has a mask (``ZOParameter.mask``), only its elements inside it take the second term.

    Deterministic: replaying it gives the same bits. bfloat16/float16 parameters are rounded
    stochastically, with bits drawn from the step's first seed (``add_noise_update_``).
    """
    terms = [(seed, -lr * g / len(seeds)) for seed, g in zip(seeds, grads) if g != 0.0]
    decay = 1.0 - lr * weight_decay
    for p in params:
        # x * 1.0 is x: the absolute step (scale 1) gives the same bits as before scales existed
        scaled = [(seed, coef * p.scale) for seed, coef in terms]
        mask = p.mask()
        before = None if mask is None else p.param.detach().clone()
        add_noise_update_(p.param, p.key, scaled, decay, rounding_seed=seeds[0])
        if mask is not None:  # the elements outside the mask are only decayed
            updated = p.param.detach()
            torch.where(mask, updated, add_noise_update_(before, p.key, [], decay, seeds[0]), out=updated)
        p.forget_mask()


def reference_scales(params: list[ZOParameter]) -> list[float]:
    """Each tensor's RMS (float64), the unit of its relative perturbation and step.

    Measured once, when training starts, and recorded in the trajectory: a resumed run and a replay read the
    recorded values instead of measuring the (by then trained) weights again on whatever device they are.
    """
    scales = [float(p.param.detach().double().pow(2).mean().sqrt()) for p in params]
    bad = [(p.name, s) for p, s in zip(params, scales) if not (math.isfinite(s) and s > 0)]
    if bad:
        name, value = bad[0]
        raise ValueError(
            f"{len(bad)} trainable parameter(s) have an RMS of {value} (e.g. {name}): a step relative to the "
            "tensor's scale is undefined for an all-zero or non-finite tensor. Freeze them, fix their "
            "initialization, or train with zo_step='absolute'."
        )
    return scales


def normalized_gradients(
    grads: Sequence[float], second_moment: float, count: int, beta: float, clip: float
) -> tuple[list[float], float]:
    """The projected gradients divided by their running RMS and clipped to [-clip, clip]; and the new moment.

    ``second_moment`` is the EMA (decay ``beta``) of the mean g^2 of the ``count`` steps before this one;
    this step's g^2 is folded in first and the EMA bias-corrected, as Adam does for its second moment. With
    one or a few queries per step a per-step spread (FZOO's std over its probes) is not available, so the
    spread is a running one. The result is dimensionless: scaling the loss by any factor leaves it unchanged.
    """
    moment = beta * second_moment + (1.0 - beta) * sum(g * g for g in grads) / len(grads)
    rms = math.sqrt(moment / (1.0 - beta ** (count + 1)))
    if rms == 0.0:  # every projected gradient so far was exactly 0 (a flat quantized loss): no step
        return [0.0] * len(grads), moment
    return [max(-clip, min(clip, g / rms)) for g in grads], moment


def rounding_reach(eps: float, scale: float) -> float:
    """The margin (``rounding_margin``) within which a perturbation of size eps * scale can change what an element
    contributes to the quantized forward. Each element moves by at most d = NOISE_MAX * eps * scale; the group's
    range ends move by as much, so its scale by at most 2 d / qmax, which shifts an element's position on the grid
    by at most 2 d (its magnitude is at most qmax grid steps): 3 d in all, which also covers an element overtaking
    the group's minimum or maximum (2 d). ``ZOOptimizer(mask="rounding")`` perturbs and updates only the elements
    closer than this (``ZOParameter.mask``): the others leave the loss exactly where it was."""
    return 3.0 * NOISE_MAX * eps * scale
