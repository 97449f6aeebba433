"""The ZeroQAT peft tuner: injection, save/load, merge, memory, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import zqat_peft
from zqat_peft import ZeroQATConfig, ZQATLinear
from zqat_peft.quant import fake_quantize_weight

from .conftest import TINY_CONFIGS, tiny_batch, tiny_model


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _zqat_layers(model):
    return [m for m in model.modules() if isinstance(m, ZQATLinear)]


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_linear_but_lm_head_is_quantized(arch):
    model = tiny_model(arch)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # lm_head stays
    peft_model = get_peft_model(model, ZeroQATConfig(w_bits=4, group_size=32, trainable="lightweight"))
    layers = _zqat_layers(peft_model)
    assert len(layers) == n_linear
    assert not isinstance(peft_model.get_output_embeddings(), ZQATLinear)
    logits = _logits(peft_model, tiny_batch())
    assert torch.isfinite(logits).all()


MODES = ["full", "lightweight", "scales"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("a_bits", [16, 8])
def test_save_load_gives_bit_identical_logits(tmp_path, mode, w_bits, group_size, a_bits):
    config = ZeroQATConfig(w_bits=w_bits, group_size=group_size, a_bits=a_bits, kv_bits=a_bits, trainable=mode)
    model = get_peft_model(tiny_model(), config)
    # Move off the initial state so the test sees saved values, not values recomputed from the base model.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.01)
    batch = tiny_batch()
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(_logits(loaded, batch), expected)


def test_adapter_files_hold_packed_integers(tmp_path):
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=3, group_size=64, trainable="lightweight"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ZQAT"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    qweights = {k: v for k, v in tensors.items() if "zqat_qweight" in k}
    masters = {k for k in tensors if "zqat_weight" in k}
    assert qweights and all(v.dtype == torch.int32 for v in qweights.values())
    # 3-bit codes of a [256 out, 128 in] layer: 128 / 32 * 3 words per column
    assert any(v.shape == (12, 256) for v in qweights.values())
    assert masters and all(("q_proj" in k or "v_proj" in k) for k in masters)


@pytest.mark.parametrize("mode", MODES)
def test_merge_and_unload_gives_plain_model_on_the_grid(mode):
    config = ZeroQATConfig(w_bits=2, group_size=64, trainable=mode)
    model = get_peft_model(tiny_model(), config)
    batch = tiny_batch()
    expected = _logits(model, batch)
    merged = model.merge_and_unload()
    assert not _zqat_layers(merged)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(merged, batch), expected)
    weight = merged.model.layers[0].mlp.down_proj.weight
    assert weight.shape == (128, 256)
    # On the grid: quantizing again changes nothing (up to float rounding of the rescale).
    torch.testing.assert_close(fake_quantize_weight(weight, 2, 64, False), weight)
    # Each group of 64 uses at most 4 distinct values.
    assert max(len(g.unique()) for g in weight.reshape(-1, 64)) <= 4


def test_trainable_parameters_follow_the_mode():
    def trainable(mode, **kw):
        model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=64, trainable=mode, **kw))
        return {n.split("base_model.model.")[-1] for n, p in model.named_parameters() if p.requires_grad}

    full = trainable("full")
    assert full and all(".zqat_weight." in n for n in full)
    assert len(full) == 2 * 7  # two blocks of q, k, v, o, gate, up, down
    light = trainable("lightweight")
    assert light and all(".zqat_weight." in n and ("q_proj" in n or "v_proj" in n) for n in light)
    assert len(light) == 2 * 2
    scales = trainable("scales")
    assert scales and all(".zqat_scales." in n for n in scales)


def test_packed_layers_free_their_float_weight():
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=64, trainable="lightweight"))
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert down.is_packed("default")
    assert down.base_layer.weight.numel() == 0
    assert len(down.zqat_weight) == 0
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not q.is_packed("default") and q.zqat_weight["default"].shape == (128, 128)


def _layer_bytes(model) -> int:
    seen, total = set(), 0
    for layer in _zqat_layers(model):
        for t in list(layer.parameters()) + list(layer.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("w_bits,limit", [(4, 0.30), (2, 0.17)])
def test_scales_mode_really_saves_memory(w_bits, limit):
    base = tiny_model(dtype=torch.bfloat16)
    bf16_bytes = sum(
        m.weight.numel() * 2 for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    model = get_peft_model(base, ZeroQATConfig(w_bits=w_bits, group_size=128, trainable="scales"))
    ratio = _layer_bytes(model) / bf16_bytes
    assert ratio <= limit, f"W{w_bits} g128 layers hold {ratio:.3f}x the bf16 bytes (limit {limit})"


def test_fake_quant_forward_matches_packed_forward():
    """A trained layer's fake-quantized weight and the same layer packed give identical outputs."""
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=3, group_size=32, trainable="full"))
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    x = torch.randn(3, 5, 128)
    before = layer(x)
    layer.pack("default")
    assert torch.equal(layer(x), before)


# ----- bad input -----------------------------------------------------------------------------------


def test_unsupported_bits_are_refused():
    with pytest.raises(ValueError, match=r"2, 3, 4, 8"):
        ZeroQATConfig(w_bits=5)
    with pytest.raises(ValueError, match=r"4, 6, 8, 16"):
        ZeroQATConfig(a_bits=5)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match=r"q_proj.*128.*96|q_proj.*96.*128"):
        get_peft_model(tiny_model(), ZeroQATConfig(group_size=96))


def test_target_modules_that_match_nothing():
    with pytest.raises(ValueError, match=r"not found"):
        get_peft_model(tiny_model(), ZeroQATConfig(target_modules=["no_such_proj"]))


def test_non_linear_target_is_refused():
    with pytest.raises(TypeError, match=r"embed_tokens.*nn.Linear"):
        get_peft_model(tiny_model(), ZeroQATConfig(target_modules=["embed_tokens"]))


def test_adapter_into_base_of_another_shape(tmp_path):
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=64))
    model.save_pretrained(tmp_path)
    other = transformers_tiny_with_hidden(256)
    with pytest.raises((ValueError, RuntimeError), match=r"shape|size"):
        PeftModel.from_pretrained(other, tmp_path)


def transformers_tiny_with_hidden(hidden: int):
    import transformers

    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.hidden_size = hidden
    return transformers.AutoModelForCausalLM.from_config(config)


def test_registration_is_idempotent():
    zqat_peft.register_zqat()
    zqat_peft.register_zqat()
    from peft import PeftType

    assert PeftType.ZQAT.value == "ZQAT"
    assert PeftType("ZQAT") is PeftType.ZQAT
