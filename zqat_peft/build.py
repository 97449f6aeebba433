"""Building a ZeroQAT model directly in packed form, one layer at a time.

The base model is created without memory (its parameters on the meta device), wrapped, and then
each parameter is materialised on the target device from a safetensors checkpoint (or a random
initialisation of the config, for memory/speed benchmarks at 7B/13B shapes); each frozen linear
layer is packed as soon as its weight exists. Peak memory is the packed model plus one layer's
float weight: the whole bf16 model never exists on the device.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Union

import torch
from accelerate import init_empty_weights
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .tuner import ZeroQATConfig, ZQATLinear
from .tuner.layer import CLIP_INIT_LOGIT


def build_packed_model(
    model: Union[PretrainedConfig, str, Path],
    config: ZeroQATConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
    init_std: float = 0.02,
    seed: int = 0,
) -> PeftModel:
    """A packed ZeroQAT model (RTN) from a local checkpoint directory or, given a config, random weights."""
    if config.init != "rtn":
        raise ValueError("Building in packed form uses RTN; calibration needs the float model (load it normally).")
    checkpoint = None
    if not isinstance(model, PretrainedConfig):
        checkpoint = Path(model)
        model = AutoConfig.from_pretrained(checkpoint)
    with init_empty_weights(include_buffers=False):
        base = AutoModelForCausalLM.from_config(model, dtype=dtype)
    # Keep the frozen layers float (still empty) until each has its weight.
    peft_model = get_peft_model(base, dataclasses.replace(config, init="calibrate"))
    source = _CheckpointSource(checkpoint) if checkpoint else _RandomSource(init_std, seed)
    device = torch.device(device)
    _materialise(peft_model, source, dtype, device)
    peft_model.peft_config["default"].init = "rtn"
    return peft_model.eval()


def _materialise(peft_model: PeftModel, source, dtype: torch.dtype, device: torch.device) -> None:
    base = peft_model.get_base_model()
    done: dict[int, nn.Parameter] = {}  # tied parameters are materialised once
    for module_name, module in base.named_modules():
        if isinstance(module, ZQATLinear):
            # the whole layer first, then pack it before the next layer exists
            for sub_name, sub in module.named_modules(prefix=module_name):
                _materialise_own(base, sub_name, sub, source, dtype, device, done)
            for adapter in list(module.zqat_spec):
                if not module.is_trained(adapter):
                    module.pack(adapter)
        else:
            _materialise_own(base, module_name, module, source, dtype, device, done)


def _materialise_own(base, module_name, module, source, dtype, device, done) -> None:
    for name, param in list(module._parameters.items()):
        if param is None or param.device.type != "meta":
            continue
        if id(param) not in done:
            tensor = _value(source, base, module_name, name, param, dtype, device)
            done[id(param)] = nn.Parameter(tensor, requires_grad=param.requires_grad)
        module._parameters[name] = done[id(param)]


def _value(source, base, module_name: str, name: str, param, dtype, device) -> torch.Tensor:
    """The tensor for one meta parameter, by its place in the model."""
    key = _checkpoint_key(module_name, name)
    if module_name.endswith((".zqat_clip_lower", ".zqat_clip_upper")):
        return torch.full(param.shape, CLIP_INIT_LOGIT, dtype=torch.float32, device=device)
    if module_name.endswith(".zqat_input_scale"):
        return torch.ones(param.shape, dtype=torch.float32, device=device)
    if module_name.endswith(".base_layer") and name == "weight":
        return torch.empty(0, dtype=dtype, device=device)  # ZQATLinear holds the weight
    return source.get(key, param.shape, dtype, device)


def _checkpoint_key(module_name: str, name: str) -> str:
    """The base checkpoint's key of a parameter (a ZQATLinear's master weight is the layer's `weight`)."""
    if module_name.endswith(".zqat_weight"):
        return module_name[: -len(".zqat_weight")] + ".weight"
    return f"{module_name}.{name}".replace(".base_layer.", ".")


class _CheckpointSource:
    def __init__(self, directory: Path) -> None:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"No *.safetensors weights in {directory}.")
        self.handles = [safe_open(str(f), "pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def get(self, key: str, shape, dtype, device) -> torch.Tensor:
        if key not in self.where:
            raise KeyError(f"The checkpoint has no tensor {key!r} (expected from the model's config).")
        tensor = self.where[key].get_tensor(key)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(shape)}.")
        return tensor.to(device=device, dtype=dtype)


class _RandomSource:
    """Random weights of the right shapes: norms at 1, the rest N(0, std), generated on the device."""

    def __init__(self, std: float, seed: int) -> None:
        self.std, self.seed = std, seed

    def get(self, key: str, shape, dtype, device) -> torch.Tensor:
        if "norm" in key or (len(shape) == 1 and not key.endswith("bias")):
            return torch.ones(shape, dtype=dtype, device=device)
        if key.endswith("bias"):
            return torch.zeros(shape, dtype=dtype, device=device)
        gen = torch.Generator(device=device).manual_seed(self.seed + zlib.crc32(key.encode()))
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, self.std, generator=gen)
