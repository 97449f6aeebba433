"""Rotation of the residual stream: the float model computes the same logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from zqat_peft.rotation import random_orthogonal, rotate_model

from .conftest import TINY_CONFIGS, tiny_model


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
