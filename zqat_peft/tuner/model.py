"""ZeroQATModel: the peft tuner that swaps a model's nn.Linear layers for ZQATLinear."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..quant import resolve_group_size
from ..rotation import fuse_down_proj_hadamard, rotate_model
from .config import ZeroQATConfig
from .layer import LayerQuantSpec, ZQATLayer, ZQATLinear
from .registration import PREFIX


class ZeroQATModel(BaseTuner):
    """Quantizes the targeted linear layers of a transformers model (see `ZeroQATConfig`).

    After injection, frozen layers are packed to integers unless the config waits for calibration.
    """

    prefix: str = PREFIX
    tuner_layer_cls = ZQATLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _create_and_replace(
        self,
        config: ZeroQATConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"{current_key} is already wrapped by {type(target).__name__}: apply ZeroQAT to the plain model "
                "(one ZeroQAT adapter per model)."
            )
        if not isinstance(target, nn.Linear):
            raise TypeError(
                f"{current_key} is a {type(target).__name__}; ZeroQAT quantizes nn.Linear layers only. "
                "Remove it from target_modules or add it to exclude_modules."
            )
        quantizes_output = config.quantizes_output(current_key)
        head_dim = self._head_dim(target.out_features)
        block_heads, query_heads = (
            self._fused_qkv_layout(target.out_features, head_dim, current_key) if quantizes_output else (0, 0)
        )
        spec = LayerQuantSpec(
            w_bits=config.w_bits,
            group_size=resolve_group_size(config.group_size, target.in_features, current_key),
            symmetric=config.symmetric,
            a_bits=config.a_bits,
            act_clip=config.act_clip,
            out_bits=config.kv_bits if quantizes_output else 16,
            out_group_size=head_dim,
            smooth=config.smooths,
            out_block_heads=block_heads,
            out_query_heads=query_heads,
            input_hadamard=target.in_features if config.rotates_input(current_key) else 0,
        )
        new_module = ZQATLinear(
            target,
            adapter_name,
            spec,
            trained=config.is_trained(current_key),
            train_scales=config.trainable == "scales",
            train_act_clip=config.trains_act_clip(current_key),
        )
        self._replace_module(parent, target_name, new_module, target)

    def _head_dim(self, out_features: int) -> int:
        """Keys/values are quantized per token and attention head; -1 (whole row) when unknown."""
        model_config = getattr(self.model, "config", None)
        head_dim = getattr(model_config, "head_dim", None)
        if head_dim is None and model_config is not None:
            heads = getattr(model_config, "num_attention_heads", None)
            hidden = getattr(model_config, "hidden_size", None)
            head_dim = hidden // heads if heads and hidden else None
        return head_dim if head_dim and out_features % head_dim == 0 else -1

    def _fused_qkv_layout(self, out_features: int, head_dim: int, key: str) -> tuple[int, int]:
        """(heads per block, query heads per block) of a key/value projection's output: (0, 0) for a plain
        key or value projection, the architecture's layout for a fused query/key/value projection (whose
        queries kv_bits must leave alone)."""
        model_config = getattr(self.model, "config", None)
        heads = getattr(model_config, "num_attention_heads", None)
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        if head_dim <= 0 or not heads or out_features != (heads + 2 * kv_heads) * head_dim:
            return 0, 0
        model_type = getattr(model_config, "model_type", None)
        if model_type in ("gpt_neox", "bloom"):  # [q, k, v] of each head in turn
            return 3, 1
        if model_type == "phi3":  # every query head, then the key heads, then the value heads
            return heads + 2 * kv_heads, heads
        raise ValueError(
            f"{key} looks like a fused query/key/value projection of a {model_type!r} model, whose output layout "
            "ZeroQAT does not know, so kv_bits cannot leave its queries alone. Use kv_bits=16, or leave it out of "
            "kv_modules."
        )

    def _check_new_adapter_config(self, config: ZeroQATConfig) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("A model can hold one ZeroQAT adapter: quantization settings do not stack.")
        self.check_modules_to_save(config.modules_to_save or [])
        if config.trainable == "lightweight":
            linear_names = [name for name, m in self.model.named_modules() if isinstance(m, nn.Linear)]
            if not any(config.is_trained(name) for name in linear_names):
                suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
                raise ValueError(
                    f"trainable_modules {config.trainable_modules} match none of the quantized layers, so nothing "
                    f"would be trained: name them by suffix, one of {suffixes}."
                )

    def check_modules_to_save(self, names: list[str]) -> None:
        """peft wraps every module whose name ends with one of ``names`` and silently skips a name that matches
        none; here a name that matches nothing, or a module holding a linear layer or an embedding, is refused (a
        float copy of a quantized layer would escape quantization; a copy of a tied embedding would untie it)."""
        for wanted in names:
            matched = [(key, m) for key, m in self.model.named_modules() if key.endswith(wanted)]
            if not matched:
                suffixes = sorted({key.rsplit(".", 1)[-1] for key, _ in self.model.named_modules() if key})
                raise ValueError(f"modules_to_save names {wanted!r}, which matches no module of the model: name them "
                                 f"by suffix, e.g. one of {suffixes[:12]}")
            for key, module in matched:
                if any(isinstance(m, (nn.Linear, nn.Embedding)) for m in module.modules()):
                    raise ValueError(
                        f"modules_to_save entry {wanted!r} matches {key}, which is or holds a linear layer or an "
                        "embedding: list only modules such as the norms here, and train quantized layers with "
                        "trainable='full' or 'lightweight'."
                    )

    def _prepare_model(self, peft_config: ZeroQATConfig, model: nn.Module) -> None:
        if peft_config.rotate:  # before the layers are swapped: the rotation is fused into the float weights
            rotate_model(model, peft_config.rotation_seed)
            if peft_config.online_hadamard:  # W H now; each down_proj's ZQATLinear applies x H online
                fuse_down_proj_hadamard(model)

    def _post_injection_hook(self, model: nn.Module, config: ZeroQATConfig, adapter_name: str) -> None:
        if config.rotate and config.online_hadamard:
            self._check_down_projs_rotate_their_input(config)
        if config.packs_frozen_layers:
            self.pack_frozen_layers(adapter_name)

    def _check_down_projs_rotate_their_input(self, config: ZeroQATConfig) -> None:
        """A down_proj holding W H computes the model's function only if it multiplies its input by H."""
        left_out = [name for name, m in self.model.named_modules()
                    if config.rotates_input(name) and not isinstance(m, ZQATLinear) and isinstance(m, nn.Linear)]
        if left_out:
            raise ValueError(
                f"{len(left_out)} down_proj layers (e.g. {left_out[0]}) are not quantized, but online_hadamard=True "
                "fused a Hadamard matrix into their weights, which only a ZeroQAT layer undoes online: quantize "
                "every down_proj (target_modules/exclude_modules) or set online_hadamard=False."
            )

    def zqat_layers(self) -> list[tuple[str, ZQATLinear]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, ZQATLinear)]

    @torch.no_grad()
    def pack_frozen_layers(self, adapter_name: Optional[str] = None) -> None:
        """Pack every layer whose master weight is not trained (frees its float weight)."""
        adapter_name = adapter_name or self.active_adapters[0]
        for _, layer in self.zqat_layers():
            if not layer.is_trained(adapter_name):
                layer.pack(adapter_name)

    def unload(self) -> nn.Module:
        raise RuntimeError(
            "ZeroQAT layers own the only copy of their weights (the original float weights were freed), so there "
            "is nothing to unload to. Use merge_and_unload() for a plain model with the quantized weights."
        )
