"""ZOOptimizer: a torch Optimizer that applies seeded SPSA updates.

The forwards happen in the trainer (`ZOTrainer.training_step`), which hands each micro-batch's loss
differences to `accumulate`; `step()` turns the window's mean difference into projected gradients
and updates the parameters. It is a real `torch.optim.Optimizer` (param_groups hold lr and
weight_decay), so transformers' LR schedulers, warmup and checkpointing work unchanged.

Gradient accumulation: all micro-batches of one window share the step's seeds, and the projected
gradient is the mean of their loss differences, i.e. the SPSA estimate on the window's whole batch.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .estimator import projected_gradient, step_seeds, zo_update
from .perturbation import ZOParameter
from .trajectory import Trajectory

logger = logging.getLogger(__name__)


class ZODivergenceError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


class ZOOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        params: list[ZOParameter],
        lr: float,
        eps: float = 1e-3,
        num_queries: int = 1,
        grad_clip: Optional[float] = None,
        weight_decay: float = 0.0,
        seed: int = 0,
        max_nonfinite_steps: int = 10,
    ) -> None:
        if eps <= 0:
            raise ValueError(f"zo_eps must be positive, got {eps}.")
        if num_queries < 1:
            raise ValueError(f"zo_num_queries must be at least 1, got {num_queries}.")
        super().__init__([p.param for p in params], {"lr": lr, "weight_decay": weight_decay})
        self.zo_params = params
        self.eps = eps
        self.num_queries = num_queries
        self.grad_clip = grad_clip
        self.seed = seed
        self.max_nonfinite_steps = max_nonfinite_steps
        self.trajectory = Trajectory(eps, num_queries, [p.name for p in params])
        self.nonfinite_in_a_row = 0
        self.last_grads: list[float] = []
        self._reset_window()

    def _reset_window(self) -> None:
        self._diff_sum = torch.zeros(self.num_queries, dtype=torch.float64)
        self._micro_batches = 0

    @property
    def seeds(self) -> list[int]:
        """The seeds of the step being accumulated."""
        return step_seeds(self.seed, len(self.trajectory), self.num_queries)

    def accumulate(self, loss_diffs: torch.Tensor) -> None:
        """Add one micro-batch's L+ - L- (one value per query)."""
        self._diff_sum += loss_diffs.detach().to("cpu", torch.float64)
        self._micro_batches += 1

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("ZOOptimizer takes no closure: the trainer feeds it loss differences.")
        diffs, count = self._all_reduce(self._diff_sum, self._micro_batches)
        seeds = self.seeds
        self._reset_window()
        if count == 0:
            raise RuntimeError("ZOOptimizer.step() was called without any accumulated loss difference.")
        group = self.param_groups[0]
        mean_diff = diffs / count
        if not torch.isfinite(mean_diff).all():
            grads = [0.0] * self.num_queries  # recorded as a no-op so replay stays aligned
            self._on_nonfinite()
        else:
            self.nonfinite_in_a_row = 0
            grads = [projected_gradient(float(d), self.eps, self.grad_clip) for d in mean_diff]
            zo_update(self.zo_params, seeds, grads, group["lr"], group["weight_decay"])
        self.last_grads = grads
        self.trajectory.append(seeds, grads, group["lr"], group["weight_decay"])

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
        state["zo"] = {"trajectory": self.trajectory.state_dict(), "nonfinite_in_a_row": self.nonfinite_in_a_row}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("This optimizer state was not written by ZOOptimizer (no 'zo' entry): cannot resume from it.")
        trajectory = Trajectory.from_state_dict(zo["trajectory"])
        if trajectory.param_names != self.trajectory.param_names:
            raise ValueError(
                "The checkpoint's ZO trajectory was recorded for different trainable parameters "
                f"({len(trajectory.param_names)} vs {len(self.trajectory.param_names)}): resume with the same model and config."
            )
        super().load_state_dict(state_dict)
        self.trajectory = trajectory
        self.nonfinite_in_a_row = zo["nonfinite_in_a_row"]
