"""ZOTrainer: transformers' Trainer with two perturbed forwards in place of backward().

Only two hooks are overridden: `create_optimizer` (a `ZOOptimizer`) and `training_step` (the SPSA
forwards). The loop, schedules, logging, callbacks, evaluation, checkpoints and resume are the
Trainer's own. Checkpoints also hold the run's trajectory (`zo_trajectory.safetensors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .estimator import spsa_losses
from .optimizer import ZOOptimizer
from .perturbation import zo_parameters


@dataclass
class ZOTrainingArguments(TrainingArguments):
    zo_eps: float = field(default=1e-3, metadata={"help": "SPSA perturbation size eps."})
    zo_num_queries: int = field(default=1, metadata={"help": "Perturbations per step; their updates are averaged."})
    zo_grad_clip: Optional[float] = field(
        default=None, metadata={"help": "Clip the projected gradient to [-c, c] (off by default)."}
    )
    zo_max_nonfinite_steps: int = field(
        default=10, metadata={"help": "Stop after this many NaN/inf losses in a row (each one skips its update)."}
    )
    # There are no gradients to clip: the Trainer's norm clipping is off.
    max_grad_norm: float = field(default=0.0, metadata={"help": "Must stay 0: use zo_grad_clip instead."})

    def __post_init__(self) -> None:
        if self.fp16:
            raise ValueError(
                "fp16=True is not supported by ZOTrainer (fp16 mixed precision needs a gradient scaler, and ZO "
                "training has no gradients). Use bf16=True, or load the model in the dtype you want."
            )
        if self.max_grad_norm and self.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm={self.max_grad_norm}: ZO training has no gradients to clip; set zo_grad_clip to "
                "clip the projected gradient instead."
            )
        if self.zo_eps <= 0:
            raise ValueError(f"zo_eps must be positive, got {self.zo_eps}.")
        if self.zo_num_queries < 1:
            raise ValueError(f"zo_num_queries must be at least 1, got {self.zo_num_queries}.")
        super().__post_init__()


class ZOTrainer(Trainer):
    """Zeroth-order training: each step costs two forwards per query and no backward."""

    def __init__(self, model: nn.Module = None, args: ZOTrainingArguments = None, **kwargs: Any) -> None:
        if args is not None and not isinstance(args, ZOTrainingArguments):
            raise TypeError("ZOTrainer needs ZOTrainingArguments (they add zo_eps, zo_num_queries, zo_grad_clip).")
        if model is not None:
            _check_model_is_trainable(model)
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("ZOTrainer builds its own ZOOptimizer; pass no optimizer (a scheduler is fine).")
        super().__init__(model=model, args=args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "DeepSpeed and FSDP shard the trained weights, which breaks the seeded perturbation every process "
                "must apply to the same full weights. Use plain multi-process data parallelism (accelerate launch)."
            )

    def create_optimizer(self, model: Optional[nn.Module] = None) -> ZOOptimizer:
        if self.optimizer is None:
            args = self.args
            self.optimizer = ZOOptimizer(
                zo_parameters(self.model),
                lr=args.learning_rate,
                eps=args.zo_eps,
                num_queries=args.zo_num_queries,
                grad_clip=args.zo_grad_clip,
                weight_decay=args.weight_decay,
                seed=args.seed,
                max_nonfinite_steps=args.zo_max_nonfinite_steps,
            )
        return self.optimizer

    @property
    def zo_optimizer(self) -> ZOOptimizer:
        optimizer = self.optimizer
        # accelerate wraps it in an AcceleratedOptimizer
        return getattr(optimizer, "optimizer", optimizer)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        zo = self.zo_optimizer
        # Dropout off: both perturbed passes must evaluate the same function, or the difference is noise.
        model.eval()
        inputs = self._prepare_inputs(inputs)

        def loss_fn() -> torch.Tensor:
            with self.compute_loss_context_manager():
                # a fresh dict per pass: with a compute_loss_func or label smoothing, compute_loss pops the labels
                return self.compute_loss(model, dict(inputs))

        pairs = [spsa_losses(zo.zo_params, loss_fn, seed, zo.eps) for seed in zo.seeds]
        loss_pos = torch.stack([p for p, _ in pairs])
        loss_neg = torch.stack([n for _, n in pairs])
        zo.accumulate((loss_pos - loss_neg).float())
        loss = (loss_pos + loss_neg).mean() / 2
        return loss.detach().to(self.args.device) / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            logs.pop("grad_norm", None)  # always 0: there are no gradients
            grads = self.zo_optimizer.last_grads
            if grads:
                logs["projected_grad"] = sum(grads) / len(grads)
        super().log(logs, start_time)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.optimizer is not None and self.args.should_save:
            self.zo_optimizer.trajectory.save(output_dir or self.args.output_dir)


def _check_model_is_trainable(model: nn.Module) -> None:
    for config in (getattr(model, "peft_config", None) or {}).values():
        if getattr(config, "init", None) == "calibrate" and not getattr(config, "calibrated", True):
            raise ValueError(
                "This ZeroQAT model was made with init='calibrate' but is not calibrated yet: run "
                "zqat_peft.calibrate(model, batches) first (or use init='rtn')."
            )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "The model has no trainable parameters: ZOTrainer would have nothing to update. Wrap it with "
            "get_peft_model(model, ZeroQATConfig(...)) (or mark the parameters to train with requires_grad=True)."
        )
