"""The counter-based ZO noise: definition, determinism, chunking, statistics, scaled addition."""

import math
import random
import struct
import zlib

import pytest
import torch

from zqat_peft import noise
from zqat_peft.kernels import cpu_noise_ext
from zqat_peft.noise import (
    NOISE_SCALE,
    add_noise_update_,
    add_scaled_noise,
    add_scaled_noise_,
    mix32,
    noise_reference,
    param_key,
    rounding_reference,
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


@pytest.fixture(params=["pytorch", "kernel"])
def backend(request, monkeypatch):
    """Run a test on the pure-PyTorch path (extension disabled) and on the compiled CPU kernel (if built)."""
    if request.param == "pytorch":
        monkeypatch.setattr(noise, "cpu_noise_ext", lambda: None)
    elif cpu_noise_ext() is None:
        pytest.skip("the CPU noise kernel is not built here")
    return request.param


# ----- an independent reading of the definition in zqat_peft/noise.py's docstring (Python ints, struct)

_U32 = 0xFFFFFFFF


def _lowbias32(x: int) -> int:
    x &= _U32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def _float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _z_by_definition(seed: int, key: int, i: int) -> float:
    k = _lowbias32(_lowbias32(seed % 2**32) ^ (key % 2**32))
    h1, h2 = _lowbias32(k ^ _lowbias32(i)), _lowbias32(k ^ _lowbias32(i | 2**31))
    s = sum((h >> shift) & 0xFFFF for h in (h1, h2) for shift in (0, 16))
    c = struct.unpack("<f", struct.pack("<I", 0x37DDB3D7))[0]
    return _float32((s - 131070) * c)  # an 18-bit by 24-bit product is exact in a double: one rounding


def _u_by_definition(seed: int, key: int, i: int) -> float:
    k = _lowbias32(_lowbias32(seed % 2**32) ^ (key % 2**32))
    kr = _lowbias32(k ^ 0x9E3779B9)
    return (_lowbias32(kr ^ _lowbias32(i)) >> 16) / 65536


def _bf16_neighbours(x: float) -> tuple[float, float]:
    """The bfloat16 values around a finite float32 x: bfloat16 is float32 with the low 16 bits zero."""
    bits = _bits(x)
    toward_zero = struct.unpack("<f", struct.pack("<I", bits & 0xFFFF0000))[0]
    away = struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF0000) + 0x10000))[0]
    return (min(toward_zero, away), max(toward_zero, away))


def test_noise_matches_an_independent_reading_of_the_definition():
    rng = random.Random(1)
    cases = [(seed, key, index) for seed, key, index, _ in PINNED]
    cases += [(rng.randrange(2**32), rng.randrange(2**32), rng.randrange(2**31)) for _ in range(200)]
    for seed, key, index in cases:
        expected = _z_by_definition(seed, key, index)
        assert _bits(zo_noise(seed, key, (1,), offset=index).item()) == _bits(expected), (seed, key, index)
    for seed, key, index, bits in PINNED:
        assert _bits(_z_by_definition(seed, key, index)) == bits
    for seed, key, index in cases[:50]:
        assert rounding_reference(seed, key, index) == _u_by_definition(seed, key, index)


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


def test_determinism(backend):
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


def test_chunking_does_not_change_values(monkeypatch, backend):
    seed, key, n = 5, 6, 40_000
    ref = torch.tensor([_z_by_definition(seed, key, i) for i in range(0, n, 997)])
    assert _same_bits(zo_noise(seed, key, n)[::997].contiguous(), ref)
    ref = zo_noise(seed, key, n)
    p = torch.randn(n)
    ref_p = p + ref * noise._f32(0.25)  # two float32 roundings, as defined
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
def test_scaled_addition(dtype, small_chunks, backend):
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


def test_non_contiguous_and_parameters(small_chunks, backend):
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


class RecordingKernel:
    """A stand-in for the compiled CPU kernel: records each call, then computes as the kernel does."""

    def __init__(self):
        self.calls = []

    def add_scaled_noise(self, src, dst, seed, key, scale):
        self.calls.append(src.dtype)
        dst.copy_(src + zo_noise(seed, key, src.shape) * noise._f32(scale))


