"""The zeroth-order engine (noise, in-forward perturbation, SPSA, trajectory) and ZOTrainer."""

from .estimator import (
    ZO_ESTIMATORS, ZO_MASKS, loss_difference, normalized_gradients, one_sided_losses, projected_gradient, reference_scales,
    spsa_losses, step_seeds, zo_update,
)
from .guard import DivergenceGuard
from .loss import chunked_causal_lm_loss, chunked_cross_entropy, chunked_loss_unsupported
from .optimizer import ZODivergenceError, ZOOptimizer
from .perturbation import ZOParameter, check_not_offloaded, perturbed, zo_parameters
from .trainer import ZOTrainer, ZOTrainingArguments
from .trajectory import Trajectory, replay_trajectory

__all__ = [
    "DivergenceGuard", "ZODivergenceError", "ZOOptimizer", "ZOParameter", "ZOTrainer", "ZOTrainingArguments", "Trajectory",
    "check_not_offloaded", "chunked_causal_lm_loss", "chunked_cross_entropy", "chunked_loss_unsupported",
    "ZO_ESTIMATORS", "ZO_MASKS", "loss_difference", "normalized_gradients", "one_sided_losses", "perturbed", "projected_gradient",
    "reference_scales", "replay_trajectory", "spsa_losses", "step_seeds", "zo_parameters", "zo_update",
]
