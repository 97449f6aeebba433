"""GPTQ rounding: the pure algorithm, and calibration with rounding='gptq'."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from zqat_peft import ZeroQATConfig, ZQATLinear
from zqat_peft.calibration import calibrate, calibration_batches
from zqat_peft.calibration.gptq import add_to_hessian, code_range, gptq_round
from zqat_peft.quant import dequantize_weight, fake_quantize_weight, quantize_weight, unpack_int, weight_qparams

from .conftest import tiny_model


def _correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Tokens whose features are strongly correlated (a non-identity Hessian, as real activations give)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen) / dim**0.5 + torch.eye(dim)
    scales = torch.rand(dim, generator=gen) * 3 + 0.1
    return (torch.randn(n, dim, generator=gen) @ mixing) * scales


def _hessian(x: torch.Tensor) -> torch.Tensor:
    h = torch.zeros(x.shape[1], x.shape[1])
    add_to_hessian(h, 0, x)
    return h


def _output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return (x @ weight.t() - x @ quantized.t()).pow(2).sum().item()


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, False), (4, False), (4, True)])
def test_gptq_lowers_the_output_error_against_round_to_nearest(bits, symmetric):
    x = _correlated_inputs(2048, 128)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    scale, zero = weight_qparams(weight, bits, 32, symmetric)
    rtn = dequantize_weight(quantize_weight(weight, scale, zero, bits), scale, zero)
    codes, _, reported = gptq_round(weight, _hessian(x), scale, zero, bits, symmetric, block_size=48)
    gptq = dequantize_weight(codes, scale, zero)
    assert _output_error(x, weight, gptq) < 0.8 * _output_error(x, weight, rtn)
    # the reported error is the per-token output error of the codes it returns
    assert reported == pytest.approx(_output_error(x, weight, gptq) / x.shape[0], rel=1e-3)


def test_codes_lie_on_the_grid_and_the_range_is_kept():
    x = _correlated_inputs(1024, 128, seed=2)
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    clip = torch.full((32, 4), 1.5)  # clipped to sigmoid(1.5) = 0.82 of the range
    for bits, symmetric in [(2, False), (3, False), (3, True)]:
        scale, zero = weight_qparams(weight, bits, 32, symmetric, clip, clip)
        codes = gptq_round(weight, _hessian(x), scale, zero, bits, symmetric).codes
        lo, hi = code_range(bits, symmetric)
        assert codes.dtype == torch.uint8 and codes.min() >= lo and codes.max() <= hi
        # A master weight set to the rounding re-derives the same grid and codes without clipping.
        rounded = dequantize_weight(codes, scale, zero)
        assert torch.equal(quantize_weight(rounded, *weight_qparams(rounded, bits, 32, symmetric), bits), codes)
        torch.testing.assert_close(fake_quantize_weight(rounded, bits, 32, symmetric), rounded)


def test_an_identity_hessian_gives_round_to_nearest():
    """Uncorrelated inputs of equal power leave nothing to compensate: GPTQ is then plain rounding."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    scale, zero = weight_qparams(weight, 3, 32, False)
    codes = gptq_round(weight, torch.eye(64), scale, zero, 3, keep_range=False).codes
    assert torch.equal(codes, quantize_weight(weight, scale, zero, 3))


