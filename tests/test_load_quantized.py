"""Loading a GPTQ / compressed-tensors export back into a packed ZeroQAT model, without float weights.

The loaded model computes the exported model's logits bit for bit: its packed layers hold the same integer codes,
zero points and float32 scales (GPTQ's float16 scales are made exact in float16 before exporting), and run the
same forward; the other tensors are the same float32 values.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import zqat_peft  # noqa: F401  (registers ZeroQAT with peft)
from zqat_peft import ZeroQATConfig, ZOTrainer, ZQATLinear
from zqat_peft.build import build_packed_model
from zqat_peft.export import load_quantized, save_compressed_tensors, save_gptq
from zqat_peft.export.gptq import GPTQ_V1, GPTQ_V2

from .conftest import TINY_CONFIGS, tiny_batch
from .test_zo import RepeatedBatch, zo_args

VOCAB = 96  # no float tensor of the model has a quantized layer's shape (the tiny LLaMA's layers are 128 x 64/128/256)


def tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.vocab_size = VOCAB
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def zqat_model(w_bits: int, group_size: int = 32, symmetric: bool = False, fp16_scales: bool = False):
    model = get_peft_model(tiny_llama(), ZeroQATConfig(w_bits=w_bits, group_size=group_size, symmetric=symmetric,
                                                       trainable="scales"))
    if fp16_scales:  # GPTQ stores float16 scales: make the model's exact in them
        for layer in zqat_layers(model).values():
            layer.zqat_scales["default"].data = layer.zqat_scales["default"].data.half().float()
    return model


def zqat_layers(model) -> dict[str, ZQATLinear]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, ZQATLinear)}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tiny_batch(vocab=VOCAB)["input_ids"]).logits


def quantization_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def edit_quantization_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensors(folder, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def assert_same_packed_layers(loaded, exported) -> None:
    expected = zqat_layers(exported)
    got = zqat_layers(loaded)
    assert got.keys() == expected.keys()
    for name, layer in got.items():
        for storage in ("zqat_qweight", "zqat_scales", "zqat_zeros"):
            assert torch.equal(getattr(layer, storage)["default"], getattr(expected[name], storage)["default"]), name


# ------------------------------------------------------------------------------- the exported model back


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("checkpoint_format", [GPTQ_V1, GPTQ_V2])
def test_gptq_export_loads_with_the_exported_logits(tmp_path, bits, checkpoint_format):
    model = zqat_model(bits, fp16_scales=True)
    if checkpoint_format == GPTQ_V2:  # a zero point v1 cannot hold, at both ends of the packed word
        zeros = zqat_layers(model)["model.layers.1.self_attn.o_proj"].zqat_zeros["default"]
        zeros[0, 0], zeros[31, 1] = 0, 0
    save_gptq(model, tmp_path / "gptq", checkpoint_format=checkpoint_format)
    assert quantization_config(tmp_path / "gptq")["checkpoint_format"] == checkpoint_format
    loaded = load_quantized(tmp_path / "gptq")
    assert_same_packed_layers(loaded, model)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("group_size,symmetric", [(-1, True), (64, True), (-1, False)])
def test_gptq_per_channel_and_symmetric_exports_load_with_the_exported_logits(tmp_path, group_size, symmetric):
    model = zqat_model(4, group_size=group_size, symmetric=symmetric, fp16_scales=True)
    save_gptq(model, tmp_path / "gptq")
    assert quantization_config(tmp_path / "gptq")["sym"] is symmetric
    loaded = load_quantized(tmp_path / "gptq")
    assert loaded.peft_config["default"].symmetric is symmetric
    assert_same_packed_layers(loaded, model)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("bits,group_size,symmetric", [(2, 32, False), (4, 32, False), (8, 64, False), (4, -1, False),
                                                       (4, 32, True), (8, -1, True), (2, 64, True)])
def test_compressed_tensors_export_loads_with_the_exported_logits(tmp_path, bits, group_size, symmetric):
    model = zqat_model(bits, group_size=group_size, symmetric=symmetric)
    save_compressed_tensors(model, tmp_path / "ct")
    # asymmetric exports tell transformers to dequantize at load time; the tensors on disk are packed all the same
    assert quantization_config(tmp_path / "ct").get("dequantize", False) is not symmetric
    loaded = load_quantized(tmp_path / "ct")
    assert_same_packed_layers(loaded, model)
    assert torch.equal(logits(loaded), logits(model))


def test_a_loaded_export_exports_the_same_checkpoint(tmp_path):
    """Export, load, export again: the same tensors and quantization_config (the float tensors included)."""
    model = zqat_model(4)
    save_compressed_tensors(model, tmp_path / "first")
    save_compressed_tensors(load_quantized(tmp_path / "first"), tmp_path / "second")
    first, second = load_file(str(tmp_path / "first" / "model.safetensors")), load_file(str(tmp_path / "second" / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert quantization_config(tmp_path / "first") == quantization_config(tmp_path / "second")


# ------------------------------------------------------------------------------- no float weight, ever


class FloatShapes(TorchDispatchMode):
    """Records the shape of every float tensor an operation returns (off the meta device)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                self.shapes.add(tuple(t.shape))
        return out


