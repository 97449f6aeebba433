"""Shared fixtures: tiny random decoder-only models of the architectures ZeroQAT supports."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers

# Every tiny model has hidden 128 and MLP width 256, so group sizes 32/64/128 and per-channel all apply.
_TINY = dict(vocab_size=256, hidden_size=128, num_attention_heads=4, max_position_embeddings=128)
TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **_TINY, intermediate_size=256, num_hidden_layers=2, num_key_value_heads=2
    ),
    "mistral": lambda: transformers.MistralConfig(
        **_TINY, intermediate_size=256, num_hidden_layers=2, num_key_value_heads=2
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **_TINY, intermediate_size=256, num_hidden_layers=2, num_key_value_heads=2
    ),
    "gemma": lambda: transformers.GemmaConfig(
        **_TINY, intermediate_size=256, num_hidden_layers=2, num_key_value_heads=2, head_dim=32
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=256, hidden_size=128, num_attention_heads=4, ffn_dim=256, num_hidden_layers=2,
        word_embed_proj_dim=128, max_position_embeddings=128,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_TINY, intermediate_size=256, num_hidden_layers=2
    ),
    "phi": lambda: transformers.PhiConfig(**_TINY, intermediate_size=256, num_hidden_layers=2),
}


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) imported as a module, e.g. ``load_benchmark("vs_ptq")``."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]  # every RMSNorm of a LLaMA-style model


def with_trained_norms(model, spread: float = 0.5):
    """The trained copies of peft's modules_to_save set away from the frozen originals (all ones)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.copy_(1 + spread * torch.randn(param.shape, generator=gen))
    return model


def tiny_batch(batch: int = 2, seq: int = 16, vocab: int = 256, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture
def llama():
    return tiny_model("llama")
