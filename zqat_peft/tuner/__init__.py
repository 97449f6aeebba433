"""The ZeroQAT peft tuner: config, layer and model, one file each (as peft's own tuners)."""

from .config import ZeroQATConfig
from .layer import ZQATLayer, ZQATLinear
from .model import ZeroQATModel
from .registration import register_zqat

__all__ = ["ZeroQATConfig", "ZeroQATModel", "ZQATLayer", "ZQATLinear", "register_zqat"]