def _rising_power_inputs(n: int, dim: int) -> torch.Tensor:
    """Correlated tokens whose features grow in power along the columns: in natural order the costliest
    columns come last, with no column left to take up their error."""
    return _correlated_inputs(n, dim, seed=5) * torch.logspace(-1, 1, dim)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_act_order_rounds_the_costly_columns_first(bits):
    x = _rising_power_inputs(2048, 128)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(6))
    scale, zero = weight_qparams(weight, bits, 32, False)
    natural = gptq_round(weight, _hessian(x), scale, zero, bits)
    ordered = gptq_round(weight, _hessian(x), scale, zero, bits, act_order=True)
    assert ordered.output_error < 0.8 * natural.output_error
    # each column stays in its own group: the codes dequantize on the given grid, in the weight's layout
    gptq = dequantize_weight(ordered.codes, scale, zero)
    assert ordered.output_error == pytest.approx(_output_error(x, weight, gptq) / x.shape[0], rel=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_the_compensated_weight_rounds_to_the_codes_off_the_grid_points(act_order):
    x = _correlated_inputs(1024, 128, seed=7)
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(8))
    clip = torch.full((32, 4), 1.5)
    scale, zero = weight_qparams(weight, 3, 32, False, clip, clip)
    result = gptq_round(weight, _hessian(x), scale, zero, 3, act_order=act_order)
    # it re-derives the clipped grid of the weight, and on it GPTQ's codes
    rederived = weight_qparams(result.compensated, 3, 32, False, clip, clip)
    torch.testing.assert_close(rederived[0], scale, rtol=0, atol=0)
    assert (quantize_weight(result.compensated, *rederived, 3) == result.codes).float().mean() > 0.999
    # ... and it is not the rounded weight: on average a quarter of a step from the grid points
    offset = (result.compensated - dequantize_weight(result.codes, scale, zero)).abs()
    assert (offset / scale.repeat_interleave(32, dim=1)).mean() > 0.15


def test_hessian_is_the_running_mean_of_two_x_xt():
    x = torch.randn(10, 8)
    h = torch.zeros(8, 8)
    n = add_to_hessian(h, 0, x[:3])
    n = add_to_hessian(h, n, x[3:].reshape(1, 7, 8))
    assert n == 10
    torch.testing.assert_close(h, 2 * x.t() @ x / 10)


def test_bad_shapes_and_a_singular_hessian_are_refused():
    weight = torch.randn(4, 8)
    scale, zero = weight_qparams(weight, 4, 8, False)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_round(weight, torch.eye(4), scale, zero, 4)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_round(weight, -torch.eye(8), scale, zero, 4, damp=0.0)


# --- calibration with rounding="gptq" on a tiny model ---

@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(0)
    return calibration_batches(torch.randint(0, 256, (3000,), generator=gen), n_samples=8, seq_len=32, batch_size=2)


def _calibrated(batches, rounding, **kw):
    config = ZeroQATConfig(init="calibrate", rounding=rounding, calib_epochs=1, w_bits=3, group_size=32, **kw)
    return calibrate(get_peft_model(tiny_model(), config), batches, progress=False)


def _logit_error(model, batches) -> float:
    reference = tiny_model()
    with torch.no_grad():
        return sum(((model(input_ids=b).logits - reference(input_ids=b).logits) ** 2).mean().item() for b in batches)


def test_gptq_calibration_beats_nearest_rounding(batches):
    nearest = _calibrated(batches, "nearest", trainable="lightweight")
    gptq = _calibrated(batches, "gptq", trainable="lightweight")
    assert _logit_error(gptq, batches) < 0.9 * _logit_error(nearest, batches)


def test_trained_masters_start_from_the_gptq_rounding(batches):
    model = _calibrated(batches, "gptq", trainable="full")
    layers = [m for m in model.modules() if isinstance(m, ZQATLinear)]
    assert layers and not any(m.is_packed("default") for m in layers)
    for layer in layers:
        master = layer.zqat_weight["default"].detach()
        # the master is on its grid: fake quantization gives it back
        torch.testing.assert_close(layer.quantized_weight("default"), master, rtol=0, atol=1e-6)
        assert (layer.zqat_clip_lower["default"] == 20.0).all()
    # and it is not the float weight rounded to nearest on the calibrated grid
    gptq_logits_err = _logit_error(model, batches)
    assert gptq_logits_err < _logit_error(_calibrated(batches, "nearest", trainable="full"), batches)


