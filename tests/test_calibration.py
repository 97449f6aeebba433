"""Block-wise calibration of clipping and smoothing."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from zqat_peft import ZeroQATConfig, ZQATLinear
from zqat_peft.calibration import calibrate, calibration_batches, find_decoder_blocks

from .conftest import tiny_model


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(0)
    return calibration_batches(torch.randint(0, 256, (3000,), generator=gen), n_samples=6, seq_len=32, batch_size=2)


def _logit_error(model, reference, batches) -> float:
    with torch.no_grad():
        return sum(((model(input_ids=b).logits - reference(input_ids=b).logits) ** 2).mean().item() for b in batches)


def _calibrated(batches, **kw):
    model = get_peft_model(tiny_model(), ZeroQATConfig(trainable="lightweight", init="calibrate", calib_epochs=3, **kw))
    return calibrate(model, batches, progress=False)


def test_calibration_beats_rtn_and_packs_frozen_layers(batches):
    reference = tiny_model()
    rtn = get_peft_model(tiny_model(), ZeroQATConfig(trainable="lightweight", w_bits=2, group_size=32))
    model = _calibrated(batches, w_bits=2, group_size=32)
    assert _logit_error(model, reference, batches) < _logit_error(rtn, reference, batches)
    layers = {n.split("model.model.")[-1]: m for n, m in model.named_modules() if isinstance(m, ZQATLinear)}
    assert all(m.is_packed("default") != n.endswith(("q_proj", "v_proj")) for n, m in layers.items())
    assert model.peft_config["default"].calibrated
    assert all(not p.requires_grad for n, p in model.named_parameters() if "clip" in n)


def test_uncalibrated_layers_stay_float_until_calibration():
    model = get_peft_model(tiny_model(), ZeroQATConfig(trainable="scales", init="calibrate"))
    assert not any(m.is_packed("default") for m in model.modules() if isinstance(m, ZQATLinear))


def test_smoothing_groups_share_a_scale_and_keep_the_function(batches):
    model = _calibrated(batches, w_bits=8, a_bits=16, group_size=32)  # weight-only: no smoothing scales
    assert not any(len(m.zqat_input_scale) for m in model.modules() if isinstance(m, ZQATLinear))
    model = _calibrated(batches, w_bits=4, a_bits=4, group_size=32)
    attn = model.base_model.model.model.layers[0].self_attn
    q, k, v = (attn.q_proj.zqat_input_scale["default"], attn.k_proj.zqat_input_scale["default"],
               attn.v_proj.zqat_input_scale["default"])
    assert torch.equal(q, k) and torch.equal(q, v) and not torch.allclose(q, torch.ones_like(q))
    # With quantization off, a smoothed layer computes the same function as before.
    layer, base = attn.q_proj, tiny_model().model.layers[0].self_attn.q_proj
    layer.fake_quant = False
    x = torch.randn(2, 5, 128)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-4, atol=1e-5)


def test_calibrated_model_saves_and_loads_bit_identically(tmp_path, batches):
    model = _calibrated(batches, w_bits=3, a_bits=8, group_size=64)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    ids = batches[0]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def _opt_with_projections():
    """A tiny OPT whose embeddings are narrower than its blocks: project_in / project_out sit outside them."""
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=256, hidden_size=128, num_attention_heads=4, ffn_dim=256,
                                    num_hidden_layers=2, word_embed_proj_dim=64, max_position_embeddings=128)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_calibration_packs_frozen_layers_outside_the_blocks(batches, tmp_path):
    from zqat_peft.calibration.clipping import init_clipping

    settings = dict(w_bits=2, group_size=32, trainable="lightweight", init="calibrate", calib_epochs=1)
    model = get_peft_model(_opt_with_projections(), ZeroQATConfig(**settings))
    decoder = model.base_model.model.model.decoder
    # The clipping they get: the per-group factor with the least weight quantization error.
    reference = get_peft_model(_opt_with_projections(), ZeroQATConfig(**settings))
    expected = {}
    for name in ("project_in", "project_out"):
        layer = getattr(reference.base_model.model.model.decoder, name)
        init_clipping(layer, "default")
        expected[name] = layer.quantized_weight("default")
    calibrate(model, batches, progress=False)
    for name in ("project_in", "project_out"):
        layer = getattr(decoder, name)
        assert layer.is_packed("default"), f"{name} is frozen but stayed float"
        assert torch.equal(layer.quantized_weight("default"), expected[name])
    frozen = [m for m in model.modules() if isinstance(m, ZQATLinear) and not m.is_trained("default")]
    assert frozen and all(m.is_packed("default") for m in frozen)
    # and such a model loads as it was saved
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_opt_with_projections(), tmp_path)
    model.eval()  # OPT has dropout
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batches[0]).logits, model(input_ids=batches[0]).logits)


def test_empty_calibration_set_is_refused():
    model = get_peft_model(tiny_model(), ZeroQATConfig(init="calibrate"))
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], progress=False)


def test_text_shorter_than_the_sequence_length_is_refused():
    with pytest.raises(ValueError, match=r"100 tokens, fewer than the sequence length 256"):
        calibration_batches(torch.arange(100), n_samples=4, seq_len=256)


def test_rtn_model_cannot_be_calibrated(batches):
    model = get_peft_model(tiny_model(), ZeroQATConfig(init="rtn"))
    with pytest.raises(ValueError, match="init='calibrate'"):
        calibrate(model, batches, progress=False)


def test_architecture_without_decoder_blocks_is_named():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="decoder blocks of Flat"):
        find_decoder_blocks(Flat())
