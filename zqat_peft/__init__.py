"""zqat_peft: quantization-aware training of LLMs with zeroth-order gradients, as a peft method.

`import zqat_peft` registers ZeroQAT with peft, so `peft.get_peft_model(model, ZeroQATConfig(...))`
and `PeftModel.from_pretrained(base, path)` work; `ZOTrainer` trains it with forward passes only.
"""

from .calibration import calibrate, calibration_batches
from .tuner import ZeroQATConfig, ZeroQATModel, ZQATLinear, register_zqat
from .zo import ZOTrainer, ZOTrainingArguments, replay_trajectory

register_zqat()

__version__ = "0.1.0"
__all__ = [
    "ZeroQATConfig", "ZeroQATModel", "ZQATLinear", "ZOTrainer", "ZOTrainingArguments", "calibrate",
    "calibration_batches", "replay_trajectory",
]