def test_a_compensated_master_gives_the_rounded_masters_codes_off_the_grid(batches):
    rounded = _calibrated(batches, "gptq", trainable="full")
    compensated = _calibrated(batches, "gptq", trainable="full", gptq_master="compensated")
    pairs = list(zip(*[[(n, m) for n, m in model.named_modules() if isinstance(m, ZQATLinear)]
                       for model in (rounded, compensated)]))
    for (name, a), (_, b) in pairs:
        master = b.zqat_weight["default"].detach()
        assert (b.zqat_clip_lower["default"] < 20.0).any()  # the learned clipping is kept
        assert (b.quantized_weight("default") - master).abs().mean() > 0.1 * master.abs().mean()  # off the grid
        if ".layers.0." in name:
            # the first block sees the same inputs either way: the same codes on the same grid. (Later blocks
            # get inputs equal to float rounding, which can tip a GPTQ decision and everything after it.)
            torch.testing.assert_close(b.quantized_weight("default"), a.zqat_weight["default"], rtol=0, atol=1e-6)


def test_packed_codes_are_the_gptq_codes_and_survive_save_reload_and_merge(tmp_path, batches):
    trained_master = _calibrated(batches, "gptq", trainable="full")
    packed = _calibrated(batches, "gptq", trainable="scales")
    for a, b in zip(*[[m for m in model.modules() if isinstance(m, ZQATLinear)] for model in (trained_master, packed)]):
        master = a.zqat_weight["default"]
        scale, zero = weight_qparams(master, 3, 32, False)
        codes = unpack_int(b.zqat_qweight["default"], 3, b.in_features).t()
        assert torch.equal(codes, quantize_weight(master, scale, zero, 3))
    ids = batches[0]
    packed.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert loaded.peft_config["default"].rounding == "gptq"
    with torch.no_grad():
        logits = packed(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, logits)
        torch.testing.assert_close(loaded.merge_and_unload()(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_gptq_rounding_needs_calibration():
    with pytest.raises(ValueError, match="needs init='calibrate'"):
        ZeroQATConfig(rounding="gptq")
    with pytest.raises(ValueError, match="rounding must be one of"):
        ZeroQATConfig(init="calibrate", rounding="stochastic")
    with pytest.raises(ValueError, match="gptq_master must be one of"):
        ZeroQATConfig(init="calibrate", rounding="gptq", gptq_master="float")


def test_the_grid_search_weighs_each_column_by_its_input_power():
    from zqat_peft.calibration.clipping import init_clipping

    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=2, group_size=32))
    layer = next(m for m in model.modules() if isinstance(m, ZQATLinear))
    weight = layer.zqat_weight["default"]
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(9)))
        weight[:, 0] = 8.0  # an outlier column at the top of every first group's range
    power = torch.ones(weight.shape[1])
    power[0] = 1e4  # whose input is large: its error costs the most

    def first_group_error(input_power):
        init_clipping(layer, "default", input_power=input_power)
        err = (layer.quantized_weight("default") - weight).detach().pow(2)[:, :32]
        return (err * power[:32]).sum().item(), layer.zqat_clip_lower["default"][:, 0].clone()

    plain_error, plain_clip = first_group_error(None)
    weighted_error, weighted_clip = first_group_error(power)
    assert weighted_error < 0.5 * plain_error
    # less clipping: the outlier keeps its value
    assert (weighted_clip >= plain_clip).all() and (weighted_clip > plain_clip).any()


@pytest.mark.parametrize("epochs,searched", [(0, True), (1, False)])
def test_gptq_rounding_searches_the_grid_with_the_hessian_only_without_learned_clipping(batches, monkeypatch,
                                                                                         epochs, searched):
    import zqat_peft.calibration.rounding as rounding

    calls = []
    real = rounding.init_clipping
    monkeypatch.setattr(rounding, "init_clipping", lambda layer, adapter, input_power=None: (
        calls.append(input_power), real(layer, adapter, input_power=input_power)))
    config = ZeroQATConfig(init="calibrate", rounding="gptq", calib_epochs=epochs, w_bits=3, group_size=32)
    model = calibrate(get_peft_model(tiny_model(), config), batches, progress=False)
    layers = [m for m in model.modules() if isinstance(m, ZQATLinear)]
    assert len(calls) == (len(layers) if searched else 0)
    assert all(p is not None and p.shape == (layer.in_features,) for p, layer in zip(calls, layers))


