"""ZOOptimizer: a torch Optimizer that applies seeded SPSA updates.

The forwards happen in the trainer (`ZOTrainer.training_step`), which hands each micro-batch's loss
differences to `accumulate`; `step()` turns the window's mean difference into projected gradients
and updates the parameters. It is a real `torch.optim.Optimizer` (param_groups hold lr and
weight_decay), so transformers' LR schedulers, warmup and checkpointing work unchanged.

The step (``step``): "absolute" is plain SPSA, p <- p - lr g z. "relative" (the default) perturbs each tensor
by eps times its reference scale r_p (its RMS when training starts) and moves it by lr * r_p * g / rms(g) * z,
with rms(g) a bias-corrected running RMS of the projected gradient (its EMA state is in ``state_dict``) and the
ratio clipped to [-norm_clip, norm_clip]. lr and eps are then fractions of each tensor's own scale and the
step no longer depends on the model's weight or loss scales, so one lr carries over to other models. The
trajectory records the reference scales once and the coefficient applied at each step, so replay needs no
optimizer state.

The mask (``mask``): "none" perturbs and updates every element; "rounding" only the elements of quantized master
weights that the step's perturbation can move across a rounding boundary (``ZOParameter.mask``). The others
cannot change the loss difference, so the estimate is the same, and the update no longer random-walks them (at
W3 g64 with the demo's eps, 83-87% of the elements). The mask is measured at each step's starting weights, so
resume and replay (which record it in the trajectory) stay bit-exact.

The estimator (``estimator``): "two_point" (the default) takes L(p + eps z) - L(p - eps z) per query,
"one_sided" takes L(p + eps z) - L(p) with one unperturbed forward shared by the step's queries; the trainer
measures the differences, this class only divides them by 2 eps or eps.

Gradient accumulation: all micro-batches of one window share the step's seeds, and the projected
gradient is the mean of their loss differences, i.e. the SPSA estimate on the window's whole batch.
"""

from __future__ import annotations

import logging
import warnings
from typing import Collection, Optional

import torch
import torch.distributed as dist

from .estimator import (ZO_ESTIMATORS, ZO_MASKS, normalized_gradients, projected_gradient, reference_scales,
                        step_seeds, zo_update)
from .perturbation import ZOParameter
from .trajectory import Trajectory, set_scales

logger = logging.getLogger(__name__)

ZO_STEPS = ("relative", "absolute")
# The relative step's lr and eps (fractions of each trained tensor's RMS): the values that improved SmolLM2,
# Gemma 3 and Qwen2 with one recipe file (benchmarks/RESULTS.md, "The scale-free ZO step on the demo recipe").
RELATIVE_LR = 1e-3
RELATIVE_EPS = 5e-3
ABSOLUTE_EPS = 1e-3  # MeZO's; the absolute step's lr has no default (it depends on the model)


def step_sizes(step: str, lr: Optional[float], eps: Optional[float]) -> tuple[float, float]:
    """(lr, eps) with the step's defaults for the ones left None: the optimizer's, ZOTrainingArguments' and the
    recipes' one source of them."""
    if step == "relative":
        return (RELATIVE_LR if lr is None else lr), (RELATIVE_EPS if eps is None else eps)
    if lr is None:
        raise ValueError(
            "the absolute ZO step (p -= lr * g * z) has no default learning rate: how far it moves a model depends "
            "on the model's weight and loss scales. Set it (MeZO used 1e-6 to 1e-7 on OPT), or use the relative "
            "step, whose default carries over between models."
        )
    return lr, (ABSOLUTE_EPS if eps is None else eps)


class ZODivergenceError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


