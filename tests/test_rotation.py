"""Rotation of the residual stream: the float model computes the same logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from zqat_peft.rotation import random_orthogonal, rotate_model

from .conftest import NORMS, TINY_CONFIGS, tiny_model, with_trained_norms


def _with_norm_weights(model):
    """Random RMSNorm weights, so that folding them is tested (a fresh model's are all ones)."""
    gen = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_rotation_leaves_the_float_logits_unchanged(arch):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _with_norm_weights(tiny_model(arch))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        embed_before = model.get_input_embeddings().weight.clone()
        rotate_model(model, seed=1)
        after = model(input_ids=ids).logits
    assert not torch.allclose(model.get_input_embeddings().weight, embed_before, atol=1e-3)  # it did rotate
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_are_untied_and_stay_exact():
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = True
    model = _with_norm_weights(transformers.AutoModelForCausalLM.from_config(config).eval())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        rotate_model(model, seed=2)
        after = model(input_ids=ids).logits
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_rotation_spreads_an_outlier_channel():
    q = random_orthogonal(128, seed=0)
    torch.testing.assert_close(q @ q.t(), torch.eye(128, dtype=torch.float64))
    x = torch.zeros(1, 128, dtype=torch.float64)
    x[0, 3] = 100.0
    assert (x @ q).abs().max() < 40


def test_other_architectures_are_refused():
    with pytest.raises(ValueError, match="LLaMA-style models"):
        rotate_model(tiny_model("gemma"))


def test_a_rotated_quantized_model_saves_and_reloads(tmp_path):
    from peft import PeftModel, get_peft_model

    from zqat_peft import ZeroQATConfig

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = tiny_model()
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=8, group_size=32, rotate=True, rotation_seed=3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        # 8-bit weights on the rotated model stay close to the float model
        torch.testing.assert_close(logits, reference(input_ids=ids).logits, rtol=0.05, atol=0.05)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)  # rebuilt from the same seed
        assert torch.equal(loaded(input_ids=ids).logits, logits)


# --- the online Hadamard before down_proj --------------------------------------------------------------------

def _hadamard_model(arch: str = "llama", model=None, **changes):
    from peft import get_peft_model

    from zqat_peft import ZeroQATConfig

    settings = {"w_bits": 8, "group_size": 32, "rotate": True, "rotation_seed": 1, **changes}
    return get_peft_model(model if model is not None else _with_norm_weights(tiny_model(arch)),
                          ZeroQATConfig(**settings))


def _zqat_layers(model):
    from zqat_peft import ZQATLinear

    return [m for m in model.modules() if isinstance(m, ZQATLinear)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_online_hadamard_leaves_the_float_logits_unchanged(arch):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = _with_norm_weights(tiny_model(arch))(input_ids=ids).logits
        model = _hadamard_model(arch)
        layers = _zqat_layers(model)
        for layer in layers:
            layer.fake_quant = False  # the float function: no weight or activation quantization
        after = model(input_ids=ids).logits
    down_projs = [m for m in model.modules() if type(m).__name__ == "ZQATLinear" and m.zqat_input_hadamard]
    assert len(down_projs) == 2 and len(layers) == 14  # only the down_projs rotate their input
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def _planted_outlier_model():
    """A tiny model whose down_proj inputs carry one channel ~30x larger than the rest (SwiGLU outliers)."""
    model = tiny_model()
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.up_proj.weight[7] *= 30.0
    return model


def _down_proj_activation_error(online_hadamard: bool) -> float:
    """Relative error that 4-bit activations add to the first down_proj's output (8-bit weights)."""
    model = _hadamard_model(model=_planted_outlier_model(), a_bits=4, online_hadamard=online_hadamard)
    down_proj = model.get_base_model().model.layers[0].mlp.down_proj
    seen = []
    handle = down_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)))
        handle.remove()
        quantized = down_proj(seen[0])
        down_proj.fake_quant = False
        exact = down_proj(seen[0])
    return float((quantized - exact).norm() / exact.norm())


def test_online_hadamard_lowers_the_4_bit_activation_error_of_down_proj():
    without, with_hadamard = _down_proj_activation_error(False), _down_proj_activation_error(True)
    assert with_hadamard < 0.5 * without, (with_hadamard, without)


def test_a_model_with_online_hadamard_saves_and_reloads(tmp_path):
    from peft import PeftModel

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _hadamard_model(model=tiny_model(), a_bits=4, trainable="scales")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)  # the same W H and online H rebuilt
        assert torch.equal(loaded(input_ids=ids).logits, logits)


def test_merge_and_unload_keeps_the_function_of_the_online_hadamard():
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _hadamard_model(w_bits=4)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_down_proj_left_unquantized_with_online_hadamard_is_refused():
    with pytest.raises(ValueError, match="online_hadamard=False"):
        _hadamard_model(exclude_modules=["down_proj"])
    _hadamard_model(exclude_modules=["down_proj"], online_hadamard=False)  # no Hadamard fused: fine


def test_integer_exports_refuse_the_online_hadamard_and_merged_carries_it(tmp_path):
    from zqat_peft.export import save_compressed_tensors, save_gguf, save_gptq, save_merged

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _hadamard_model(model=tiny_model(), w_bits=4, trainable="scales")
    for save in (save_gptq, save_compressed_tensors, save_gguf):
        with pytest.raises(ValueError, match="Hadamard matrix at run time"):
            save(model, tmp_path / save.__name__, object())  # refused before the tokenizer is read
        assert not (tmp_path / save.__name__).exists()
    save_merged(model, tmp_path / "merged")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_calibration_with_online_hadamard_saves_and_reloads(tmp_path):
    """Smoothing and GPTQ rounding see down_proj's rotated input; the calibrated model reloads the same."""
    from peft import PeftModel

    from zqat_peft import calibrate, calibration_batches

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _hadamard_model(model=_planted_outlier_model(), w_bits=4, a_bits=4, init="calibrate", calib_epochs=1,
                            rounding="gptq", trainable="scales")
    batches = calibration_batches(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0)), 4, 32, 2)
    calibrate(model, batches, progress=False)
    down_proj = model.get_base_model().model.layers[0].mlp.down_proj
    assert down_proj.is_packed("default") and down_proj.zqat_input_hadamard
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(_planted_outlier_model(), tmp_path)
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_trained_norms_of_a_rotated_model_save_reload_and_export_merged(tmp_path):
    """The W4A4 recipe trains the RMSNorm weights of the rotated model (all ones after folding): their trained
    copies must survive the adapter's save and the merged export, where the rotation is rebuilt or baked in.
    (16-bit activations: the merged float export cannot carry 4-bit ones and says so when it drops them.)"""
    from peft import PeftModel

    from zqat_peft.export import save_merged

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _hadamard_model(model=tiny_model(), w_bits=4, trainable="scales", modules_to_save=NORMS)
    trained = [p for n, p in model.named_parameters() if "modules_to_save" in n]
    assert len(trained) == 5 and all(p.requires_grad for p in trained)  # two blocks' two norms and the final one
    with torch.no_grad():
        untrained = model(input_ids=ids).logits
        logits = with_trained_norms(model, spread=0.3)(input_ids=ids).logits
        assert not torch.allclose(logits, untrained, atol=1e-3)
        model.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")
        assert torch.equal(loaded(input_ids=ids).logits, logits)
        save_merged(model, tmp_path / "merged")
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
