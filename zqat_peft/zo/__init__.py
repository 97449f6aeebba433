"""The zeroth-order engine (noise, in-forward perturbation, SPSA, trajectory) and ZOTrainer."""

from .estimator import projected_gradient, spsa_losses, step_seeds, zo_update
from .optimizer import ZODivergenceError, ZOOptimizer
from .perturbation import ZOParameter, perturbed, zo_parameters
from .trainer import ZOTrainer, ZOTrainingArguments
from .trajectory import Trajectory, replay_trajectory

__all__ = [
    "ZODivergenceError", "ZOOptimizer", "ZOParameter", "ZOTrainer", "ZOTrainingArguments", "Trajectory",
    "perturbed", "projected_gradient", "replay_trajectory", "spsa_losses", "step_seeds", "zo_parameters", "zo_update",
]
