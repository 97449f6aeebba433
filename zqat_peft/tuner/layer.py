"""ZQATLinear: a quantized nn.Linear as a peft tuner layer.

A layer holds its weight in one of two forms (see `ZeroQATConfig`):

- trained: ``zqat_weight`` (full-precision master) and ``zqat_clip_lower/upper`` (LWC clipping logits);
  the forward fake-quantizes the master weight. A caller that wants the forward to see a perturbed
  master weight (ZO training) hands the layer a ``WeightNoise`` (``set_weight_noise``): the forward then
  quantizes W + scale * z(seed, key), which the CUDA kernel does in one pass without writing the
  perturbed weight anywhere. The stored tensor is never written by the forward, so nothing drifts.
- packed: ``zqat_qweight`` (int32, GPTQ layout), ``zqat_scales`` (float32) and ``zqat_zeros`` (uint8),
  dequantized on the fly. The float weight is gone.

With smoothing (weight-activation settings), ``zqat_input_scale`` holds 1/s per input channel: the
layer computes (x / s) @ (W s)^T, exact for any architecture, with s already folded into the master
weight (or codes). Calibration learns s.

With ``act_clip`` below 1 (``spec.act_clip``), ``zqat_act_clip`` holds the layer's clipping ratio of its input's
per-token range (a scalar the scale refinement and ZO training move); the input is quantized within that fraction of
each token's [min, max].

With an online Hadamard (``spec.input_hadamard``, down_proj of a rotated model), the layer first multiplies
its input by the orthogonal Hadamard matrix H; its weight is then W H (fused at rotation time), so it computes
(x H) @ (W H)^T = x @ W^T in float while the quantized activations are those of x H. Smoothing then acts
in the rotated basis: ((x H) / s) @ (W H s)^T.

The base nn.Linear keeps only its bias: its weight is replaced by an empty placeholder (that still
carries dtype and device for peft's bookkeeping), because ZQATLinear owns the only copy of the weight.
The layer knows nothing of training.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..hadamard import OnlineHadamard
from ..noise import WeightNoise
from ..quant import (
    dequantize_packed,
    fake_quantize_activation,
    fake_quantize_weight,
    pack_int,
    packed_linear,
    packed_shape,
    quantize_weight,
    rounding_margin,
    weight_qparams,
)

# sigmoid(CLIP_INIT_LOGIT) == 1.0 in float32: RTN until calibration learns something else.
CLIP_INIT_LOGIT = 20.0


class PackedWeight(NamedTuple):
    """A layer's weight in packed form: ``weight = (codes - zero) * scale`` per group of input columns.

    qweight: int32 [ceil(in/32) * bits, out], ``pack_int(codes.t(), bits)`` (GPTQ's layout);
    scale: float32 [out, n_groups]; zero: uint8 [out, n_groups] in [0, 2**bits).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


@dataclass(frozen=True)
class LayerQuantSpec:
    """How one layer quantizes: resolved from the config for this layer's shape and name."""

    w_bits: int
    group_size: int  # resolved: divides in_features
    symmetric: bool
    a_bits: int  # 16 = input not quantized
    out_bits: int  # 16 = output not quantized (keys/values)
    out_group_size: int  # per attention head along the output
    smooth: bool = False  # holds a per-input-channel scale (smoothing)
    act_clip: float = 1.0  # the initial clipping ratio of the input's per-token range (1.0: none, no parameter)
    # A fused query/key/value projection: its output is blocks of `out_block_heads` heads whose first
    # `out_query_heads` are queries, which stay in full precision. 0 = every output head is a key or value.
    out_block_heads: int = 0
    out_query_heads: int = 0
    input_hadamard: int = 0  # size of the Hadamard matrix the input is multiplied by online; 0 = none


class ZQATLayer(BaseTunerLayer):
    # Floating tensors that peft toggles requires_grad on; which of them ZO trains is set per layer below.
    adapter_layer_names = ("zqat_weight", "zqat_clip_lower", "zqat_clip_upper", "zqat_scales", "zqat_input_scale",
                           "zqat_act_clip")
    # Integer storage: never cast, never trainable, saved with the adapter.
    other_param_names = ("zqat_qweight", "zqat_zeros", "zqat_spec")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.zqat_weight = nn.ParameterDict({})
        self.zqat_clip_lower = nn.ParameterDict({})
        self.zqat_clip_upper = nn.ParameterDict({})
        self.zqat_scales = nn.ParameterDict({})
        self.zqat_input_scale = nn.ParameterDict({})
        self.zqat_act_clip = nn.ParameterDict({})
        self.zqat_qweight = BufferDict({}, persistent=True)
        self.zqat_zeros = BufferDict({}, persistent=True)
        self.zqat_input_hadamard = nn.ModuleDict({})  # rebuilt from the spec, nothing saved
        self.zqat_spec: dict[str, LayerQuantSpec] = {}
        # adapter -> the noise the forward adds to its master weight (see set_weight_noise); normally empty
        self.zqat_weight_noise: dict[str, WeightNoise] = {}
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        # False runs a trained layer in full precision (calibration's reference outputs).
        self.fake_quant = True
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"ZeroQAT quantizes nn.Linear layers only, got {type(base).__name__}.")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, spec: LayerQuantSpec, trained: bool, train_scales: bool,
                     train_act_clip: bool) -> None:
        """Take the base layer's weight as this adapter's master weight, then free the base copy."""
        if self.zqat_spec:
            raise ValueError("A ZeroQAT layer holds one adapter: quantization settings do not stack.")
        base = self.get_base_layer()
        weight = base.weight
        self.zqat_spec[adapter_name] = spec
        self.zqat_weight[adapter_name] = nn.Parameter(weight.data, requires_grad=trained)
        n_groups = self.in_features // spec.group_size
        clip = torch.full((self.out_features, n_groups), CLIP_INIT_LOGIT, dtype=torch.float32, device=weight.device)
        self.zqat_clip_lower[adapter_name] = nn.Parameter(clip.clone(), requires_grad=False)
        self.zqat_clip_upper[adapter_name] = nn.Parameter(clip, requires_grad=False)
        if spec.smooth:
            ones = torch.ones(self.in_features, dtype=torch.float32, device=weight.device)
            self.zqat_input_scale[adapter_name] = nn.Parameter(ones, requires_grad=False)
        if spec.act_clip != 1.0:
            ratio = torch.tensor(spec.act_clip, dtype=torch.float32, device=weight.device)
            self.zqat_act_clip[adapter_name] = nn.Parameter(ratio, requires_grad=False)
        if spec.input_hadamard:
            if spec.input_hadamard != self.in_features:
                raise ValueError(f"an online Hadamard of size {spec.input_hadamard} cannot rotate an input of "
                                 f"{self.in_features} features")
            self.zqat_input_hadamard[adapter_name] = OnlineHadamard(spec.input_hadamard).to(weight.device)
        base.weight = nn.Parameter(weight.data.new_empty(0), requires_grad=False)
        frozen = ["zqat_clip_lower", "zqat_clip_upper", "zqat_input_scale"]
        if not trained:
            frozen.append("zqat_weight")
        if not train_scales:
            frozen.append("zqat_scales")
        if not train_act_clip:
            frozen.append("zqat_act_clip")
        self.frozen_peft_weight_names = {adapter_name: tuple(frozen)}
        self.set_adapter(self.active_adapters)

    def is_packed(self, adapter_name: str) -> bool:
        return adapter_name in self.zqat_qweight

    def is_trained(self, adapter_name: str) -> bool:
        """Whether ZO training updates this layer's master weight (set by the config, not by requires_grad)."""
        return "zqat_weight" not in self.frozen_peft_weight_names.get(adapter_name, ())

    def set_weight_noise(self, holder: nn.Module, attr: str, noise: Optional[WeightNoise]) -> bool:
        """Make the forward see the master weight ``holder[attr]`` as W + noise.scale * z(noise.seed, noise.key)
        (None: as W again). Returns False, and changes nothing, for any other tensor: the caller must
        perturb those itself."""
        if holder is not self.zqat_weight or attr not in self.zqat_weight:
            return False
        if noise is None:
            self.zqat_weight_noise.pop(attr, None)
        else:
            self.zqat_weight_noise[attr] = noise
        return True

    def weight_rounding_margin(self, holder: nn.Module, attr: str) -> Optional[torch.Tensor]:
        """For the master weight ``holder[attr]``: how far each element can move before the quantized weight the
        forward uses changes (``rounding_margin``); None for any other tensor."""
        if holder is not self.zqat_weight or attr not in self.zqat_weight:
            return None
        spec, master = self.zqat_spec[attr], self.zqat_weight[attr]
        scale, zero = weight_qparams(master, spec.w_bits, spec.group_size, spec.symmetric,
                                     self.zqat_clip_lower[attr], self.zqat_clip_upper[attr])
        return rounding_margin(master, scale, zero, spec.w_bits)

    def rotated_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The input in the basis of the weight: x H with an online Hadamard, else x."""
        if adapter_name in self.zqat_input_hadamard:
            return self.zqat_input_hadamard[adapter_name](x)
        return x

    def smoothed_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """What the layer quantizes and multiplies its weight with: the rotated input times 1/s (if smoothed)."""
        x = self.rotated_input(x, adapter_name)
        if adapter_name in self.zqat_input_scale:
            x = x * self.zqat_input_scale[adapter_name].to(x.dtype)
        return x

    def quantized_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """What the layer multiplies its weight with: the smoothed input, fake-quantized per token at a_bits
        within the layer's clipping ratio (if it has one)."""
        clip_ratio = self.zqat_act_clip[adapter_name] if adapter_name in self.zqat_act_clip else None
        return fake_quantize_activation(self.smoothed_input(x, adapter_name), self.zqat_spec[adapter_name].a_bits,
                                        clip_ratio=clip_ratio)

    def master_weight(self, adapter_name: str) -> torch.Tensor:
        """The full-precision weight the forward sees (perturbed while a ``WeightNoise`` is set), [out, in]."""
        master = self.zqat_weight[adapter_name]
        noise = self.zqat_weight_noise.get(adapter_name)
        return master if noise is None else noise.applied_to(master)

    @torch.no_grad()
    def pack(self, adapter_name: str) -> None:
        """Quantize the master weight to packed integer codes and free it (and its clipping logits)."""
        if self.is_packed(adapter_name):
            return
        spec = self.zqat_spec[adapter_name]
        master = self.zqat_weight[adapter_name]
        scale, zero = weight_qparams(
            master, spec.w_bits, spec.group_size, spec.symmetric,
            self.zqat_clip_lower[adapter_name], self.zqat_clip_upper[adapter_name],
        )
        codes = quantize_weight(master, scale, zero, spec.w_bits)
        self._store_packed(adapter_name, PackedWeight(pack_int(codes.t(), spec.w_bits), scale, zero.to(torch.uint8)))

    @torch.no_grad()
    def load_packed(self, adapter_name: str, packed: PackedWeight, layer_name: str = "") -> None:
        """Take codes, scales and zero points as they are (from a quantized checkpoint) instead of packing the
        master weight, which is freed unread (it may be an empty meta tensor). Shapes, dtypes and, for a
        symmetric layer, the zero points are checked first."""
        if self.is_packed(adapter_name):
            raise ValueError(f"{layer_name or 'the layer'} is packed already: load a checkpoint into a fresh layer.")
        _check_packed(packed, self.zqat_spec[adapter_name], self.in_features, self.out_features, layer_name)
        self._store_packed(adapter_name, packed)

    def _store_packed(self, adapter_name: str, packed: PackedWeight) -> None:
        self.zqat_qweight[adapter_name] = packed.qweight
        self.zqat_zeros[adapter_name] = packed.zero
        train_scales = "zqat_scales" not in self.frozen_peft_weight_names.get(adapter_name, ())
        self.zqat_scales[adapter_name] = nn.Parameter(packed.scale, requires_grad=train_scales)
        for name in ("zqat_weight", "zqat_clip_lower", "zqat_clip_upper"):
            del getattr(self, name)[adapter_name]

    def quantized_weight(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight the forward multiplies with, [out, in]: on the quantization grid in either form."""
        spec = self.zqat_spec[adapter_name]
        if self.is_packed(adapter_name):
            return dequantize_packed(
                self.zqat_qweight[adapter_name], self.zqat_scales[adapter_name], self.zqat_zeros[adapter_name],
                spec.w_bits, self.in_features, dtype=dtype or torch.float32,
            )
        return fake_quantize_weight(
            self.zqat_weight[adapter_name], spec.w_bits, spec.group_size, spec.symmetric,
            self.zqat_clip_lower[adapter_name], self.zqat_clip_upper[adapter_name],
            noise=self.zqat_weight_noise.get(adapter_name), dtype=dtype,
        )


class ZQATLinear(nn.Module, ZQATLayer):
    """A quantized nn.Linear: y = Q_out(Q_a(x) @ Q_w(W)^T + b)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        spec: LayerQuantSpec,
        trained: bool,
        train_scales: bool,
        train_act_clip: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        ZQATLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, spec, trained=trained, train_scales=train_scales, train_act_clip=train_act_clip)
        self.register_load_state_dict_pre_hook(_pack_before_loading_packed_state)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            raise RuntimeError(
                "ZeroQAT layers own the only copy of their weights (the original float weights are freed), "
                "so the adapter cannot be disabled. Load the base model again for full-precision outputs."
            )
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter = self.active_adapters[0]
        spec = self.zqat_spec[adapter]
        if not self.fake_quant:
            if self.is_packed(adapter):
                raise RuntimeError("A packed layer has no full-precision weight to run with fake_quant=False.")
            x = self.smoothed_input(x, adapter)
            return F.linear(x, self.master_weight(adapter).to(x.dtype), self.base_layer.bias)
        x = self.quantized_input(x, adapter)
        if self.is_packed(adapter):  # the codes go to the kernel with the scales as they are now (perturbed or not)
            y = packed_linear(x, self.zqat_qweight[adapter], self.zqat_scales[adapter], self.zqat_zeros[adapter],
                              spec.w_bits, self.in_features, self.base_layer.bias)
        else:
            y = F.linear(x, self.quantized_weight(adapter, dtype=x.dtype), self.base_layer.bias)
        if spec.out_bits < 16:
            y = fake_quantize_keys_values(y, spec)
        return y

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the weight this layer multiplies with into the base layer (which then runs as a plain Linear).

        A smoothed layer computes (x / s) @ Q(W s)^T; a plain Linear has no input scale, so the merged
        weight is Q(W s) diag(1/s): the same function, on the grid up to a per-input-channel scale.
        Activation quantization cannot be part of a plain Linear: merging warns that it is dropped.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        adapter = adapter_names[0]
        base = self.get_base_layer()
        weight = self.merged_weight(adapter).to(base.weight.dtype)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"The quantized weight of adapter {adapter!r} holds NaN/inf: refusing to merge it.")
        _warn_if_activations_are_quantized(self.zqat_spec[adapter])
        base.weight = nn.Parameter(weight, requires_grad=False)
        self.merged_adapters.append(adapter)

    @torch.no_grad()
    def merged_weight(self, adapter_name: str) -> torch.Tensor:
        """The plain Linear weight with this layer's function, float32 [out, in]: the quantized weight with
        the input scale (1/s) folded into its columns and the online Hadamard undone (times H^T)."""
        weight = self.quantized_weight(adapter_name, dtype=torch.float32)
        if adapter_name in self.zqat_input_scale:
            weight = weight * self.zqat_input_scale[adapter_name].float()
        if adapter_name in self.zqat_input_hadamard:  # x H diag(1/s) Q^T = x (Q diag(1/s) H^T)^T
            weight = self.zqat_input_hadamard[adapter_name](weight.double(), transpose=True).float()
        return weight

    def unmerge(self) -> None:
        """Free the merged weight again: the layer runs from its own (never modified) quantized storage."""
        base = self.get_base_layer()
        base.weight = nn.Parameter(base.weight.data.new_empty(0), requires_grad=False)
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "zqat." + super().__repr__()


