"""The record of a ZO run: per step, the seeds, projected gradients and learning rate.

Together with the starting model this is the whole run: `replay_trajectory` re-applies every update
and gives the trained weights bit for bit. 10,000 steps take a few hundred KB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .estimator import zo_update
from ..noise import NOISE_VERSION
from .perturbation import zo_parameters

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

    def __len__(self) -> int:
        return len(self.lrs)

    def append(self, seeds: list[int], grads: list[float], lr: float, weight_decay: float) -> None:
        self.seeds.append(list(seeds))
        self.grads.append(list(grads))
        self.lrs.append(float(lr))
        self.weight_decays.append(float(weight_decay))

    def state_dict(self) -> dict:
        return {
            "eps": self.eps, "num_queries": self.num_queries, "param_names": list(self.param_names),
            "seeds": self.seeds, "grads": self.grads, "lrs": self.lrs, "weight_decays": self.weight_decays,
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
        meta = {"eps": repr(self.eps), "num_queries": str(q), "noise": NOISE_VERSION,
                "param_names": json.dumps(self.param_names)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Trajectory":
        path = Path(path)
        if path.is_dir():
            path = path / TRAJECTORY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No ZO trajectory at {path}: checkpoints written by ZOTrainer hold {TRAJECTORY_FILE}.")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        if meta.get("noise") != NOISE_VERSION:
            raise ValueError(f"{path} was recorded with noise {meta.get('noise')!r}; this version replays {NOISE_VERSION!r}.")
        t = load_file(str(path))
        return cls(
            eps=float(meta["eps"]), num_queries=int(meta["num_queries"]), param_names=json.loads(meta["param_names"]),
            seeds=t["seeds"].tolist(), grads=t["grads"].tolist(), lrs=t["lrs"].tolist(),
            weight_decays=t["weight_decays"].tolist(),
        )


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
    for i in range(n):
        zo_update(params, trajectory.seeds[i], trajectory.grads[i], trajectory.lrs[i], trajectory.weight_decays[i])
    return model
