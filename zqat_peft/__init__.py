"""zqat_peft: quantization-aware training of LLMs with zeroth-order gradients, as a peft method.

`import zqat_peft` registers ZeroQAT with peft, so `peft.get_peft_model(model, ZeroQATConfig(...))`
and `PeftModel.from_pretrained(base, path)` work; `ZOTrainer` trains it with forward passes only.
"""

import logging

# The export extra's GPTQModel brings torchao; its import (through transformers' quantizers) logs that it
# cannot load its CUDA builds on a CPU-only machine, and torch then logs about torchao's enum registrations.
# Harmless, yet they would bury the command line's one-line errors. Quieted only while nobody has set a
# level for these two loggers.
for _noisy in ("torchao", "torch.utils._pytree"):
    if logging.getLogger(_noisy).level == logging.NOTSET:
        logging.getLogger(_noisy).setLevel(logging.ERROR)

from .calibration import calibrate, calibration_batches
from .tuner import ZeroQATConfig, ZeroQATModel, ZQATLinear, register_zqat
from .zo import ZOTrainer, ZOTrainingArguments, replay_trajectory

register_zqat()

__version__ = "0.1.0"
__all__ = [
    "ZeroQATConfig", "ZeroQATModel", "ZQATLinear", "ZOTrainer", "ZOTrainingArguments", "calibrate",
    "calibration_batches", "replay_trajectory",
]
