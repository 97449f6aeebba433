"""Tests for zqat_peft.quant: primitives against a float64 numpy reference, and GPTQ packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zqat_peft.quant import (
    ACT_BITS,
    WEIGHT_BITS,
    check_act_bits,
    check_weight_bits,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    pack_int,
    packed_shape,
    quantize_weight,
    resolve_group_size,
    round_ste,
    unpack_int,
    weight_qparams,
)

OUT, IN = 16, 256
GROUP_SIZES = (-1, 32, 64, 128)
# float32 vs float64 can round differently only where x/scale sits within ~1e-6 of a .5 tie.
MAX_TIE_FRACTION = 1e-3


# ---------------------------------------------------------------------------------------------
# float64 references, written the obvious way
# ---------------------------------------------------------------------------------------------


def ref_fake_quant_weight(w, bits, group_size, symmetric, clip_lower=None, clip_upper=None):
    """Returns (scale, zero, codes, dequantized) in float64 numpy, grouped shapes flattened."""
    w = w.double().numpy()
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    groups = w.reshape(out_f, in_f // g, g)
    wmin = np.minimum(groups.min(axis=-1), 0.0)
    wmax = np.maximum(groups.max(axis=-1), 0.0)
    if clip_lower is not None:
        wmin = wmin / (1.0 + np.exp(-clip_lower.double().numpy()))
    if clip_upper is not None:
        wmax = wmax / (1.0 + np.exp(-clip_upper.double().numpy()))
    qmax = 2**bits - 1
    if symmetric:
        scale = np.maximum(np.maximum(-wmin, wmax) / (2 ** (bits - 1) - 1), 1e-8)
        zero = np.full_like(scale, 2 ** (bits - 1))
    else:
        scale = np.maximum((wmax - wmin) / qmax, 1e-8)
        zero = np.clip(np.round(-wmin / scale), 0, qmax)
    codes = np.clip(np.round(groups / scale[..., None]) + zero[..., None], 0, qmax)
    deq = (codes - zero[..., None]) * scale[..., None]
    return scale, zero, codes.reshape(out_f, in_f), deq.reshape(out_f, in_f)


def ref_fake_quant_activation(x, bits, group_size=-1):
    x = x.double().numpy()
    d = x.shape[-1]
    g = d if group_size == -1 else group_size
    groups = x.reshape(*x.shape[:-1], d // g, g)
    xmin = np.minimum(groups.min(axis=-1, keepdims=True), 0.0)
    xmax = np.maximum(groups.max(axis=-1, keepdims=True), 0.0)
    qmax = 2**bits - 1
    scale = np.maximum((xmax - xmin) / qmax, 1e-8)
    zero = np.round(-xmin / scale)
    codes = np.clip(np.round(groups / scale) + zero, 0, qmax)
    out = (codes - zero) * scale
    step = np.broadcast_to(scale, groups.shape)
    return out.reshape(x.shape), step.reshape(x.shape)


def assert_mostly_equal(actual: np.ndarray, expected: np.ndarray, step: np.ndarray | float):
    """Equal up to float32 error, except a tiny fraction of tie cases off by one quantization step."""
    diff = np.abs(actual - expected)
    tol = 1e-5 * np.maximum(np.abs(expected), step) + 1e-12
    off = diff > tol
    assert off.mean() <= MAX_TIE_FRACTION, f"{off.sum()} of {off.size} values differ"
    assert np.all(diff[off] <= np.broadcast_to(step, diff.shape)[off] * (1 + 1e-4))


def make_weight(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and per-row magnitudes, like real LLM weights.
    w = torch.randn(OUT, IN, generator=gen) * torch.rand(OUT, 1, generator=gen).add(0.1)
    return w.to(dtype)


def make_clip_logits(group_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    n_groups = 1 if group_size == -1 else IN // group_size
    gen = torch.Generator().manual_seed(seed)
    lower = torch.randn(OUT, n_groups, generator=gen) + 2.0
    upper = torch.randn(OUT, n_groups, generator=gen) + 2.0
    return lower, upper


# ---------------------------------------------------------------------------------------------
# weight quantization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_weight_quant_matches_reference(bits, symmetric, group_size, clip):
    w = make_weight()
    lower, upper = make_clip_logits(group_size) if clip else (None, None)

    scale, zero = weight_qparams(w, bits, group_size, symmetric, lower, upper)
    codes = quantize_weight(w, scale, zero, bits)
    deq = dequantize_weight(codes, scale, zero)
    fake = fake_quantize_weight(w, bits, group_size, symmetric, lower, upper)
    ref_scale, ref_zero, ref_codes, ref_deq = ref_fake_quant_weight(
        w, bits, group_size, symmetric, lower, upper
    )

    n_groups = ref_scale.shape[1]
    assert scale.dtype == zero.dtype == torch.float32
    assert scale.shape == zero.shape == (OUT, n_groups)
    assert codes.dtype == torch.uint8 and codes.shape == (OUT, IN)
    assert deq.dtype == torch.float32 and fake.dtype == w.dtype

    np.testing.assert_allclose(scale.numpy(), ref_scale, rtol=1e-6)
    np.testing.assert_array_equal(zero.numpy(), ref_zero)
    assert int(codes.max()) <= 2**bits - 1

    code_diff = np.abs(codes.numpy().astype(np.int64) - ref_codes)
    assert code_diff.max() <= 1
    assert (code_diff != 0).mean() <= MAX_TIE_FRACTION

    step = np.repeat(ref_scale, IN // n_groups, axis=1)
    assert_mostly_equal(deq.numpy(), ref_deq, step)
    assert torch.equal(fake, deq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_fake_quant_is_bitwise_quantize_dequantize(bits, symmetric, dtype):
    w = make_weight(seed=3, dtype=dtype)
    lower, upper = make_clip_logits(64)
    for clip in [(None, None), (lower, upper)]:
        scale, zero = weight_qparams(w, bits, 64, symmetric, *clip)
        expected = dequantize_weight(quantize_weight(w, scale, zero, bits), scale, zero, dtype=dtype)
        actual = fake_quantize_weight(w, bits, 64, symmetric, *clip)
        assert actual.dtype == dtype
        assert torch.equal(actual, expected)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_output_dtype_is_rounded_once(dtype):
    """dtype= gives the float32 result rounded once: for a float32 master, the same bits as converting
    afterwards; for a bfloat16 master in float32, the exact dequantized values (no bfloat16 step between)."""
    w = make_weight(seed=8, dtype=dtype)
    lower, upper = make_clip_logits(64)
    scale, zero = weight_qparams(w, 3, 64, False, lower, upper)
    exact = dequantize_weight(quantize_weight(w, scale, zero, 3), scale, zero, dtype=torch.float32)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = fake_quantize_weight(w, 3, 64, False, lower, upper, dtype=out_dtype)
        assert got.dtype == out_dtype and torch.equal(got, exact.to(out_dtype))
        ste = fake_quantize_weight(w, 3, 64, False, lower.clone().requires_grad_(), upper, dtype=out_dtype)
        assert ste.dtype == out_dtype and torch.allclose(ste.detach().float(), got.float(), rtol=1e-2, atol=1e-6)
    if dtype == torch.bfloat16:
        assert not torch.equal(exact, exact.to(dtype).float()), "the test needs values that bfloat16 rounds"

@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_ste_path_forward_matches_exact_path(bits, symmetric):
    w = make_weight(seed=4)
    lower, upper = make_clip_logits(32)
    exact = fake_quantize_weight(w, bits, 32, symmetric, lower, upper)
    ste = fake_quantize_weight(w, bits, 32, symmetric, lower.requires_grad_(), upper.requires_grad_())
    assert ste.requires_grad
    torch.testing.assert_close(ste.detach(), exact, rtol=1e-6, atol=1e-6)


def test_gradients_reach_clip_logits_and_weight():
    w = make_weight(seed=5).requires_grad_()
    lower, upper = (t.requires_grad_() for t in make_clip_logits(64))
    fake = fake_quantize_weight(w, 3, 64, symmetric=False, clip_lower=lower, clip_upper=upper)
    ((fake - w.detach()) ** 2).sum().backward()
    for grad in (lower.grad, upper.grad, w.grad):
        assert grad is not None and torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_no_grad_mode_takes_exact_path(monkeypatch):
    """Under no_grad a weight that requires grad goes through quantize_weight -> dequantize_weight (the path
    the packed checkpoint and the CUDA kernel share), and gives the values written out here. The
    straight-through form gives the same values in float32, so which path ran is recorded."""
    from zqat_peft.quant import primitives

    calls = []
    monkeypatch.setattr(primitives, "quantize_weight", lambda *a, **k: calls.append(1) or quantize_weight(*a, **k))
    w = make_weight(seed=6).requires_grad_()
    groups = w.detach().reshape(OUT, IN // 64, 64)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 7
    exact = (((torch.round(groups / scale) + 8).clamp(0, 15) - 8) * scale).reshape(OUT, IN)
    with torch.no_grad():
        fake = fake_quantize_weight(w, 4, 64, symmetric=True)
    assert calls and not fake.requires_grad
    assert torch.equal(fake, exact)
    calls.clear()
    assert fake_quantize_weight(w, 4, 64, symmetric=True).requires_grad and not calls  # with grad: the STE form


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_of_a_noise_perturbed_weight(dtype):
    from zqat_peft.noise import WeightNoise, add_scaled_noise, param_key

    w = (torch.randn(OUT, IN) * 0.02).to(dtype)
    lo, hi = torch.randn(OUT, IN // 64) + 2, torch.randn(OUT, IN // 64) + 2
    noise = WeightNoise(5, param_key("w"), 2e-3)
    got = fake_quantize_weight(w, 3, 64, False, lo, hi, noise=noise)
    perturbed = add_scaled_noise(w, noise.seed, noise.key, noise.scale)
    assert torch.equal(got, fake_quantize_weight(perturbed, 3, 64, False, lo, hi))
    assert not torch.equal(got, fake_quantize_weight(w, 3, 64, False, lo, hi))
    with pytest.raises(ValueError, match="no gradient"):
        fake_quantize_weight(w.float().requires_grad_(), 3, 64, False, noise=noise)


def test_all_zero_group_is_finite():
    w = torch.zeros(2, 64)
    fake = fake_quantize_weight(w, 4, 32, symmetric=False)
    assert torch.equal(fake, w)


def test_round_ste():
    x = torch.tensor([0.4, 0.5, 1.5, -2.6], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.0, 2.0, -3.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
    with torch.no_grad():
        assert not round_ste(x).requires_grad


# ---------------------------------------------------------------------------------------------
# activation quantization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_activation_quant_matches_reference(bits, group_size):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 64, generator=gen) * torch.rand(3, 5, 1, generator=gen).add(0.1)
    x[0, 0] = x[0, 0].abs()  # a token with no negative values exercises min(amin, 0)
    out = fake_quantize_activation(x, bits, group_size)
    ref, step = ref_fake_quant_activation(x, bits, group_size)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_mostly_equal(out.numpy(), ref, step)


def test_activation_quant_is_per_token():
    x = torch.randn(4, 32)
    x[1] *= 1000.0  # a huge token must not change the others' ranges
    out = fake_quantize_activation(x, 8)
    torch.testing.assert_close(out[0], fake_quantize_activation(x[:1], 8)[0], rtol=0, atol=0)


def test_activation_groups_are_independent():
    x = torch.randn(2, 64)
    x[:, 32:] *= 1000.0
    grouped = fake_quantize_activation(x, 4, group_size=32)
    alone = fake_quantize_activation(x[:, :32].contiguous(), 4)
    assert torch.equal(grouped[:, :32], alone)


def test_activation_bits16_is_identity():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert fake_quantize_activation(x, 16) is x


def test_activation_bf16_and_gradient():
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    out = fake_quantize_activation(x, 8)
    assert out.dtype == torch.bfloat16
    ref, step = ref_fake_quant_activation(x.float(), 8)
    assert np.all(np.abs(out.float().numpy() - ref) <= step + 1e-2 * np.abs(ref))

    xg = torch.randn(4, 32, requires_grad=True)
    fake_quantize_activation(xg, 4).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_activation_clip_ratio_shrinks_the_range_and_saturates_beyond_it():
    x = torch.tensor([[-1.0, 0.0, 0.3, 2.0]])
    # 4 bits, range [-1, 2] * 0.5 = [-0.5, 1]: step 0.1, zero point 5; -1 and 2 saturate at the range's ends
    clipped = fake_quantize_activation(x, 4, clip_ratio=torch.tensor(0.5))
    torch.testing.assert_close(clipped, torch.tensor([[-0.5, 0.0, 0.3, 1.0]]))
    assert torch.equal(fake_quantize_activation(x, 4, clip_ratio=torch.tensor(1.0)), fake_quantize_activation(x, 4))
    # a ratio pushed out of (0, 1] by a perturbation is clamped: above 1 it is min-max again
    assert torch.equal(fake_quantize_activation(x, 4, clip_ratio=torch.tensor(1.3)), fake_quantize_activation(x, 4))


def test_activation_clip_ratio_gets_a_gradient():
    ratio = torch.tensor(0.8, requires_grad=True)
    x = torch.randn(4, 32)
    (fake_quantize_activation(x, 4, clip_ratio=ratio) - x).pow(2).sum().backward()
    assert ratio.grad is not None and ratio.grad != 0


class _RecordingActivationExt:
    """Stands in for the CUDA kernels: records each activation fake-quantization it is handed."""

    def __init__(self) -> None:
        self.calls = 0

    def fake_quant_activation(self, x, out, bits, group_size) -> None:
        self.calls += 1
        out.copy_(x)


def test_the_activation_kernel_is_dispatched_without_a_clip_ratio_only(monkeypatch):
    """The CUDA kernel has no clipping: with a ratio the PyTorch path must run, without one the kernel."""
    from zqat_peft.quant import primitives

    ext = _RecordingActivationExt()
    monkeypatch.setattr(primitives, "cuda_kernels_for", lambda *tensors: ext)
    x = torch.tensor([[-1.0, 0.0, 0.3, 2.0]])
    fake_quantize_activation(x, 4)
    assert ext.calls == 1
    clipped = fake_quantize_activation(x, 4, clip_ratio=torch.tensor(0.5))
    assert ext.calls == 1 and not torch.equal(clipped, x)


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 31, 32, 33, 100, 576])
@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_pack_round_trip(bits, rows):
    gen = torch.Generator().manual_seed(rows * 10 + bits)
    cols = 5
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.uint8)
    codes[0, 0] = 2**bits - 1  # make sure the top bit pattern is exercised
    packed = pack_int(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == packed_shape(rows, cols, bits) == ((rows + 31) // 32 * bits, cols)
    assert torch.equal(unpack_int(packed, bits, rows), codes)


def python_bitstream_words(values: list[int], bits: int) -> list[int]:
    """Independent reference: one Python big integer as the little-endian bitstream."""
    stream = sum(v << (i * bits) for i, v in enumerate(values))
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(bits)]
    return [w - 2**32 if w >= 2**31 else w for w in words]


def test_pack_4bit_known_words():
    codes = (torch.arange(32) % 16).to(torch.uint8).unsqueeze(1)
    packed = pack_int(codes, 4)[:, 0].tolist()
    # Row j sits at bits [4j, 4j+4) of its word; 0xFEDCBA98 as int32 is negative.
    assert packed == [0x76543210, 0xFEDCBA98 - 2**32, 0x76543210, 0xFEDCBA98 - 2**32]


def test_pack_3bit_straddling_values():
    values = [0] * 32
    values[10] = 0b101  # low 2 bits -> word0 bits 30-31, top bit -> word1 bit 0
    values[21] = 0b111  # low bit -> word1 bit 31, high 2 bits -> word2 bits 0-1
    codes = torch.tensor(values, dtype=torch.uint8).unsqueeze(1)
    packed = pack_int(codes, 3)[:, 0].tolist()
    assert packed == [0b01 << 30, (1 << 31 | 1) - 2**32, 0b11]


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_pack_matches_python_bitstream(bits):
    values = [(7 * j + 3) % 2**bits for j in range(32)]
    codes = torch.tensor(values, dtype=torch.uint8).unsqueeze(1)
    assert pack_int(codes, bits)[:, 0].tolist() == python_bitstream_words(values, bits)


def test_pack_3bit_first_word_layout():
    codes = (torch.arange(32) % 8).to(torch.uint8).unsqueeze(1)
    word0 = pack_int(codes, 3)[0, 0].item() & 0xFFFFFFFF
    for j in range(10):  # the first 10 values sit whole in word 0, 3 bits apart
        assert (word0 >> (3 * j)) & 0b111 == j % 8


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="2, 3, 4, 8"):
        pack_int(torch.zeros(32, 1, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_int(torch.full((32, 1), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_int(torch.zeros(32, 1), 4)
    with pytest.raises(ValueError, match="expected"):
        unpack_int(torch.zeros(4, 1, dtype=torch.int32), 4, rows=33)


# ---------------------------------------------------------------------------------------------
# validation and error messages
# ---------------------------------------------------------------------------------------------


def test_bit_checks():
    for bits in WEIGHT_BITS:
        check_weight_bits(bits)
    for bits in ACT_BITS:
        check_act_bits(bits)
    with pytest.raises(ValueError, match=r"got 5") as err:
        check_weight_bits(5)
    assert "(2, 3, 4, 8)" in str(err.value)
    with pytest.raises(ValueError, match=r"w_bits.*\(2, 3, 4, 8\).*16"):
        check_weight_bits(16)
    with pytest.raises(ValueError, match=r"a_bits.*\(4, 6, 8, 16\).*got 3"):
        check_act_bits(3)
    with pytest.raises(ValueError, match=r"kv_bits"):
        check_act_bits(2, what="kv_bits")
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 8\)"):
        fake_quantize_weight(make_weight(), 6, -1, symmetric=False)


def test_resolve_group_size():
    assert resolve_group_size(-1, 576) == 576
    assert resolve_group_size(64, 576) == 64
    assert resolve_group_size(576, 576) == 576


def test_group_size_error_names_layer_and_sizes():
    with pytest.raises(ValueError) as err:
        resolve_group_size(128, 576, layer_name="model.layers.0.mlp.down_proj")
    message = str(err.value)
    for part in ("model.layers.0.mlp.down_proj", "576", "128", "group_size=64", "-1"):
        assert part in message
    with pytest.raises(ValueError, match="positive"):
        resolve_group_size(0, 576)
    with pytest.raises(ValueError, match="in_features=100"):
        weight_qparams(torch.randn(4, 100), 4, 64, symmetric=False)
