"""Exports read back by the real readers: GPTQModel's torch kernel, compressed-tensors' decompressor, the gguf
package's dequantize and transformers' loaders must give the weights (and logits) of the ZeroQAT model.

GPTQModel is an optional install (the ``export`` extra); its tests are skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import transformers
from peft import get_peft_model

import zqat_peft  # noqa: F401  (registers ZeroQAT with peft)
from zqat_peft import ZeroQATConfig, ZQATLinear
from zqat_peft.export import (
    ExportWarning, QuantizedLinear, save_compressed_tensors, save_gguf, save_gptq, save_merged,
)
from zqat_peft.export.compressed_tensors import compressed_tensors_quantization_config, compressed_tensors_tensors
from zqat_peft.export.gguf import q4_1_blocks
from zqat_peft.export.gptq import GPTQ_V1, GPTQ_V2, choose_checkpoint_format, gptq_qzeros, gptq_tensors

from .conftest import NORMS, tiny_batch, tiny_model, with_trained_norms

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # GPTQModel wraps its dequantization in torch.compile
needs_gptqmodel = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
    reason="GPTQModel and optimum are not installed (pip install zqat_peft[export])",
)
IN, OUT = 256, 64
GROUPS = [32, 64, 128, -1]


def random_layer(bits: int, group_size: int, zero_zero: bool, symmetric: bool = False, seed: int = 0) -> QuantizedLinear:
    """Random codes, float16-exact scales (the GPTQ and GGUF scale type) and zero points; with ``zero_zero`` the
    first group of every row has zero point 0, else every zero point is at least 1."""
    gen = torch.Generator().manual_seed(seed)
    group = IN if group_size == -1 else group_size
    n_groups = IN // group
    codes = torch.randint(0, 2**bits, (OUT, IN), generator=gen).to(torch.uint8)
    scale = (torch.rand(OUT, n_groups, generator=gen) * 0.02 + 1e-3).half().float()
    if symmetric:
        zero = torch.full((OUT, n_groups), 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zero = torch.randint(1, 2**bits, (OUT, n_groups), generator=gen).to(torch.uint8)
        if zero_zero:
            zero[:, 0] = 0
    return QuantizedLinear(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group, symmetric=symmetric)


# ------------------------------------------------------------------------------------ GPTQ, per layer


def gptqmodel_weight(q: QuantizedLinear, tensors: dict[str, torch.Tensor], checkpoint_format: str) -> torch.Tensor:
    """The weight [out, in] GPTQModel's pure-torch kernel dequantizes from the tensors, after its own v1 -> v2
    conversion of the zero points (what transformers runs at load)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    module = TorchLinear(bits=q.bits, group_size=-1 if q.per_channel else q.group_size, sym=q.symmetric,
                         desc_act=False, in_features=q.in_features, out_features=q.out_features, bias=False)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(module, name).copy_(tensors[name])
    if checkpoint_format == GPTQ_V1:
        convert_gptq_v1_to_v2_format_module(module, q.bits, torch.int32)
    module.post_init()
    return module.dequantize_weight().t()


