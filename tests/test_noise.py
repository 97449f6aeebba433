"""The counter-based ZO noise: definition, determinism, chunking, statistics, scaled addition."""

import math
import random
import struct
import zlib

import pytest
import torch

from zqat_peft import noise
from zqat_peft.noise import (
    NOISE_SCALE,
    add_scaled_noise,
    add_scaled_noise_,
    mix32,
    noise_reference,
    param_key,
    stream_key,
    zo_noise,
)

# (seed, key, index) -> float32 bits of z. Computed once from the definition; a CUDA kernel must match.
PINNED = [
    (0, 0x00000000, 0, 0xC017E723),
    (0, 0x00000000, 1, 0xBF83DE89),
    (1, 0x00000000, 0, 0xBFC4705D),
    (1, 0xAA823655, 2, 0xBF2C8FF4),
    (12345, 0x9B4E2D52, 123456789, 0x3F87BD45),
    (2**32 - 1, 0xFFFFFFFF, 2**31 - 1, 0xBED5A6B3),
]


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.fixture
def small_chunks(monkeypatch):
    """Force 1024-element chunks so that small tensors cross several chunk boundaries."""
    monkeypatch.setitem(noise.CHUNK_ELEMS, "cpu", 1024)


def test_constants_and_keys():
    assert _bits(NOISE_SCALE) == 0x37DDB3D7
    assert abs(NOISE_SCALE**2 * (2**32 - 1) / 3 - 1) < 1e-7
    assert mix32(0) == 0 and mix32(1) == 0x688990C0
    assert param_key("lm_head.weight") == zlib.crc32(b"lm_head.weight") == 0x9B4E2D52
    assert param_key("model.layers.0.self_attn.q_proj.weight") == 0xAA823655
    assert stream_key(12345, 0x9B4E2D52) == 0x7779AFD0
    assert stream_key(2**32 + 7, 3) == stream_key(7, 3)  # seeds are taken mod 2**32


@pytest.mark.parametrize("seed,key,index,bits", PINNED)
def test_pinned_values(seed, key, index, bits):
    assert _bits(noise_reference(seed, key, index)) == bits
    z = zo_noise(seed, key, (1,), offset=index)
    assert _bits(z.item()) == bits


def test_tensor_matches_scalar_definition(small_chunks):
    rng = random.Random(0)
    seed, key = 987654321, param_key("w")
    z = zo_noise(seed, key, 5000, offset=3000)
    for local in [0, 1, 23, 24, 1047, 1048, 2071, 2072, 4999] + rng.sample(range(5000), 40):
        assert _bits(z[local].item()) == _bits(noise_reference(seed, key, 3000 + local))


def test_determinism():
    a = zo_noise(7, 11, (300, 200))
    b = zo_noise(7, 11, (300, 200))
    assert a.shape == (300, 200) and a.dtype == torch.float32
    assert _same_bits(a, b)
    p = torch.randn(300, 200)
    assert _same_bits(add_scaled_noise(p, 7, 11, 0.5), add_scaled_noise(p, 7, 11, 0.5))


def test_offsets_concatenate(small_chunks):
    seed, key, n = 3, 99, 10_000
    whole = zo_noise(seed, key, n)
    cuts = [0, 1, 500, 1023, 1024, 1025, 3000, 7777, n]
    parts = [zo_noise(seed, key, b - a, offset=a) for a, b in zip(cuts, cuts[1:])]
    assert _same_bits(torch.cat(parts), whole)


def test_chunking_does_not_change_values(monkeypatch):
    seed, key, n = 5, 6, 40_000
    ref = zo_noise(seed, key, n)
    p = torch.randn(n)
    ref_p = add_scaled_noise(p, seed, key, 0.25)
    for chunk in (512, 8192, 1 << 16):
        monkeypatch.setitem(noise.CHUNK_ELEMS, "cpu", chunk)
        assert _same_bits(zo_noise(seed, key, n), ref)
        assert _same_bits(add_scaled_noise(p, seed, key, 0.25), ref_p)
        q = p.clone()
        assert _same_bits(add_scaled_noise_(q, seed, key, 0.25), ref_p)