def fake_quantize_keys_values(y: torch.Tensor, spec: LayerQuantSpec) -> torch.Tensor:
    """Fake-quantize a key/value projection's output [..., out] per token and head at ``spec.out_bits``;
    the query heads of a fused projection pass unchanged."""
    if spec.out_query_heads == 0:
        return fake_quantize_activation(y, spec.out_bits, spec.out_group_size)
    head_dim = spec.out_group_size
    blocks = y.unflatten(-1, (-1, spec.out_block_heads * head_dim))
    split = [spec.out_query_heads * head_dim, (spec.out_block_heads - spec.out_query_heads) * head_dim]
    queries, keys_values = blocks.split(split, dim=-1)
    keys_values = fake_quantize_activation(keys_values.contiguous(), spec.out_bits, head_dim)
    return torch.cat([queries, keys_values], dim=-1).flatten(-2)


# What a packed layer saves (besides its spec); a float layer saves its master weight and clipping logits instead.
PACKED_STATE_NAMES = ("zqat_qweight", "zqat_scales", "zqat_zeros")


def _check_packed(packed: PackedWeight, spec: LayerQuantSpec, in_features: int, out_features: int, name: str) -> None:
    """Refuse packed storage that is not this layer's (shape, dtype, zero point range, symmetric zero points)."""
    n_groups = in_features // spec.group_size
    expected = {
        "qweight": (packed_shape(in_features, out_features, spec.w_bits), torch.int32),
        "scale": ((out_features, n_groups), torch.float32),
        "zero": ((out_features, n_groups), torch.uint8),
    }
    where = name or "the layer"
    for field, (shape, dtype) in expected.items():
        tensor = getattr(packed, field)
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{where}: packed {field} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} "
                             f"{tuple(shape)} for a [{out_features}, {in_features}] weight at {spec.w_bits} bits, "
                             f"groups of {spec.group_size}")
    if packed.zero.numel() and int(packed.zero.max()) >= 2**spec.w_bits:  # (uint8 against 256 would wrap)
        raise ValueError(f"{where}: a zero point lies outside [0, {2**spec.w_bits}) for {spec.w_bits} bits")
    symmetric_zero = 2 ** (spec.w_bits - 1)
    if spec.symmetric and not bool((packed.zero == symmetric_zero).all()):
        raise ValueError(f"{where}: symmetric quantization fixes every zero point at {symmetric_zero}, but these range "
                         f"over {int(packed.zero.min())}..{int(packed.zero.max())}: the layer is asymmetric")


