"""The record of a ZO run: per step, the seeds, applied gradient coefficients, learning rate and weight decay.

Together with the starting model this is the whole run: `replay_trajectory` re-applies every update
and gives the trained weights bit for bit. 10,000 steps take a few hundred KB. The names of the
weight-decayed parameters are recorded once; a trajectory written before they were (``decay_names``
None) decayed every parameter and rounded half-precision updates to nearest. A relative-step run also records
each parameter's reference scale (``ref_scales``, measured once when it started); ``grads`` then holds the
normalized coefficients the updates applied, not the raw projected gradients. A run with the rounding mask records
it (``mask``); replay measures each step's masks again on the weights it has replayed so far.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .estimator import rounding_reach, zo_update
from ..files import load_safetensors
from ..noise import NOISE_VERSION
from .perturbation import ZOParameter, zo_parameters

TRAJECTORY_FILE = "zo_trajectory.safetensors"


@dataclass
class Trajectory:
    eps: float
    num_queries: int
    param_names: list[str]
    seeds: list[list[int]] = field(default_factory=list)
    grads: list[list[float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    weight_decays: list[float] = field(default_factory=list)
    decay_names: Optional[list[str]] = None  # None: recorded before decay was restricted (every parameter)
    ref_scales: Optional[list[float]] = None  # None: the absolute step (every scale 1)
    mask: str = "none"  # ZOOptimizer's mask: "rounding" updates only the elements near a rounding boundary

    def __len__(self) -> int:
        return len(self.lrs)

    def decayed_names(self) -> list[str]:
        """The parameters the recorded weight decay applies to."""
        return list(self.param_names if self.decay_names is None else self.decay_names)

    def append(self, seeds: list[int], grads: list[float], lr: float, weight_decay: float) -> None:
        self.seeds.append(list(seeds))
        self.grads.append(list(grads))
        self.lrs.append(float(lr))
        self.weight_decays.append(float(weight_decay))

    def state_dict(self) -> dict:
        return {
            "eps": self.eps, "num_queries": self.num_queries, "param_names": list(self.param_names),
            "seeds": self.seeds, "grads": self.grads, "lrs": self.lrs, "weight_decays": self.weight_decays,
            "decay_names": None if self.decay_names is None else list(self.decay_names),
            "ref_scales": None if self.ref_scales is None else list(self.ref_scales), "mask": self.mask,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "Trajectory":
        return cls(**state)

    def save(self, directory: Union[str, Path]) -> Path:
        path = Path(directory) / TRAJECTORY_FILE
        q = self.num_queries
        tensors = {
            "seeds": torch.tensor(self.seeds, dtype=torch.int64).reshape(-1, q),
            "grads": torch.tensor(self.grads, dtype=torch.float64).reshape(-1, q),
            "lrs": torch.tensor(self.lrs, dtype=torch.float64),
            "weight_decays": torch.tensor(self.weight_decays, dtype=torch.float64),
        }
        if self.ref_scales is not None:
            tensors["ref_scales"] = torch.tensor(self.ref_scales, dtype=torch.float64)
        meta = {"eps": repr(self.eps), "num_queries": str(q), "noise": NOISE_VERSION,
                "param_names": json.dumps(self.param_names)}
        if self.decay_names is not None:
            meta["decay_names"] = json.dumps(self.decay_names)
        if self.mask != "none":
            meta["mask"] = self.mask
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Trajectory":
        path = Path(path)
        if path.is_dir():
            path = path / TRAJECTORY_FILE
        fix = f"checkpoints written by ZOTrainer hold a whole {TRAJECTORY_FILE}: resume from another checkpoint"
        t, meta = load_safetensors(path, fix)
        if meta.get("noise") != NOISE_VERSION:
            raise ValueError(f"{path} was recorded with noise {meta.get('noise')!r}; this version replays {NOISE_VERSION!r}.")
        return cls(
            eps=float(meta["eps"]), num_queries=int(meta["num_queries"]), param_names=json.loads(meta["param_names"]),
            seeds=t["seeds"].tolist(), grads=t["grads"].tolist(), lrs=t["lrs"].tolist(),
            weight_decays=t["weight_decays"].tolist(),
            decay_names=json.loads(meta["decay_names"]) if "decay_names" in meta else None,
            ref_scales=t["ref_scales"].tolist() if "ref_scales" in t else None, mask=meta.get("mask", "none"),
        )


def set_scales(params: list[ZOParameter], scales: Optional[list[float]], eps: float, mask: str) -> None:
    """Give each parameter its step's unit (its reference scale, or 1 for the absolute step) and, with the
    rounding mask, the reach of its perturbation."""
    for p, scale in zip(params, scales or [1.0] * len(params)):
        p.scale = scale
        p.reach = rounding_reach(eps, scale) if mask == "rounding" else math.inf
        p.forget_mask()


def replay_trajectory(model: nn.Module, trajectory: Union[Trajectory, str, Path], steps: int | None = None) -> nn.Module:
    """Apply the recorded updates to `model` (in its starting state), in place; returns the model.

    The model must have the same trainable parameters, by name, as the one that was trained.
    """
    if not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.load(trajectory)
    params = zo_parameters(model)
    names = [p.name for p in params]
    if names != trajectory.param_names:
        missing = sorted(set(trajectory.param_names) - set(names))[:3]
        extra = sorted(set(names) - set(trajectory.param_names))[:3]
        raise ValueError(
            "The model's trainable parameters differ from the recorded run's "
            f"({len(names)} vs {len(trajectory.param_names)}; missing e.g. {missing}, unexpected e.g. {extra}). "
            "Build the model with the same config (and the same trainable mode) as the run."
        )
    n = len(trajectory) if steps is None else steps
    if not 0 <= n <= len(trajectory):
        raise ValueError(f"steps={steps}: the trajectory holds {len(trajectory)} recorded steps.")
    if trajectory.decay_names is None and any(p.param.dtype in (torch.bfloat16, torch.float16) for p in params):
        raise ValueError(
            "This trajectory was recorded before half-precision updates were rounded stochastically: it cannot be "
            "replayed on bfloat16/float16 trainable parameters. Replay it with the version that recorded it."
        )
    set_scales(params, trajectory.ref_scales, trajectory.eps, trajectory.mask)
    decayed_names = set(trajectory.decayed_names())
    decayed = [p for p in params if p.name in decayed_names]
    kept = [p for p in params if p.name not in decayed_names]
    for i in range(n):
        seeds, grads, lr = trajectory.seeds[i], trajectory.grads[i], trajectory.lrs[i]
        zo_update(decayed, seeds, grads, lr, trajectory.weight_decays[i])
        zo_update(kept, seeds, grads, lr, 0.0)
    return model