def test_statistics():
    z = zo_noise(2024, param_key("stats"), 1 << 20).double()
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.var().item() - 1) < 1e-2
    assert abs(((z**4).mean() / z.var() ** 2).item() - 2.7) < 0.05  # Irwin-Hall(4) kurtosis
    assert z.abs().max().item() <= math.sqrt(12) + 1e-6
    lag1 = torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()
    assert abs(lag1) < 5e-3
    # the 16-bit uniforms are used in full: many distinct values
    assert torch.unique(z[:100_000]).numel() > 50_000


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


def test_seeds_and_keys_uncorrelated():
    n = 1 << 18
    bound = 5 / math.sqrt(n)
    base = zo_noise(100, 200, n)
    for seed, key in [(101, 200), (100, 201), (100 + 2**31, 200), (100, 200 ^ 2**31), (0, 0), (200, 100)]:
        assert abs(_corr(base, zo_noise(seed, key, n))) < bound
    # a parameter's noise is not a shifted copy of itself or of a neighbouring key's
    assert abs(_corr(base[1:], base[:-1])) < bound
    assert abs(_corr(base, zo_noise(100, 201, n, offset=1))) < bound
    # averaged over seeds, E[z z^T] ~ I for a few elements
    zs = torch.stack([zo_noise(s, 5, 4) for s in range(1500)]).double()
    cov = zs.T @ zs / zs.shape[0]
    assert torch.allclose(cov, torch.eye(4, dtype=torch.float64), atol=0.17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scaled_addition(dtype, small_chunks):
    seed, key, scale = 42, param_key("layer.weight"), -3.7e-3
    p = (torch.randn(37, 129) * 0.02).to(dtype)
    z = zo_noise(seed, key, p.shape)
    t = z * noise._f32(scale)  # float32(float32(scale) * z)
    expected = (p.double() + t.double()).to(dtype) if dtype == torch.float64 else (p.float() + t).to(dtype)
    out = add_scaled_noise(p, seed, key, scale)
    assert out.dtype == dtype and out.shape == p.shape
    assert _same_bits(out, expected)
    q = p.clone()
    ret = add_scaled_noise_(q, seed, key, scale)
    assert ret is q
    assert _same_bits(q, expected)
    assert not _same_bits(q, p)


def test_bf16_perturbation_follows_noise():
    p = (torch.randn(64, 64) * 0.01).to(torch.bfloat16)
    up = add_scaled_noise(p, 1, 2, 1e-2)
    assert up.dtype == torch.bfloat16
    diff = (up.float() - p.float()) / 1e-2
    z = zo_noise(1, 2, p.shape)
    assert _corr(diff.view(-1), z.view(-1)) > 0.99


def test_non_contiguous_and_parameters(small_chunks):
    base = torch.randn(40, 90)
    p = base.t()  # non-contiguous; noise follows the logical row-major order
    expected = p.contiguous() + zo_noise(8, 9, p.shape) * noise._f32(0.1)
    assert _same_bits(add_scaled_noise(p, 8, 9, 0.1), expected)
    add_scaled_noise_(p, 8, 9, 0.1)
    assert _same_bits(p.contiguous(), expected)
    w = torch.nn.Parameter(torch.randn(10, 10))
    out = add_scaled_noise(w, 1, 1, 0.5)
    assert not out.requires_grad
    add_scaled_noise_(w, 1, 1, -0.5)  # in place on a leaf that requires grad
    assert w.requires_grad


def test_zero_scale_and_errors():
    p = torch.randn(10)
    assert _same_bits(add_scaled_noise(p, 1, 2, 0.0), p)
    q = p.clone()
    add_scaled_noise_(q, 1, 2, 0.0)
    assert _same_bits(q, p)
    with pytest.raises(ValueError):
        zo_noise(1, 2, 10, offset=2**31 - 5)
    with pytest.raises(ValueError):
        zo_noise(1, 2, 10, offset=-1)
    with pytest.raises(TypeError):
        add_scaled_noise(torch.ones(3, dtype=torch.int64), 1, 2, 1.0)
    assert zo_noise(1, 2, (0, 5)).shape == (0, 5)
    assert zo_noise(1, 2, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
