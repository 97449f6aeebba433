"""Building a packed model layer by layer, from a checkpoint or from random weights."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from zqat_peft import ZeroQATConfig, ZQATLinear
from zqat_peft.build import build_packed_model

from .conftest import TINY_CONFIGS, tiny_batch, tiny_model


@pytest.mark.parametrize("mode,act", [("lightweight", {}), ("scales", {}),
                                      ("scales", dict(a_bits=4, act_clip=0.8))])  # the ratio has no checkpoint entry
def test_built_from_a_checkpoint_equals_wrapping_the_loaded_model(tmp_path, mode, act):
    tiny_model("llama").save_pretrained(tmp_path)
    config = dict(w_bits=3, group_size=64, trainable=mode, **act)
    expected = get_peft_model(tiny_model("llama"), ZeroQATConfig(**config))
    built = build_packed_model(tmp_path, ZeroQATConfig(**config), dtype=torch.float32)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(built(**batch).logits, expected(**batch).logits)


def test_a_tied_output_embedding_is_built_tied_from_a_checkpoint_without_it(tmp_path):
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = True
    base = AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(tmp_path)  # without lm_head.weight
    zqat = ZeroQATConfig(w_bits=4, group_size=32, trainable="scales")
    built = build_packed_model(tmp_path, zqat, dtype=torch.float32)
    inner = built.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(built(**batch).logits, get_peft_model(base, zqat)(**batch).logits)


def test_random_build_is_packed_deterministic_and_leaves_nothing_on_meta():
    config = tiny_model("llama").config

    def build():
        return build_packed_model(config, ZeroQATConfig(w_bits=2, group_size=64, trainable="scales"), seed=3)

    model = build()
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert all(m.is_packed("default") for m in model.modules() if isinstance(m, ZQATLinear))
    batch = tiny_batch()
    with torch.no_grad():
        loss = model(**batch).loss
        assert torch.isfinite(loss) and torch.equal(build()(**batch).loss, loss)


def test_calibrated_init_cannot_be_built_packed(tmp_path):
    with pytest.raises(ValueError, match="RTN"):
        build_packed_model(tiny_model().config, ZeroQATConfig(init="calibrate"))