@needs_gptqmodel
@pytest.mark.parametrize("zero_zero", [False, True], ids=["z>=1", "z=0"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptqmodel_dequantizes_our_gptq_tensors_bit_for_bit(bits, group_size, zero_zero):
    q = random_layer(bits, group_size, zero_zero)
    checkpoint_format = choose_checkpoint_format({"layer": q})
    assert checkpoint_format == (GPTQ_V2 if zero_zero else GPTQ_V1)
    got = gptqmodel_weight(q, gptq_tensors(q, checkpoint_format), checkpoint_format)
    assert got.dtype == torch.float16  # GPTQModel dequantizes with its float16 scales
    assert torch.equal(got, q.dequantize().half())


@needs_gptqmodel
def test_gptqmodel_reads_symmetric_gptq_v1():
    q = random_layer(4, 64, False, symmetric=True)
    assert choose_checkpoint_format({"layer": q}) == GPTQ_V1
    got = gptqmodel_weight(q, gptq_tensors(q, GPTQ_V1), GPTQ_V1)
    assert torch.equal(got, q.dequantize().half())


def test_gptq_v1_cannot_hold_a_zero_point_of_zero():
    q = random_layer(3, 32, zero_zero=True)
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_qzeros(q.zero, q.bits, GPTQ_V1)


# ------------------------------------------------------------------------ compressed-tensors, per layer


@pytest.mark.parametrize("zero_zero", [False, True], ids=["z>=1", "z=0"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compressed_tensors_decompresses_our_tensors_bit_for_bit(bits, group_size, zero_zero):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    q = random_layer(bits, group_size, zero_zero)
    config = QuantizationConfig.model_validate(
        compressed_tensors_quantization_config(bits, -1 if q.per_channel else q.group_size, False, []))
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    got = compressor.decompress(compressed_tensors_tensors(q), scheme)["weight"]
    assert torch.equal(got, q.dequantize())


def test_compressed_tensors_refuses_3_bit():
    with pytest.raises(ValueError, match="gptq"):
        compressed_tensors_tensors(random_layer(3, 32, False))


# ------------------------------------------------------------------------------------ GGUF, per layer


@pytest.mark.parametrize("zero_zero", [False, True], ids=["z>=1", "z=0"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gguf_dequantizes_our_q4_1_blocks_within_the_fp16_bound(bits, group_size, zero_zero):
    import gguf

    gen = torch.Generator().manual_seed(1)
    q = random_layer(bits, group_size, zero_zero)
    # float32 scales this time: Q4_1 stores d = fp16(s) and m = fp16(-s z), each within 2^-11 relative
    q = QuantizedLinear(codes=q.codes, scale=q.scale * (1 + torch.rand(q.scale.shape, generator=gen) * 1e-3),
                        zero=q.zero, bits=bits, group_size=q.group_size, symmetric=False)
    got = torch.from_numpy(gguf.quants.dequantize(q4_1_blocks(q), gguf.GGMLQuantizationType.Q4_1))
    ours = q.dequantize()
    s = q.scale.repeat_interleave(q.group_size, dim=1)
    z = q.zero.float().repeat_interleave(q.group_size, dim=1)
    bound = (q.codes.float() + z) * s * 2**-11 + 1e-12
    assert got.shape == ours.shape and bool(((got - ours).abs() <= bound).all())
    assert not torch.equal(got, ours)  # the float32 scales do not fit fp16 exactly: the bound is what is tested


def test_gguf_refuses_8_bit():
    with pytest.raises(ValueError, match="no exact GGUF type"):
        q4_1_blocks(random_layer(8, 32, False))


# ----------------------------------------------------------------------------------- whole models


def _tiny(config: ZeroQATConfig, fp16_scales: bool = False):
    model = get_peft_model(tiny_model("llama"), config)
    if fp16_scales:  # GPTQ stores float16 scales: make the model's exact in them
        for layer in model.modules():
            if isinstance(layer, ZQATLinear):
                for scale in layer.zqat_scales.values():
                    scale.data = scale.data.half().float()
    return model


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("w_bits,group_size,symmetric", [(4, 32, False), (8, -1, False), (2, 64, True)])
def test_transformers_loads_compressed_tensors_export_with_our_logits(tmp_path, w_bits, group_size, symmetric):
    model = _tiny(ZeroQATConfig(w_bits=w_bits, group_size=group_size, symmetric=symmetric, trainable="scales"))
    ids = tiny_batch()["input_ids"]
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, device_map="cpu")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_trained_layers_export_quantized_with_their_clipping(tmp_path):
    model = _tiny(ZeroQATConfig(w_bits=4, group_size=32, trainable="full"))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    layer.zqat_clip_upper["default"].data.fill_(-1.0)  # a learned clipping that changes the grid
    ids = tiny_batch()["input_ids"]
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, device_map="cpu")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)


@needs_gptqmodel
@pytest.mark.parametrize("zero_zero", [False, True], ids=["v1", "v2"])
def test_transformers_loads_gptq_export_with_our_logits(tmp_path, zero_zero):
    model = _tiny(ZeroQATConfig(w_bits=3, group_size=32, trainable="scales"), fp16_scales=True)
    if zero_zero:
        layer = model.base_model.model.model.layers[1].self_attn.o_proj
        layer.zqat_zeros["default"][:, 0] = 0
    ids = tiny_batch()["input_ids"]
    save_gptq(model, tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == (GPTQ_V2 if zero_zero else GPTQ_V1) and config["sym"] is False
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "gptq", dtype=torch.float32, device_map="cpu",
        quantization_config=transformers.GPTQConfig(bits=3, backend="torch"),
    )
    assert "TorchLinear" in type(loaded.model.layers[0].mlp.up_proj).__name__
    # GPTQModel keeps its scales in float16 and dequantizes in their dtype: with them in float32 (the same
    # values) its weights are ours exactly; in float16 each weight is ours rounded to float16
    for module in loaded.modules():
        if hasattr(module, "scales") and hasattr(module, "qweight"):
            module.scales = module.scales.float()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_gptq_warns_when_float32_scales_are_rounded_to_fp16(tmp_path):
    model = _tiny(ZeroQATConfig(w_bits=4, group_size=32, trainable="scales"))
    with pytest.warns(ExportWarning, match="float16"):
        report = save_gptq(model, tmp_path / "gptq")
    assert 0 < report.max_weight_change < 1e-3


def test_quantized_formats_refuse_smoothing_and_merged_folds_it(tmp_path, monkeypatch):
    from zqat_peft import calibrate, calibration_batches
    from zqat_peft.tuner import layer as layer_module

    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, a_bits=8, group_size=32, init="calibrate",
                                                       calib_epochs=1))
    gen = torch.Generator().manual_seed(0)
    calibrate(model, calibration_batches(torch.randint(0, 256, (2000,), generator=gen), 4, 32, 2), progress=False)
    for save in (save_gptq, save_compressed_tensors):
        with pytest.raises(ValueError, match="format 'merged'"):
            save(model, tmp_path / save.__name__)
        assert not (tmp_path / save.__name__).exists()
    with pytest.warns(ExportWarning, match="input activations at 8 bits"):
        save_merged(model, tmp_path / "merged")
    monkeypatch.setattr(layer_module, "fake_quantize_activation", lambda x, *args, **kwargs: x)
    ids = tiny_batch()["input_ids"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def _real_tokenizer_and_tiny_llama_config():
    """SmolLM2's tokenizer (a GGUF export needs a real one) and a 2-layer LLaMA config of its vocabulary."""
    from zqat_peft.data import is_complete, resolve_model_path

    if not is_complete("model"):
        pytest.skip("the real model's tokenizer is not fetched (zqat fetch model)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path())
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    return tokenizer, config


def test_gguf_export_loads_in_transformers_gguf_reader(tmp_path):
    """transformers' GGUF loader (gguf-py's dequantize, llama.cpp's names and q/k permutation undone) reads the
    file back to our weights within the fp16 bound, with the tokenizer and hyperparameters from its metadata."""
    tokenizer, config = _real_tokenizer_and_tiny_llama_config()
    torch.manual_seed(0)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config).eval(),
                           ZeroQATConfig(w_bits=3, group_size=32, trainable="scales"))
    report = save_gguf(model, tmp_path / "model.gguf", tokenizer, tokenizer_pre="smollm")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    read_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = "The quick brown fox jumps over the lazy dog."
    assert read_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ours = dict(model.get_base_model().named_modules())
    for name, module in loaded.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            expected = ours[name].quantized_weight("default")
            assert (module.weight - expected).abs().max() <= report.max_weight_change + 1e-7, name
    assert report.max_weight_change < 1e-4


@pytest.mark.parametrize("save", [save_merged, save_compressed_tensors])
def test_trained_norms_export_as_the_model_uses_them(tmp_path, save):
    model = with_trained_norms(_tiny(ZeroQATConfig(w_bits=4, group_size=32, trainable="scales", modules_to_save=NORMS)))
    ids = tiny_batch()["input_ids"]
    save(model, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_trained_norms_export_to_gguf(tmp_path):
    tokenizer, config = _real_tokenizer_and_tiny_llama_config()
    torch.manual_seed(0)
    model = with_trained_norms(get_peft_model(transformers.AutoModelForCausalLM.from_config(config).eval(),
                                               ZeroQATConfig(w_bits=4, group_size=32, trainable="scales",
                                                             modules_to_save=NORMS)))
    save_gguf(model, tmp_path / "model.gguf", tokenizer, tokenizer_pre="smollm")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    trained = model.get_base_model().model
    torch.testing.assert_close(loaded.model.norm.weight, trained.norm.modules_to_save["default"].weight)
    torch.testing.assert_close(loaded.model.layers[1].post_attention_layernorm.weight,
                               trained.layers[1].post_attention_layernorm.modules_to_save["default"].weight)


def test_export_refuses_an_existing_folder(tmp_path):
    model = _tiny(ZeroQATConfig(w_bits=4, group_size=32, trainable="scales"))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_compressed_tensors(model, tmp_path / "out")


# --------------------------------------------------------------------------------- the real SmolLM2-135M


def _smollm2(w_bits: int):
    from zqat_peft.data import is_complete, load_model_and_tokenizer

    if not is_complete("model"):
        pytest.skip("the real model is not fetched (zqat fetch model)")
    base, tokenizer = load_model_and_tokenizer("smollm2-135m")
    model = get_peft_model(base, ZeroQATConfig(w_bits=w_bits, group_size=64, trainable="scales"))
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    return model, tokenizer, ids


@pytest.mark.parametrize("w_bits", [3, 4])
def test_smollm2_export_loads_with_our_logits(tmp_path, w_bits):
    """compressed-tensors (W4; 3-bit is refused) and, with GPTQModel installed, GPTQ (W3 and W4)."""
    model, tokenizer, ids = _smollm2(w_bits)
    expected = _logits(model, ids)
    if w_bits == 4:
        save_compressed_tensors(model, tmp_path / "ct", tokenizer=tokenizer)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
        torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-4)
    if importlib.util.find_spec("gptqmodel") is None:
        return
    for layer in model.modules():  # GPTQ stores float16 scales
        if isinstance(layer, ZQATLinear):
            layer.zqat_scales["default"].data = layer.zqat_scales["default"].data.half().float()
    expected = _logits(model, ids)
    save_gptq(model, tmp_path / "gptq", tokenizer=tokenizer)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "gptq", dtype=torch.float32, quantization_config=transformers.GPTQConfig(bits=w_bits, backend="torch"))
    for module in loaded.modules():
        if hasattr(module, "scales") and hasattr(module, "qweight"):
            module.scales = module.scales.float()
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gguf"])
def test_cli_exports_a_saved_adapter(tmp_path, capsys, fmt):
    from zqat_peft import cli
    tokenizer, config = _real_tokenizer_and_tiny_llama_config()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    get_peft_model(base, ZeroQATConfig(w_bits=4, group_size=32, trainable="scales")).save_pretrained(tmp_path / "adapter")

    out = tmp_path / ("model.gguf" if fmt == "gguf" else "export")
    args = ["export", "--adapter", str(tmp_path / "adapter"), "--format", fmt, "--out", str(out)]
    if fmt == "gguf":
        args += ["--tokenizer-pre", "smollm"]
    assert cli.main(args) == 0
    assert f"exported {fmt}" in capsys.readouterr().out
    if fmt == "gguf":
        assert out.is_file()
    else:
        assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert cli.main(args) == 2  # never overwrites