def _pack_before_loading_packed_state(layer: ZQATLinear, state_dict: dict, prefix: str, *args: Any) -> None:
    """A checkpoint can hold packed codes for a layer that a fresh injection keeps in float form (a trained
    layer packed after training): pack the layer first, so the saved codes, scales and zero points load
    into storage of their shape instead of being dropped."""
    for adapter in layer.zqat_spec:
        for name in PACKED_STATE_NAMES:
            # peft names checkpoint keys after the model's keys that exist before loading; storage that
            # only packing creates arrives without the adapter name.
            bare = f"{prefix}{name}"
            if bare in state_dict:
                state_dict[f"{bare}.{adapter}"] = state_dict.pop(bare)
        holds_codes = f"{prefix}zqat_qweight.{adapter}" in state_dict
        if holds_codes and not layer.is_packed(adapter):
            layer.pack(adapter)


def _warn_if_activations_are_quantized(spec: LayerQuantSpec) -> None:
    dropped = [f"{name}={bits}" for name, bits in (("a_bits", spec.a_bits), ("kv_bits", spec.out_bits)) if bits < 16]
    if dropped:
        warnings.warn(
            f"activation quantization ({', '.join(dropped)}) is not part of a merged model: the merged layers run "
            "their activations in full precision. Keep the adapter (PeftModel) to evaluate with it.",
            stacklevel=3,
        )