def test_kernel_dispatch_float32_through_the_kernel_half_precision_updates_never(monkeypatch):
    kernel = RecordingKernel()
    monkeypatch.setattr(noise, "cpu_noise_ext", lambda: kernel)
    add_scaled_noise_(torch.zeros(64), 1, 2, 0.5)
    add_noise_update_(torch.zeros(64), 2, [(1, 0.5), (3, 0.25)], decay=0.9)
    assert kernel.calls == [torch.float32] * 3
    for dtype in (torch.bfloat16, torch.float16):  # rounded stochastically, in PyTorch, never to nearest
        add_noise_update_(torch.zeros(64, dtype=dtype), 2, [(1, 0.5)], decay=0.9)
    assert kernel.calls == [torch.float32] * 3


def test_half_precision_update_matches_the_definition(small_chunks):
    """bfloat16, element by element in Python: x = float32(float32(p) * decay); x = float32(x + float32(s z))
    per term; then lo or hi by the rounding stream of (rounding seed, key)."""
    key, terms, decay, rounding_seed = param_key("w"), [(11, -3e-4), (12, 2e-4)], 1 - 1e-3, 11
    p = (torch.randn(3000, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    p[:3] = torch.tensor([0.0, 1.0, -2.5])
    out = add_noise_update_(p.clone(), key, terms, decay, rounding_seed)
    for i in list(range(0, 3000, 7)) + [1023, 1024, 2047, 2048]:
        x = _float32(p[i].item() * _float32(decay))
        for seed, scale in terms:
            x = _float32(x + _float32(_float32(scale) * _z_by_definition(seed, key, i)))
        lo, hi = _bf16_neighbours(x)
        expected = x if lo == x or hi == x else (hi if x - lo > _u_by_definition(rounding_seed, key, i) * (hi - lo) else lo)
        assert out[i].item() == expected, i


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_update_far_below_an_ulp_is_kept_on_average(dtype):
    """Around 1.0 an update of 5e-5 * z (|z| < 3.47) is below half the spacing (bfloat16: 2**-8 below 1,
    float16: 2**-11): rounded to nearest it vanishes; rounded stochastically, the mean change along z is the update."""
    n, scale = 1 << 20, 5e-5
    p = torch.ones(n, dtype=dtype)
    add_noise_update_(p, 5, [(9, scale)], rounding_seed=9)
    z = zo_noise(9, 5, n).double()
    step = (p.double() - 1) @ z / (z @ z)
    assert abs(step - scale) < 0.05 * scale, step
    assert (p != 1).float().mean() > 0.002  # a few weights moved by a whole step
    q = torch.ones(n, dtype=dtype)
    add_scaled_noise_(q, 9, 5, scale)  # the perturbation's rounding to nearest loses it all
    assert torch.equal(q, torch.ones(n, dtype=dtype))


def test_half_precision_update_is_chunk_invariant_and_handles_edges(monkeypatch):
    p = (torch.randn(5000) * 0.02).to(torch.bfloat16)
    p[:4] = torch.tensor([float("inf"), float("nan"), 3.38e38, -0.0])
    ref = add_noise_update_(p.clone(), 3, [(4, 1e-3)], 0.99, 4)
    for chunk in (512, 4096):
        monkeypatch.setitem(noise.CHUNK_ELEMS, "cpu", chunk)
        assert _same_bits(add_noise_update_(p.clone(), 3, [(4, 1e-3)], 0.99, 4), ref)
    assert ref[0].item() == float("inf") and math.isnan(ref[1].item()) and math.isfinite(ref[2].item())
    t = p.clone().view(50, 100).t()  # non-contiguous: row-major order of the logical tensor
    add_noise_update_(t, 3, [(4, 1e-3)], 0.99, 4)
    assert _same_bits(t.contiguous().view(-1), add_noise_update_(p.view(50, 100).t().contiguous(), 3, [(4, 1e-3)], 0.99, 4).view(-1))
    with pytest.raises(ValueError, match="finite"):
        add_noise_update_(p.clone(), 3, [(4, float("nan"))])
