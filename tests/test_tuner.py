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
from zqat_peft.zo import ZOOptimizer, spsa_losses, zo_parameters

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
    config = ZeroQATConfig(w_bits=4, group_size=32, trainable="lightweight",
                           trainable_modules=["q_proj", "v_proj", "query_key_value"])  # GPT-NeoX: fused
    peft_model = get_peft_model(model, config)
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
    batch = tiny_batch()
    injected = _logits(model, batch)
    _move_off_the_injected_state(model)
    expected = _logits(model, batch)
    assert not torch.equal(expected, injected)  # else a loader that re-injects would pass
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(_logits(loaded, batch), expected)


def _move_off_the_injected_state(model) -> None:
    """Change every saved ZeroQAT tensor (master weights, clipping logits, scales, packed codes and zero
    points), so a loader that recomputes any of them from the base model gives other logits."""
    with torch.no_grad():
        for layer in _zqat_layers(model):
            for holder in (layer.zqat_weight, layer.zqat_scales, layer.zqat_input_scale):
                for p in holder.values():
                    p.mul_(1.01)
            for holder in (layer.zqat_clip_lower, layer.zqat_clip_upper):
                for p in holder.values():
                    p.sub_(18.0)  # sigmoid(20) == 1 in float32; sigmoid(2) clips the range to 0.88
            for codes in layer.zqat_qweight.values():
                codes.bitwise_xor_(1)  # the lowest bit of each word: a valid code of the first row
            for zeros in layer.zqat_zeros.values():
                zeros.bitwise_xor_(1)  # stays in [0, 2**bits - 1]


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


def _smoothed_model(a_bits: int = 8):
    """A weight-activation adapter whose layers carry (random, positive) smoothing scales, as calibration
    leaves them: (x / s) @ Q(W s)^T."""
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, a_bits=a_bits, group_size=32, init="calibrate"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in _zqat_layers(model):
            inverse = layer.zqat_input_scale["default"]
            inverse.copy_(torch.rand(inverse.shape, generator=gen) * 1.5 + 0.25)
    return model


def test_merge_and_unload_keeps_the_function_of_a_smoothed_adapter(monkeypatch):
    from zqat_peft.tuner import layer as layer_module

    model = _smoothed_model()
    batch = tiny_batch()
    # A merged model runs its activations in full precision: compare the weight side only.
    monkeypatch.setattr(layer_module, "fake_quantize_activation", lambda x, *args, **kwargs: x)
    expected = _logits(model, batch)
    with pytest.warns(UserWarning, match=r"activation quantization \(a_bits=8\) is not part of a merged model"):
        merged = model.merge_and_unload()
    assert not _zqat_layers(merged)
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_the_adapter(monkeypatch):
    model = _smoothed_model()
    batch = tiny_batch()
    before = _logits(model, batch)
    with pytest.warns(UserWarning, match="not part of a merged model"):
        model.merge_adapter()
    assert all(layer.merged for layer in _zqat_layers(model))
    model.unmerge_adapter()
    assert not any(layer.merged or layer.base_layer.weight.numel() for layer in _zqat_layers(model))
    assert torch.equal(_logits(model, batch), before)


def test_weight_only_merge_does_not_warn():
    import warnings

    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_and_unload()
    assert not [w for w in caught if "merged model" in str(w.message)]


def test_packed_trained_layer_survives_save_and_load(tmp_path):
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=3, group_size=32, trainable="full"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.zqat_weight["default"].mul_(1.05)  # as if trained: the base model alone cannot give these codes
    layer.pack("default")
    batch = tiny_batch()
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    # peft warns about checkpoint keys that the model does not take
    assert not [str(w.message) for w in caught if "zqat_" in str(w.message)]
    loaded_layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert loaded_layer.is_packed("default") and not len(loaded_layer.zqat_weight)
    assert torch.equal(_logits(loaded, batch), expected)


def test_symmetric_quantization_through_the_tuner():
    """A packed symmetric layer multiplies with absmax-scaled codes around 2**(bits-1), written out here."""
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=32, symmetric=True, trainable="scales"))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    groups = tiny_model().model.layers[1].mlp.down_proj.weight.detach().reshape(128, 8, 32)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 7
    codes = (torch.round(groups / scale) + 8).clamp(0, 15)
    reference = ((codes - 8) * scale).reshape(128, 256)
    assert layer.is_packed("default")
    assert torch.equal(layer.zqat_zeros["default"], torch.full((128, 8), 8, dtype=torch.uint8))
    assert torch.equal(layer.quantized_weight("default"), reference)
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(layer(x), x @ reference.t())