# --- scale refinement after rounding (calib_refine_epochs) ---

NORMS = ["input_layernorm", "post_attention_layernorm"]


def _refined(batches, epochs, **kw):
    settings = dict(w_bits=2, group_size=32, trainable="scales") | kw
    config = ZeroQATConfig(init="calibrate", rounding="gptq", calib_epochs=0, calib_refine_epochs=epochs,
                           calib_refine_lr=3e-3, **settings)
    return calibrate(get_peft_model(tiny_model(), config), batches, progress=False)


def _packed_layers(model) -> dict[str, ZQATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ZQATLinear)}


def test_scale_refinement_keeps_the_codes_and_lowers_the_output_error(batches):
    plain, refined = _refined(batches, 0), _refined(batches, 2)
    assert _logit_error(refined, batches) < 0.95 * _logit_error(plain, batches)
    for (name, a), b in zip(_packed_layers(plain).items(), _packed_layers(refined).values()):
        if ".layers.0." in name:  # the first block rounds the same inputs either way: the same codes
            assert torch.equal(a.zqat_qweight["default"], b.zqat_qweight["default"])
            assert torch.equal(a.zqat_zeros["default"], b.zqat_zeros["default"])
        assert not torch.equal(a.zqat_scales["default"], b.zqat_scales["default"])


def test_scale_refinement_lowers_the_output_error_with_quantized_activations(batches):
    # W4A4 per-channel: the block output the refinement fits is the one computed with 4-bit activations. 8 epochs:
    # after 2 the error was just under 0.95x on one CPU and 0.951x on another, too close to the bound to tell a
    # CPU's rounding from a defect; after 8 it is 0.88x
    w4a4 = dict(w_bits=4, a_bits=4, group_size=-1)
    plain, refined = _refined(batches, 0, **w4a4), _refined(batches, 8, **w4a4)
    assert _logit_error(refined, batches) < 0.95 * _logit_error(plain, batches)


def test_scale_refinement_fits_the_activation_clipping_ratios_too(batches):
    w4a4 = dict(w_bits=4, a_bits=4, group_size=-1, act_clip=0.9)
    plain, refined = _refined(batches, 0, **w4a4), _refined(batches, 8, **w4a4)
    ratios = [float(layer.zqat_act_clip["default"].detach()) for layer in _packed_layers(refined).values()]
    assert len(ratios) == len(_packed_layers(plain)) and all(r != pytest.approx(0.9, abs=1e-6) for r in ratios)
    assert _logit_error(refined, batches) < 0.95 * _logit_error(plain, batches)


def test_scale_refinement_moves_the_saved_norms_only_and_they_save_and_reload(tmp_path, batches):
    model = _refined(batches, 2, modules_to_save=NORMS)
    base = tiny_model()
    wrappers = [m for n, m in model.named_modules() if n.endswith(tuple(NORMS))]
    assert len(wrappers) == 2 * len(base.model.layers)
    for wrapper in wrappers:
        original = wrapper.original_module.weight
        assert torch.equal(original, base.model.layers[0].input_layernorm.weight)  # the base model's stays ones
        assert not torch.equal(wrapper.modules_to_save["default"].weight, original)
    assert _logit_error(model, batches) < _logit_error(_refined(batches, 2), batches)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batches[0]).logits, model(input_ids=batches[0]).logits)


def test_scale_refinement_needs_calibration_and_a_non_negative_count():
    with pytest.raises(ValueError, match="needs init='calibrate'"):
        ZeroQATConfig(calib_refine_epochs=1)
    with pytest.raises(ValueError, match="calib_refine_epochs and calib_refine_lr must be >= 0"):
        ZeroQATConfig(init="calibrate", calib_refine_epochs=-1)
    with pytest.raises(ValueError, match="trainable='full' packs none"):
        ZeroQATConfig(init="calibrate", calib_refine_epochs=1, trainable="full")
