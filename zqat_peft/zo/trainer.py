"""ZOTrainer: transformers' Trainer with perturbed forwards in place of backward().

The hooks overridden are `create_optimizer` (a `ZOOptimizer`), `training_step` (the SPSA forwards) and
`get_decay_parameter_names` (no decay on quantization parameters). The loop, schedules, logging,
callbacks, evaluation, checkpoints and resume are the Trainer's own. Checkpoints also hold the run's
trajectory (`zo_trajectory.safetensors`). Options that choose or tune a gradient optimizer are refused,
not ignored: ZO training has exactly one optimizer.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..tuner.layer import ZQATLayer
from .estimator import ZO_ESTIMATORS, ZO_MASKS, loss_difference, one_sided_losses, spsa_losses
from .guard import DivergenceGuard
from .loss import chunked_causal_lm_loss, chunked_loss_unsupported
from .optimizer import ZO_STEPS, ZOOptimizer, step_sizes
from .perturbation import check_not_offloaded, zo_parameters

logger = logging.getLogger(__name__)


@dataclass
class ZOTrainingArguments(TrainingArguments):
    zo_step: str = field(default="relative", metadata={
        "help": "'relative': eps and learning_rate are fractions of each tensor's RMS and the projected gradient is "
                "divided by its running RMS (one lr carries over to other models); 'absolute': p -= lr * g * z."})
    # not TrainingArguments' 5e-5, an Adam step: as a fraction of each tensor's RMS it would barely move the weights
    learning_rate: Optional[float] = field(default=None, metadata={
        "help": "The ZO step's lr. zo_step='relative': a fraction of each tensor's RMS, by default 1e-3 (it carried "
                "over between model families); zo_step='absolute': no default, set it for the model."})
    zo_eps: Optional[float] = field(default=None, metadata={
        "help": "SPSA perturbation size eps: by default 5e-3 of each tensor's RMS (relative step) or 1e-3 (absolute)."})
    zo_num_queries: int = field(default=1, metadata={"help": "Perturbations per step; their updates are averaged."})
    zo_estimator: str = field(default="two_point", metadata={
        "help": "'two_point': L(p + eps z) - L(p - eps z), 2 forwards per query; 'one_sided': L(p + eps z) - L(p), "
                "the queries sharing one unperturbed forward (num_queries + 1 forwards per step)."})
    zo_mask: str = field(default="none", metadata={
        "help": "'rounding': perturb and update only the master-weight elements the perturbation can move across a "
                "rounding boundary (the others cannot change the loss); 'none': every element."})
    zo_grad_clip: Optional[float] = field(
        default=None, metadata={"help": "Absolute step: clip the projected gradient to [-c, c] (off by default)."}
    )
    zo_norm_beta: float = field(
        default=0.99, metadata={"help": "Relative step: EMA decay of the projected gradient's running second moment."}
    )
    zo_norm_clip: float = field(
        default=3.0, metadata={"help": "Relative step: clip the normalized gradient to this many running RMS."}
    )
    zo_divergence_guard: bool = field(default=True, metadata={
        "help": "Stop when the held-out (or running training) loss rises far above the start's and restore the "
                "best model (zqat_peft.zo.guard.DivergenceGuard)."})
    zo_max_nonfinite_steps: int = field(
        default=10, metadata={"help": "Stop after this many NaN/inf losses in a row (each one skips its update)."}
    )
    zo_loss_chunk_tokens: Optional[int] = field(default=256, metadata={
        "help": "Compute the causal-LM loss over this many token positions at a time (zqat_peft.zo.loss), never "
                "holding the whole float32 logits; None: the model's own loss. Models whose loss the chunks cannot "
                "reproduce exactly (logit soft-capping or scaling, unknown heads) always use their own."})
    # There are no gradients to clip: the Trainer's norm clipping is off.
    max_grad_norm: float = field(default=0.0, metadata={"help": "Must stay 0: use zo_grad_clip instead."})

    def __post_init__(self) -> None:
        ignored = _optimizer_options_set(self)
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)}: ZOTrainer always uses its own ZO optimizer, so these options would be "
                "ignored. Leave them at their defaults; the ZO step is set by learning_rate, weight_decay and zo_*."
            )
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
        if self.zo_step not in ZO_STEPS:
            raise ValueError(f"zo_step must be one of {ZO_STEPS}, got {self.zo_step!r}.")
        self.learning_rate, self.zo_eps = step_sizes(self.zo_step, self.learning_rate, self.zo_eps)
        if self.zo_eps <= 0:
            raise ValueError(f"zo_eps must be positive, got {self.zo_eps}.")
        if self.zo_num_queries < 1:
            raise ValueError(f"zo_num_queries must be at least 1, got {self.zo_num_queries}.")
        if self.zo_loss_chunk_tokens is not None and self.zo_loss_chunk_tokens < 1:
            raise ValueError(
                f"zo_loss_chunk_tokens must be a positive number of tokens, got {self.zo_loss_chunk_tokens}; "
                "use None for the model's own loss."
            )
        if self.zo_estimator not in ZO_ESTIMATORS:
            raise ValueError(f"zo_estimator must be one of {ZO_ESTIMATORS}, got {self.zo_estimator!r}.")
        if self.zo_mask not in ZO_MASKS:
            raise ValueError(f"zo_mask must be one of {ZO_MASKS}, got {self.zo_mask!r}.")
        if self.zo_step == "relative" and self.zo_grad_clip is not None:
            raise ValueError(
                f"zo_grad_clip={self.zo_grad_clip} clips the absolute projected gradient; with zo_step='relative' "
                "the normalized gradient is clipped at zo_norm_clip instead. Unset zo_grad_clip or use zo_step='absolute'."
            )
        super().__post_init__()


# Gradient-optimizer options of TrainingArguments that ZO training cannot honour.
_OPTIMIZER_OPTIONS = ("optim", "optim_args", "optim_target_modules", "adam_beta1", "adam_beta2", "adam_epsilon")
# ZeroQAT's quantizer parameters: decay would pull a scale (or clipping logit) towards a coarser grid.
_QUANTIZER_PARAMS = tuple(name for name in ZQATLayer.adapter_layer_names if name != "zqat_weight")


def _optimizer_options_set(args: TrainingArguments) -> list[str]:
    defaults = TrainingArguments.__dataclass_fields__

    def value(v):
        return getattr(v, "value", v)  # OptimizerNames members and their strings alike

    return [
        f"{name}={value(getattr(args, name))!r}" for name in _OPTIMIZER_OPTIONS
        if value(getattr(args, name)) != value(defaults[name].default)
    ]


class ZOTrainer(Trainer):
    """Zeroth-order training: each step costs two forwards per query (one-sided: one per query and one
    unperturbed) and no backward."""

    def __init__(self, model: nn.Module = None, args: ZOTrainingArguments = None, **kwargs: Any) -> None:
        if args is None:
            args = ZOTrainingArguments(output_dir="tmp_trainer")  # what Trainer does, with the ZO defaults
            logger.info("No ZOTrainingArguments passed, using output_dir=tmp_trainer.")
        if not isinstance(args, ZOTrainingArguments):
            raise TypeError("ZOTrainer needs ZOTrainingArguments (they add zo_eps, zo_num_queries, zo_grad_clip).")
        if model is not None:
            _check_model_is_trainable(model)
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("ZOTrainer builds its own ZOOptimizer; pass no optimizer (a scheduler is fine).")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("ZOTrainer builds its own ZOOptimizer; pass no optimizer_cls_and_kwargs.")
        super().__init__(model=model, args=args, **kwargs)
        if args.zo_divergence_guard and not any(isinstance(c, DivergenceGuard) for c in self.callback_handler.callbacks):
            self.add_callback(DivergenceGuard())
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "DeepSpeed and FSDP shard the trained weights, which breaks the seeded perturbation every process "
                "must apply to the same full weights. Use plain multi-process data parallelism (accelerate launch)."
            )
        self.loss_chunk_tokens = self._loss_chunk_tokens()

    def _loss_chunk_tokens(self) -> Optional[int]:
        """zo_loss_chunk_tokens where the chunked loss is exactly the default loss, else None (decided once)."""
        chunk_tokens = self.args.zo_loss_chunk_tokens
        if chunk_tokens is None:
            return None
        if self.compute_loss_func is not None or self.label_smoother is not None:
            reason = "a compute_loss_func or label smoothing replaces the model's loss"
        else:
            reason = chunked_loss_unsupported(self.model)
        if reason is not None:
            logger.info("ZO forwards use the model's own loss (the whole logits at once): %s.", reason)
            return None
        return chunk_tokens

    @property
    def divergence_guard(self) -> Optional[DivergenceGuard]:
        """The guard watching this run (None with zo_divergence_guard=False and none passed in callbacks)."""
        return next((c for c in self.callback_handler.callbacks if isinstance(c, DivergenceGuard)), None)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """transformers' choice (no biases, no norms), less ZeroQAT's scales, clipping logits and smoothing scales."""
        names = super().get_decay_parameter_names(model)
        return [n for n in names if not any(f".{q}." in f".{n}." for q in _QUANTIZER_PARAMS)]

    def create_optimizer(self, model: Optional[nn.Module] = None) -> ZOOptimizer:
        if self.optimizer is None:
            args = self.args
            self.optimizer = ZOOptimizer(
                zo_parameters(self.model),
                decay_names=self.get_decay_parameter_names(self.model),
                lr=args.learning_rate,
                eps=args.zo_eps,
                num_queries=args.zo_num_queries,
                grad_clip=args.zo_grad_clip,
                weight_decay=args.weight_decay,
                seed=args.seed,
                max_nonfinite_steps=args.zo_max_nonfinite_steps,
                step=args.zo_step,
                norm_beta=args.zo_norm_beta,
                norm_clip=args.zo_norm_clip,
                estimator=args.zo_estimator,
                mask=args.zo_mask,
            )
        return self.optimizer

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[torch.Tensor] = None):
        """The Trainer's loss; a causal LM's is computed chunk by chunk (``zo_loss_chunk_tokens``) when only
        the loss is asked for."""
        if self.loss_chunk_tokens is None or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped, chunk_tokens = self.accelerator.unwrap_model(model), self.loss_chunk_tokens

        def loss_only_forward(**model_inputs: Any) -> dict[str, torch.Tensor]:
            # what the prepared model's forward would run under (accelerate wraps it in autocast)
            with self.accelerator.autocast():
                return {"loss": chunked_causal_lm_loss(unwrapped, model_inputs, chunk_tokens)}

        # the Trainer's own handling of num_items_in_batch and its scaling, around the chunked forward
        return super().compute_loss(loss_only_forward, inputs, return_outputs, num_items_in_batch)

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
        if _forward_accepts(model, "use_cache"):
            inputs = {**inputs, "use_cache": False}  # a ZO forward never reuses keys and values: build none

        def loss_fn() -> torch.Tensor:
            with self.compute_loss_context_manager():
                # a fresh dict per pass: with a compute_loss_func or label smoothing, compute_loss pops the labels
                return self.compute_loss(model, dict(inputs))

        if zo.estimator == "one_sided":
            base, probes = one_sided_losses(zo.zo_params, loss_fn, zo.seeds, zo.eps)
            loss, diffs = base.double(), torch.stack([loss_difference(probe, base) for probe in probes])
        else:
            pairs = [spsa_losses(zo.zo_params, loss_fn, seed, zo.eps) for seed in zo.seeds]
            loss = torch.stack([pos.double() + neg.double() for pos, neg in pairs]).mean() / 2
            diffs = torch.stack([loss_difference(pos, neg) for pos, neg in pairs])
        zo.accumulate(diffs, float(loss))
        return loss.to(self.args.device, torch.float32) / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            logs.pop("grad_norm", None)  # always 0: there are no gradients
            zo = self.zo_optimizer
            if zo.last_grads:
                logs["projected_grad"] = sum(zo.last_grads) / len(zo.last_grads)
            if zo.grad_rms is not None:
                logs["projected_grad_rms"] = zo.grad_rms
            if zo.last_masked_fraction is not None:
                logs["perturbed_fraction"] = zo.last_masked_fraction
        super().log(logs, start_time)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.optimizer is not None and self.args.should_save:
            self.zo_optimizer.trajectory.save(output_dir or self.args.output_dir)


def _forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether the forward of the model under the wrappers (DDP, peft) takes the keyword `name`."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return name in inspect.signature(inner.forward).parameters


def _check_model_is_trainable(model: nn.Module) -> None:
    check_not_offloaded(model)
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