def test_kv_bits_leave_the_queries_of_a_fused_projection_alone():
    """GPT-NeoX's query_key_value gives [q, k, v] per head: kv_bits quantizes k and v, never q."""
    model = get_peft_model(tiny_model("gpt_neox"), ZeroQATConfig(w_bits=8, group_size=32, kv_bits=4))
    layer = model.base_model.model.gpt_neox.layers[0].attention.query_key_value
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        got = layer(x).reshape(2, 5, 4, 3, 32)  # 4 heads of 3 x head_dim 32
        unquantized = torch.nn.functional.linear(x, layer.quantized_weight("default"), layer.base_layer.bias)
    unquantized = unquantized.reshape(2, 5, 4, 3, 32)
    assert torch.equal(got[..., 0, :], unquantized[..., 0, :])
    assert not torch.allclose(got[..., 1:, :], unquantized[..., 1:, :], atol=1e-3)
    for head in got[..., 1:, :].reshape(-1, 32):  # 4 bits: at most 16 levels per token and head
        assert len(head.unique()) <= 16


def test_kv_bits_leave_the_queries_of_phi3_qkv_alone():
    """Phi-3's qkv_proj gives all query heads, then the key heads, then the value heads."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     pad_token_id=0)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                           ZeroQATConfig(w_bits=8, group_size=32, kv_bits=4))
    layer = model.base_model.model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        got = layer(x)
        unquantized = torch.nn.functional.linear(x, layer.quantized_weight("default"), layer.base_layer.bias)
    assert torch.equal(got[..., :128], unquantized[..., :128])  # 4 query heads of 32
    assert not torch.allclose(got[..., 128:], unquantized[..., 128:], atol=1e-3)


def test_kv_bits_of_separate_projections_quantize_keys_and_values_only():
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=8, group_size=32, kv_bits=4))
    attn = model.base_model.model.model.layers[0].self_attn
    assert [attn.q_proj.zqat_spec["default"].out_bits, attn.k_proj.zqat_spec["default"].out_bits,
            attn.v_proj.zqat_spec["default"].out_bits] == [16, 4, 4]


# ----- unsupported operations ----------------------------------------------------------------------


def test_unload_is_refused():
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=32))
    with pytest.raises(RuntimeError, match=r"nothing to unload.*merge_and_unload"):
        model.unload()


def test_disabling_the_adapter_is_refused_and_leaves_it_working():
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=32))
    batch = tiny_batch()
    expected = _logits(model, batch)
    with pytest.raises(RuntimeError, match=r"cannot be disabled"):
        with model.disable_adapter():
            _logits(model, batch)
    assert torch.equal(_logits(model, batch), expected)


# ----- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(trainable="partial"),
     r"trainable must be one of \('full', 'lightweight', 'scales', 'act_clip', 'none'\), got 'partial'"),
    (dict(init="gptq"), r"init must be one of \('rtn', 'calibrate'\), got 'gptq'"),
    (dict(trainable="lightweight", trainable_modules=[]), r"trainable='lightweight' needs trainable_modules"),
])
def test_bad_trainable_and_init_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZeroQATConfig(**kwargs)


def test_trainable_modules_that_match_no_layer_are_refused():
    config = ZeroQATConfig(w_bits=4, group_size=32, trainable="lightweight", trainable_modules=["qproj"])
    with pytest.raises(ValueError, match=r"trainable_modules \['qproj'\] match none of the quantized layers"):
        get_peft_model(tiny_model(), config)


def test_modules_to_save_that_match_nothing_or_a_quantized_layer_are_refused():
    with pytest.raises(ValueError, match=r"'input_layrnorm', which matches no module"):
        get_peft_model(tiny_model(), ZeroQATConfig(modules_to_save=["input_layrnorm"]))
    with pytest.raises(ValueError, match=r"'mlp' matches model.layers.0.mlp, which is or holds a linear layer"):
        get_peft_model(tiny_model(), ZeroQATConfig(modules_to_save=["mlp"]))
    for embedding in ("lm_head", "embed_tokens"):
        with pytest.raises(ValueError, match=rf"'{embedding}' matches .*{embedding}, which is or holds"):
            get_peft_model(tiny_model(), ZeroQATConfig(modules_to_save=[embedding]))


def test_trained_norms_are_trainable_saved_and_loaded(tmp_path):
    norms = ["input_layernorm", "post_attention_layernorm", "norm"]
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=2, group_size=32, trainable="scales", modules_to_save=norms))
    trained = [name for name, p in model.named_parameters() if p.requires_grad and "zqat_scales" not in name]
    assert len(trained) == 2 * 2 + 1 and all(".modules_to_save.default.weight" in name for name in trained)
    for name, param in model.named_parameters():
        if name in trained:
            param.data.mul_(1.5)
    ids = tiny_batch()["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def _zo_steps(model, params, ids: torch.Tensor, steps: int) -> None:
    """Relative SPSA steps on the language-model loss of ``ids``."""
    optimizer = ZOOptimizer(params, lr=1e-2, eps=1e-2, step="relative")
    for _ in range(steps):
        (seed,) = optimizer.seeds
        pos, neg = spsa_losses(params, lambda: model(input_ids=ids, labels=ids).loss, seed, optimizer.eps)
        optimizer.accumulate((pos.double() - neg.double()).reshape(1))
        optimizer.step()


def test_trainable_none_packs_every_layer_and_zo_trains_only_the_modules_to_save():
    norms = ["input_layernorm", "post_attention_layernorm", "norm"]
    with pytest.raises(ValueError, match=r"trainable='none' .* nothing would be trained"):
        ZeroQATConfig(trainable="none")
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=3, group_size=32, trainable="none", modules_to_save=norms))
    layers = [m for m in model.modules() if isinstance(m, ZQATLinear)]
    assert layers and all(layer.is_packed("default") for layer in layers)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}  # parameters and buffers
    params = zo_parameters(model)
    assert len(params) == 2 * 2 + 1 and all(".modules_to_save.default.weight" in p.name for p in params)
    _zo_steps(model, params, tiny_batch()["input_ids"], steps=2)
    moved = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert moved == {p.name for p in params}  # the norms moved; no packed code, scale or zero point did


def test_act_clip_is_refused_outside_0_1_and_without_quantized_activations():
    for ratio in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"act_clip .* in \(0, 1\]"):
            ZeroQATConfig(a_bits=4, act_clip=ratio)
    with pytest.raises(ValueError, match=r"a_bits=16 quantizes none"):
        ZeroQATConfig(act_clip=0.9)


def test_act_clip_is_a_ratio_per_layer_that_the_forward_uses_zo_trains_and_the_adapter_saves(tmp_path):
    def w4a4(**kwargs):
        return get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, a_bits=4, group_size=-1, **kwargs))

    batch = tiny_batch()
    model = w4a4(trainable="scales", act_clip=0.8)
    layers = _zqat_layers(model)
    assert all(float(layer.zqat_act_clip["default"].detach()) == pytest.approx(0.8) for layer in layers)
    assert not torch.equal(_logits(model, batch), _logits(w4a4(trainable="scales"), batch))
    params = zo_parameters(model)
    clips = [p for p in params if ".zqat_act_clip." in p.name]
    assert len(clips) == len(layers)
    _zo_steps(model, params, batch["input_ids"], steps=1)
    trained = [float(p.param) for p in clips]
    assert all(r != pytest.approx(0.8, abs=1e-9) for r in trained)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert [float(layer.zqat_act_clip["default"]) for layer in _zqat_layers(loaded)] == trained
    assert torch.equal(_logits(loaded, batch), expected)
    frozen = w4a4(trainable="none", act_clip=0.8, modules_to_save=["norm"])
    assert not any(".zqat_act_clip." in p.name for p in zo_parameters(frozen))


def test_trainable_act_clip_packs_every_layer_and_zo_trains_only_the_clipping_ratios():
    for bad in (dict(a_bits=4), dict(act_clip=1.0, a_bits=16)):
        with pytest.raises(ValueError, match=r"trainable='act_clip' .* have none"):
            ZeroQATConfig(trainable="act_clip", **bad)
    config = ZeroQATConfig(w_bits=4, a_bits=4, group_size=-1, act_clip=0.8, trainable="act_clip")
    model = get_peft_model(tiny_model(), config)
    layers = _zqat_layers(model)
    assert layers and all(layer.is_packed("default") for layer in layers)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    params = zo_parameters(model)
    assert len(params) == len(layers) and all(".zqat_act_clip." in p.name for p in params)
    _zo_steps(model, params, tiny_batch()["input_ids"], steps=1)
    moved = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert moved == {p.name for p in params}  # the ratios moved; no packed code, scale or zero point did


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