def weight_shapes(model) -> set[tuple[int, int]]:
    """The shapes of the quantized layers' weights, either way round."""
    return {s for layer in zqat_layers(model).values()
            for s in ((layer.out_features, layer.in_features), (layer.in_features, layer.out_features))}


@pytest.mark.parametrize("save", [save_gptq, save_compressed_tensors])
def test_loading_never_allocates_a_quantized_layers_float_weight(tmp_path, save):
    model = zqat_model(4, fp16_scales=True)
    save(model, tmp_path / "export")
    with FloatShapes() as seen:
        loaded = load_quantized(tmp_path / "export")
    assert not seen.shapes & weight_shapes(model)
    for name, layer in zqat_layers(loaded).items():
        assert layer.is_packed("default") and "default" not in layer.zqat_weight, name
        assert layer.get_base_layer().weight.numel() == 0, name
        assert not [n for n, t in layer.named_parameters() if t.numel() >= layer.in_features * layer.out_features // 8]
    assert not [n for n, t in loaded.state_dict().items() if t.device.type == "meta"]


def test_the_float_weight_detector_sees_a_build_from_float_weights(tmp_path):
    """The control for the test above: building from a float checkpoint does allocate the layers' weights."""
    tiny_llama().save_pretrained(tmp_path / "float")
    model = zqat_model(4)
    with FloatShapes() as seen:
        build_packed_model(tmp_path / "float", ZeroQATConfig(w_bits=4, group_size=32, trainable="scales"),
                           dtype=torch.float32)
    assert {(layer.out_features, layer.in_features) for layer in zqat_layers(model).values()} <= seen.shapes


# ------------------------------------------------------------------------------- training it further


def test_a_zo_step_trains_the_scales_of_a_loaded_model(tmp_path):
    model = zqat_model(4)
    save_compressed_tensors(model, tmp_path / "ct")
    loaded = load_quantized(tmp_path / "ct")
    trained = {n: p.detach().clone() for n, p in loaded.named_parameters() if p.requires_grad}
    assert trained and all(".zqat_scales." in n for n in trained)
    assert len(trained) == len(zqat_layers(loaded))
    frozen = {n: t.clone() for n, t in loaded.state_dict().items() if "zqat_scales" not in n}
    data = RepeatedBatch(seq=16)
    data.batch = tiny_batch(4, 16, vocab=VOCAB)
    ZOTrainer(model=loaded, args=zo_args(tmp_path / "train", max_steps=2, learning_rate=1e-2),
              train_dataset=data).train()
    after = dict(loaded.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in trained.items())
    assert all(torch.equal(t, frozen[n]) for n, t in loaded.state_dict().items() if n in frozen)


# ------------------------------------------------------------------------------- what it refuses


@pytest.fixture
def gptq_folder(tmp_path):
    save_gptq(zqat_model(4, fp16_scales=True), tmp_path / "gptq", checkpoint_format=GPTQ_V2)
    return tmp_path / "gptq"


@pytest.fixture
def ct_folder(tmp_path):
    save_compressed_tensors(zqat_model(4), tmp_path / "ct")
    return tmp_path / "ct"


@pytest.mark.parametrize("changes,message", [
    (dict(desc_act=True), "act-order"),
    (dict(bits=5), "bits=5"),
    (dict(bits=1), "bits=1"),
    (dict(group_size=0), "group_size=0"),
    (dict(lm_head=True), "lm_head"),
    (dict(dynamic={"-:.*down_proj": {}}), "dynamic"),
    (dict(checkpoint_format="marlin", format="marlin"), "marlin"),
    (dict(checkpoint_format=GPTQ_V1), "gptq_v2"),  # fields of all ones, read as v1
    (dict(sym=True), "symmetric"),
    (dict(quant_method="awq"), "quant_method 'awq'"),
])
def test_gptq_refusals(gptq_folder, changes, message):
    if changes.get("checkpoint_format") == GPTQ_V1:  # v1 has no room for zero points of 2**bits - 1: write one
        def max_zero(tensors):
            qzeros = tensors["model.layers.0.mlp.up_proj.qzeros"]
            qzeros[0, 0] = -1  # every 4-bit field 15
        edit_tensors(gptq_folder, max_zero)
    edit_quantization_config(gptq_folder, **changes)
    with pytest.raises(ValueError, match=message):
        load_quantized(gptq_folder)


def test_gptq_refuses_act_order_in_the_group_index(gptq_folder):
    def shuffle(tensors):
        g_idx = tensors["model.layers.1.mlp.down_proj.g_idx"]
        tensors["model.layers.1.mlp.down_proj.g_idx"] = g_idx.flip(0).contiguous()
    edit_tensors(gptq_folder, shuffle)
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj: .*act-order"):
        load_quantized(gptq_folder)


def test_an_unknown_tensor_of_a_quantized_layer_is_refused(gptq_folder):
    def extra(tensors):
        tensors["model.layers.0.self_attn.q_proj.input_scale"] = torch.ones(1)
    edit_tensors(gptq_folder, extra)
    with pytest.raises(ValueError, match=r"q_proj: .*\['input_scale'\], which a ZeroQAT layer cannot hold"):
        load_quantized(gptq_folder)


def _group(folder) -> dict:
    return quantization_config(folder)["config_groups"]["group_0"]


@pytest.mark.parametrize("edit,message", [
    (lambda qc, g: qc.update(format="naive-quantized"), "'naive-quantized'"),
    (lambda qc, g: qc.update(quantization_status="frozen"), "not stored compressed"),
    (lambda qc, g: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (lambda qc, g: g["weights"].update(num_bits=3), "3 bits"),
    (lambda qc, g: g["weights"].update(type="float"), "float weights"),
    (lambda qc, g: g["weights"].update(actorder="group"), "actorder='group'"),
    (lambda qc, g: g["weights"].update(strategy="tensor", group_size=None), "strategy 'tensor'"),
    (lambda qc, g: g.update(input_activations={"num_bits": 8, "type": "int"}), "quantizes activations"),
    (lambda qc, g: qc["config_groups"].update(group_1={**g, "weights": {**g["weights"], "num_bits": 8}}),
     "exactly one"),
    (lambda qc, g: g["weights"].update(symmetric=True), "symmetric"),  # zero points that are not 2**(bits-1)
    (lambda qc, g: g["weights"].update(group_size=64), "weight_scale"),  # the scales say 32
])
def test_compressed_tensors_refusals(ct_folder, edit, message):
    config = json.loads((ct_folder / "config.json").read_text())
    qc = config["quantization_config"]
    edit(qc, qc["config_groups"]["group_0"])
    (ct_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_quantized(ct_folder)


def test_gptqmodels_quantize_config_json_is_read_without_a_quantization_config(tmp_path):
    model = zqat_model(3, fp16_scales=True)
    save_gptq(model, tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    quantization = config.pop("quantization_config")
    del quantization["quant_method"]
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    (tmp_path / "gptq" / "quantize_config.json").write_text(json.dumps(quantization))
    assert torch.equal(logits(load_quantized(tmp_path / "gptq")), logits(model))


def test_a_float_checkpoint_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_quantized(tmp_path / "float")


# ------------------------------------------------------------------------------- the real SmolLM2-135M


def test_smollm2_w4_g64_exports_load_with_the_exported_logits(tmp_path):
    from zqat_peft.data import is_complete, load_model_and_tokenizer

    if not is_complete("model"):
        pytest.skip("the real model is not fetched (zqat fetch model)")
    base, tokenizer = load_model_and_tokenizer("smollm2-135m")
    model = get_peft_model(base, ZeroQATConfig(w_bits=4, group_size=64, trainable="scales"))
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]

    def run(m) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids).logits

    for layer in zqat_layers(model).values():  # GPTQ stores float16 scales: make the model's exact in them
        layer.zqat_scales["default"].data = layer.zqat_scales["default"].data.half().float()
    save_compressed_tensors(model, tmp_path / "ct", tokenizer=tokenizer)
    save_gptq(model, tmp_path / "gptq", tokenizer=tokenizer)
    expected = run(model)
    for folder in ("ct", "gptq"):
        loaded = load_quantized(tmp_path / folder)
        assert loaded.get_base_model().config.tie_word_embeddings
        assert_same_packed_layers(loaded, model)
        assert torch.equal(run(loaded), expected), folder
