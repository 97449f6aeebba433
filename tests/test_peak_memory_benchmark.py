"""The peak-memory benchmark (benchmarks/peak_memory_13b.py): its floor, its build check and its ZO step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zqat_peft import ZeroQATConfig, ZQATLinear
from zqat_peft.build import build_packed_model

from .conftest import load_benchmark

MODES = ("scales", "lightweight", "full")


bench = load_benchmark("peak_memory_13b")


def smoke_model(mode: str) -> torch.nn.Module:
    quant = ZeroQATConfig(w_bits=2, group_size=128, trainable=mode)
    return build_packed_model(bench.model_config("smoke"), quant, dtype=torch.float32)


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("peak") / "peak.json"
    bench.main(["--smoke", "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", MODES)
def test_smoke_floor_from_the_tensors_equals_the_arithmetic(smoke_result, mode):
    row = smoke_result["modes"][mode]
    tensors, arithmetic = row["floor_tensors"], row["floor_arithmetic"]
    assert {k: tensors[k] for k in arithmetic} == arithmetic
    assert row["floor_bytes"] == row["floor_arithmetic_bytes"] > 0
    # the rotary tables are all that lies outside the floor
    assert set(tensors) - set(arithmetic) == {"other_buffers"} and tensors["other_buffers"] < 1024
    # measured: the RSS before the step holds the model, and the losses of both perturbed forwards came back
    assert row["step_before_bytes"] > row["floor_bytes"]
    assert row["step_peak_bytes"] >= row["floor_bytes"]
    assert math.isfinite(row["loss_pos"]) and math.isfinite(row["loss_neg"]) and row["loss_pos"] != row["loss_neg"]


def test_the_arithmetic_floor_at_13b_shape():
    """By hand: 40 layers of 317,194,240 weights (q/k/v/o 5120^2, gate/up/down 5120 x 13824), W2 g128, bf16
    embedding and lm_head 32000 x 5120 and 81 norms of 5120."""
    shape = bench.SHAPES["llama2-13b"]
    scales = bench.arithmetic_floor(shape, 40, "scales", 2, 128, 2)
    assert scales == {"codes": 3_171_942_400, "scales": 396_492_800, "zeros": 99_123_200, "masters": 0,
                      "clip_logits": 0, "base_layer_weights": 0, "embeddings_norms_lm_head": 656_189_440}
    # q_proj and v_proj (2 x 5120^2 per layer) as bf16 masters with two float32 clipping logits per group
    light = bench.arithmetic_floor(shape, 40, "lightweight", 2, 128, 2)
    assert light["masters"] == 4_194_304_000 and light["clip_logits"] == 131_072_000
    assert light["codes"] == 2_647_654_400 and sum(light.values()) == 8_042_915_840


def test_no_float_weight_of_a_packed_layer_after_the_build():
    model = smoke_model("lightweight")
    layers = [layer for layer in model.modules() if isinstance(layer, ZQATLinear)]
    packed = [layer for layer in layers if not layer.is_trained("default")]
    assert len(packed) == 5 * len(layers) // 7  # all but q_proj and v_proj
    for layer in packed:
        assert layer.is_packed("default") and "default" not in layer.zqat_weight
        assert layer.get_base_layer().weight.numel() == 0
    assert bench.float_weights_of_packed_layers(model) == []
    # the check finds a float weight left behind
    packed[0].get_base_layer().weight = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    assert len(bench.float_weights_of_packed_layers(model)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_one_zo_step_returns_a_loss_pair_and_changes_the_trained_tensors(mode):
    model = smoke_model(mode)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if n not in trained}
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    loss_pos, loss_neg = bench.one_zo_step(model, ids, seed=1, eps=1e-3, lr=1e-5)
    assert math.isfinite(loss_pos) and math.isfinite(loss_neg) and loss_pos != loss_neg
    after = dict(model.named_parameters())
    assert trained and all(not torch.equal(after[n], before) for n, before in trained.items())
    state = model.state_dict()
    assert all(torch.equal(state[n], before) for n, before in frozen.items())