class ZOOptimizer(torch.optim.Optimizer):
    """Seeded SPSA updates. Weight decay applies to the parameters named in `decay_names` only (ZOTrainer
    passes its `get_decay_parameter_names`); they form the first param group, the rest the second."""

    def __init__(
        self,
        params: list[ZOParameter],
        lr: Optional[float] = None,
        eps: Optional[float] = None,
        num_queries: int = 1,
        grad_clip: Optional[float] = None,
        weight_decay: float = 0.0,
        seed: int = 0,
        max_nonfinite_steps: int = 10,
        decay_names: Optional[Collection[str]] = None,
        step: str = "relative",
        norm_beta: float = 0.99,
        norm_clip: float = 3.0,
        estimator: str = "two_point",
        mask: str = "none",
    ) -> None:
        if mask not in ZO_MASKS:
            raise ValueError(f"zo_mask must be one of {ZO_MASKS}, got {mask!r}.")
        if estimator not in ZO_ESTIMATORS:
            raise ValueError(f"zo_estimator must be one of {ZO_ESTIMATORS}, got {estimator!r}.")
        if step not in ZO_STEPS:
            raise ValueError(f"zo_step must be one of {ZO_STEPS}, got {step!r}.")
        if step == "relative" and grad_clip is not None:
            raise ValueError(
                f"zo_grad_clip={grad_clip} clips the absolute projected gradient; the relative step clips its "
                "normalized gradient at zo_norm_clip standard deviations instead. Leave zo_grad_clip unset, or "
                "use zo_step='absolute'."
            )
        lr, eps = step_sizes(step, lr, eps)
        if not 0.0 <= norm_beta < 1.0:
            raise ValueError(f"zo_norm_beta must be in [0, 1), got {norm_beta}.")
        if norm_clip <= 0:
            raise ValueError(f"zo_norm_clip must be positive, got {norm_clip}.")
        if eps <= 0:
            raise ValueError(f"zo_eps must be positive, got {eps}.")
        if num_queries < 1:
            raise ValueError(f"zo_num_queries must be at least 1, got {num_queries}.")
        if weight_decay and decay_names is None:
            raise ValueError(
                f"weight_decay={weight_decay} needs decay_names, the names of the parameters to decay (ZOTrainer "
                "passes its get_decay_parameter_names(model): no biases, norms or quantization scales)."
            )
        decay_names = set(decay_names or ())
        decayed = [p for p in params if p.name in decay_names]
        kept = [p for p in params if p.name not in decay_names]
        self.zo_groups = [group for group in (decayed, kept) if group]
        groups = [{"params": [p.param for p in group], "weight_decay": weight_decay if group is decayed else 0.0}
                  for group in self.zo_groups]
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0})
        self.zo_params = params
        self.eps = eps
        self.num_queries = num_queries
        self.grad_clip = grad_clip
        self.seed = seed
        self.max_nonfinite_steps = max_nonfinite_steps
        self.step_kind = step
        self.estimator = estimator
        self.norm_beta = norm_beta
        self.norm_clip = norm_clip
        self.mask = mask
        scales = reference_scales(params) if step == "relative" else None
        self.trajectory = Trajectory(eps, num_queries, [p.name for p in params], decay_names=[p.name for p in decayed],
                                     ref_scales=scales, mask=mask)
        self._set_scales(scales)
        if mask == "rounding" and all(p.mask() is None for p in params):  # the first step's masks, kept for it
            raise ValueError(
                "zo_mask='rounding' masks the master weights of quantized layers, and no trained parameter is one "
                "(trainable='scales', 'act_clip' or 'none' trains packed layers' scales, clipping ratios or "
                "modules_to_save, which every perturbation moves): use zo_mask='none'."
            )
        self.nonfinite_in_a_row = 0
        # the relative step's running second moment of the projected gradient, over `norm_count` finite steps
        self.norm_moment = 0.0
        self.norm_count = 0
        self.last_grads: list[float] = []  # the projected gradients of the last step (before normalization)
        self.last_loss: Optional[float] = None  # the mean of its SPSA losses, for the divergence guard
        self._masked: Optional[tuple[torch.Tensor, int]] = None  # mask="rounding": the last step's (moved, of all)
        self._loss_sum = 0.0
        self._reset_window()

    def _set_scales(self, scales: Optional[list[float]]) -> None:
        set_scales(self.zo_params, scales, self.eps, self.mask)

    def _reset_window(self) -> None:
        self._diff_sum = torch.zeros(self.num_queries, dtype=torch.float64)
        self._loss_sum = 0.0
        self._micro_batches = 0

    @property
    def seeds(self) -> list[int]:
        """The seeds of the step being accumulated."""
        return step_seeds(self.seed, len(self.trajectory), self.num_queries)

    def accumulate(self, loss_diffs: torch.Tensor, mean_loss: Optional[float] = None) -> None:
        """Add one micro-batch's L+ - L- (one value per query) and, for the log, the mean of its losses."""
        self._diff_sum += loss_diffs.detach().to("cpu", torch.float64)
        self._loss_sum += float("nan") if mean_loss is None else float(mean_loss)
        self._micro_batches += 1

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("ZOOptimizer takes no closure: the trainer feeds it loss differences.")
        diffs, count = self._all_reduce(self._diff_sum, self._micro_batches)
        seeds = self.seeds
        self.last_loss = self._loss_sum / max(self._micro_batches, 1)  # this process' share of the batch
        self._reset_window()
        if count == 0:
            raise RuntimeError("ZOOptimizer.step() was called without any accumulated loss difference.")
        lr = self._lr()
        mean_diff = diffs / count
        if not torch.isfinite(mean_diff).all():
            grads, weight_decay = [0.0] * self.num_queries, 0.0  # recorded as a no-op so replay stays aligned
            self.last_grads = grads
            self._on_nonfinite()
        else:
            self.nonfinite_in_a_row = 0
            grads = [projected_gradient(float(d), self.eps, self.grad_clip, self.estimator) for d in mean_diff]
            self.last_grads = grads
            grads = self._normalized(grads)
            weight_decay = self.param_groups[0]["weight_decay"]  # the decayed group comes first
            self._count_masked()
            for group, params in zip(self.param_groups, self.zo_groups):
                zo_update(params, seeds, grads, lr, group["weight_decay"])
        self.trajectory.append(seeds, grads, lr, weight_decay)

    def _count_masked(self) -> None:
        """Keep this step's masked element count on the device: read (one host sync) only when it is logged."""
        masks = [mask for mask in (p.mask() for p in self.zo_params) if mask is not None]
        if masks:
            self._masked = (sum(mask.sum() for mask in masks), sum(mask.numel() for mask in masks))

    @property
    def last_masked_fraction(self) -> Optional[float]:
        """The share of the masked parameters' elements the last step perturbed and updated (None: no masks)."""
        if self._masked is None:
            return None
        count, total = self._masked
        return float(count) / total

    def _normalized(self, grads: list[float]) -> list[float]:
        """The coefficients the update applies: the projected gradients themselves, or (relative step) in units
        of their running RMS."""
        if self.step_kind == "absolute":
            return grads
        coefs, self.norm_moment = normalized_gradients(grads, self.norm_moment, self.norm_count, self.norm_beta,
                                                       self.norm_clip)
        self.norm_count += 1
        return coefs

    @property
    def grad_rms(self) -> Optional[float]:
        """The relative step's running RMS of the projected gradient (None for the absolute step or before a step)."""
        if self.step_kind == "absolute" or self.norm_count == 0:
            return None
        return (self.norm_moment / (1.0 - self.norm_beta ** self.norm_count)) ** 0.5

    def _lr(self) -> float:
        """The step's learning rate: one for all groups, because the trajectory records one."""
        lrs = {group["lr"] for group in self.param_groups}
        if len(lrs) != 1:
            raise ValueError(f"ZOOptimizer's param groups hold different learning rates {sorted(lrs)}: give them one.")
        return lrs.pop()

    def _all_reduce(self, diff_sum: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """Across processes only these few scalars travel; every process then applies the same update."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return diff_sum, count
        device = self.zo_params[0].param.device if dist.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.cat([diff_sum, torch.tensor([float(count)], dtype=torch.float64)]).to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        return packed[:-1], int(packed[-1].item())

    def _on_nonfinite(self) -> None:
        self.nonfinite_in_a_row += 1
        step = len(self.trajectory)
        warnings.warn(f"ZO step {step}: the loss was NaN/inf; the update is skipped.", stacklevel=3)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise ZODivergenceError(
                f"The loss was NaN/inf {self.nonfinite_in_a_row} steps in a row (up to step {step}): training "
                "stopped. The weights were not updated by those steps and the last checkpoint is intact. "
                "Lower the learning rate or zo_eps, or check the data and the quantization settings."
            )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["zo"] = {"trajectory": self.trajectory.state_dict(), "nonfinite_in_a_row": self.nonfinite_in_a_row,
                       "norm_moment": self.norm_moment, "norm_count": self.norm_count, "estimator": self.estimator}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("This optimizer state was not written by ZOOptimizer (no 'zo' entry): cannot resume from it.")
        trajectory = Trajectory.from_state_dict(zo["trajectory"])
        self._check_same_run(trajectory, zo.get("estimator", "two_point"))  # older checkpoints: two-point
        super().load_state_dict(state_dict)
        trajectory.decay_names = self.trajectory.decay_names  # the same set, or no decay recorded yet
        self.trajectory = trajectory
        self._set_scales(trajectory.ref_scales)  # the scales measured when the run started, not the trained weights'
        self.nonfinite_in_a_row = zo["nonfinite_in_a_row"]
        self.norm_moment = float(zo.get("norm_moment", 0.0))
        self.norm_count = int(zo.get("norm_count", 0))

    def _check_same_run(self, recorded: Trajectory, recorded_estimator: str) -> None:
        """Refuse a checkpoint whose recorded steps this optimizer would not continue: one trajectory, one setting."""
        if recorded.param_names != self.trajectory.param_names:
            raise ValueError(
                "The checkpoint's ZO trajectory was recorded for different trainable parameters "
                f"({len(recorded.param_names)} vs {len(self.trajectory.param_names)}): resume with the same model and config."
            )
        changed = []
        recorded_step = "absolute" if recorded.ref_scales is None else "relative"
        if recorded_step != self.step_kind:
            changed.append(f"zo_step {recorded_step!r} (now {self.step_kind!r})")
        if recorded_estimator != self.estimator:
            changed.append(f"zo_estimator {recorded_estimator!r} (now {self.estimator!r})")
        if recorded.mask != self.mask:
            changed.append(f"zo_mask {recorded.mask!r} (now {self.mask!r})")
        if recorded.eps != self.eps:
            changed.append(f"zo_eps {recorded.eps!r} (now {self.eps!r})")
        if recorded.num_queries != self.num_queries:
            changed.append(f"zo_num_queries {recorded.num_queries} (now {self.num_queries})")
        elif recorded.seeds and recorded.seeds[0] != step_seeds(self.seed, 0, self.num_queries):
            changed.append(f"a different seed (now {self.seed})")
        decays_differ = set(recorded.decayed_names()) != set(self.trajectory.decayed_names())
        if decays_differ and any(recorded.weight_decays):
            changed.append("weight decay on a different set of parameters")
        if changed:
            raise ValueError(
                f"The checkpoint's ZO run was recorded with {', '.join(changed)}: continuing it would mix two "
                "trajectories that no replay can reproduce. Resume with the checkpoint's settings, or start a new "
                "run from its weights."
            )
