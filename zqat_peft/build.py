"""Building a ZeroQAT model directly in packed form, one layer at a time.

The base model is created without memory (its parameters on the meta device), wrapped, and then
each parameter is materialised on the target device from a safetensors checkpoint (or a random
initialisation of the config, for memory/speed benchmarks at 7B/13B shapes); each frozen linear
layer is packed as soon as its weight exists. Peak memory is the packed model plus one layer's
float weight: the whole bf16 model never exists on the device.

A checkpoint whose linear layers are stored quantized (GPTQ, compressed-tensors: see
``zqat_peft.export.load_quantized``) comes with a reader that turns each layer's tensors into packed
storage: those layers never have a float weight at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from accelerate import init_empty_weights
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .tuner import ZeroQATConfig, ZQATLinear
from .tuner.layer import CLIP_INIT_LOGIT, LayerQuantSpec, PackedWeight

# (layer name, the checkpoint's tensors of that layer by suffix, bias excepted, the layer's spec, in_features,
# out_features) -> its packed storage; it refuses what it cannot convert exactly.
PackedLayerReader = Callable[[str, dict[str, Tensor], LayerQuantSpec, int, int], PackedWeight]


def build_packed_model(
    model: Union[PretrainedConfig, str, Path],
    config: ZeroQATConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
    init_std: float = 0.02,
    seed: int = 0,
    checkpoint: Union[str, Path, None] = None,
    read_packed: Optional[PackedLayerReader] = None,
) -> PeftModel:
    """A packed ZeroQAT model (RTN) from a local checkpoint directory or, given a config, random weights.

    Given a config and ``checkpoint``, the weights come from that directory (a model built as the config says,
    not as the directory's config.json does). With ``read_packed``, the checkpoint's quantized layers go into
    packed storage as the reader converts them (``PackedLayerReader``) and have no float weight at all.
    """
    if config.init != "rtn":
        raise ValueError("Building in packed form uses RTN; calibration needs the float model (load it normally).")
    if not isinstance(model, PretrainedConfig):
        checkpoint = Path(model)
        model = AutoConfig.from_pretrained(checkpoint)
    if read_packed is not None and checkpoint is None:
        raise ValueError("read_packed reads packed layers from a checkpoint: give the checkpoint directory.")
    with init_empty_weights(include_buffers=False), _weights_created_on_meta():
        base = AutoModelForCausalLM.from_config(model, dtype=dtype)
    # init_empty_weights re-wraps each parameter it moves, which unties a tied output embedding: tie it again, so
    # that it is materialised once (a checkpoint of a tied model does not hold it)
    base.tie_weights()
    # Keep the frozen layers float (still empty) until each has its weight.
    peft_model = get_peft_model(base, dataclasses.replace(config, init="calibrate"))
    source = _CheckpointSource(Path(checkpoint), read_packed) if checkpoint else _RandomSource(init_std, seed)
    device = torch.device(device)
    _materialise(peft_model, source, dtype, device)
    peft_model.peft_config["default"].init = "rtn"
    return peft_model.eval()


@contextlib.contextmanager
def _weights_created_on_meta() -> Iterator[None]:
    """nn.Linear and nn.Embedding create their weights on the meta device. init_empty_weights alone moves each
    parameter there only once its module has allocated it on the CPU (uninitialised, but allocated); the buffers
    (rotary frequencies, say) are still computed for real."""
    originals = {cls: cls.__init__ for cls in (nn.Linear, nn.Embedding)}

    def on_meta(init):
        @functools.wraps(init)
        def wrapped(self, *args, **kwargs):
            init(self, *args, **{**kwargs, "device": "meta"})
        return wrapped

    try:
        for cls, init in originals.items():
            cls.__init__ = on_meta(init)
        yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


def _materialise(peft_model: PeftModel, source, dtype: torch.dtype, device: torch.device) -> None:
    base = peft_model.get_base_model()
    done: dict[int, nn.Parameter] = {}  # tied parameters are materialised once
    for module_name, module in base.named_modules():
        if isinstance(module, ZQATLinear):
            for adapter, spec in module.zqat_spec.items():
                packed = source.packed(module_name, spec, module.in_features, module.out_features)
                if packed is not None:  # before anything else: its float weight is dropped unmaterialised
                    module.load_packed(adapter, _to(packed, device), module_name)
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
    if module_name.endswith(".zqat_act_clip"):  # the config's initial ratio, which the layer's spec holds
        spec = base.get_submodule(module_name.rpartition(".")[0]).zqat_spec[name]
        return torch.tensor(spec.act_clip, dtype=torch.float32, device=device)
    if module_name.endswith(".base_layer") and name == "weight":
        return torch.empty(0, dtype=dtype, device=device)  # ZQATLinear holds the weight
    return source.get(key, param.shape, dtype, device)


def _checkpoint_key(module_name: str, name: str) -> str:
    """The base checkpoint's key of a parameter (a ZQATLinear's master weight is the layer's `weight`)."""
    if module_name.endswith(".zqat_weight"):
        return module_name[: -len(".zqat_weight")] + ".weight"
    return f"{module_name}.{name}".replace(".base_layer.", ".")


def _to(packed: PackedWeight, device: torch.device) -> PackedWeight:
    return PackedWeight(*(t.to(device) for t in packed))


def checkpoint_tensor_names(directory: Union[str, Path]) -> list[str]:
    """The names of every tensor in a directory's safetensors files (read from their headers)."""
    names = []
    for file in safetensors_files(Path(directory)):
        with safe_open(str(file), "pt") as handle:
            names.extend(handle.keys())
    return names


def safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {directory}.")
    return files


class _CheckpointSource:
    def __init__(self, directory: Path, read_packed: Optional[PackedLayerReader] = None) -> None:
        self.handles = [safe_open(str(f), "pt") for f in safetensors_files(directory)]
        self.where = {k: h for h in self.handles for k in h.keys()}
        self.read_packed = read_packed

    def packed(self, layer_name: str, spec: LayerQuantSpec, in_features: int, out_features: int) -> Optional[PackedWeight]:
        """The layer's packed storage read from the checkpoint, or None when it is built from a float weight."""
        if self.read_packed is None:
            return None
        prefix = f"{layer_name}."
        tensors = {
            key[len(prefix):]: handle.get_tensor(key)
            for key, handle in self.where.items()
            if key.startswith(prefix) and "." not in key[len(prefix):] and key != f"{prefix}bias"
        }
        return self.read_packed(layer_name, tensors, spec, in_features, out_features)

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

    def packed(self, layer_name: str, spec: LayerQuantSpec, in_features: int, out_features: int) -> Optional[PackedWeight]:
        return None

    def get(self, key: str, shape, dtype, device) -> torch.Tensor:
        if "norm" in key or (len(shape) == 1 and not key.endswith("bias")):
            return torch.ones(shape, dtype=dtype, device=device)
        if key.endswith("bias"):
            return torch.zeros(shape, dtype=dtype, device=device)
        gen = torch.Generator(device=device).manual_seed(self.seed + zlib.crc32(key.encode()))
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, self.std, generator=gen)
