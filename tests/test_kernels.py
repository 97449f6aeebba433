"""Compiled kernels (cuda_ext/): the CPU noise kernel against the PyTorch definition, the loaders, an nvcc
compile check of the CUDA kernels, and CUDA tests that run where a GPU is present."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from zqat_peft import kernels, noise
from zqat_peft.quant import dequantize_weight, fake_quantize_activation, fake_quantize_weight, pack_int, unpack_int
from zqat_peft.quant import quantize_weight, weight_qparams
from zqat_peft.noise import add_scaled_noise, add_scaled_noise_, param_key, zo_noise

from .test_noise import PINNED

CUDA_EXT_DIR = Path(__file__).resolve().parent.parent / "cuda_ext"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (seed, key, scale): zero, negative, tiny (float32 0 after rounding, but not 0), large seeds and keys
CASES = [
    (0, 0, 1.0),
    (12345, param_key("lm_head.weight"), -3.7e-3),
    (2**32 - 1, 0xFFFFFFFF, 1e-2),
    (7, 11, 0.0),
    (3, param_key("model.layers.0.self_attn.q_proj.weight"), -0.5),
    (1, 2, 1e-50),
    (4, 5, -1e-40),  # float32 subnormal
]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.fixture(scope="module")
def ext():
    e = kernels.cpu_noise_ext()
    if e is None:
        pytest.skip("the CPU noise extension did not build here (no C++ compiler or ninja?)")
    return e


@pytest.fixture
def pytorch_path(monkeypatch):
    """Calls `fn` with zqat_peft.noise's PyTorch path forced (the loader it sees returns None)."""

    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(noise, "cpu_noise_ext", lambda: None)
            return fn(*args)

    return run


@pytest.fixture
def fresh_loaders():
    kernels.cpu_noise_ext.cache_clear()
    kernels.cuda_ext.cache_clear()
    yield
    kernels.cpu_noise_ext.cache_clear()
    kernels.cuda_ext.cache_clear()


# ----------------------------------------------------------------------------- (a) CPU kernel


@pytest.mark.parametrize("size", [1, 7, 1_000_003])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_bit_identical_to_pytorch_path(ext, pytorch_path, dtype, size):
    assert noise.cpu_noise_ext() is not None  # the noise module really takes the extension path
    gen = torch.Generator().manual_seed(size)
    p = (torch.randn(size, generator=gen) * 0.05).to(dtype)
    p[0] = -0.0  # the sign of a zero survives only when nothing is added
    for seed, key, scale in CASES:
        ref = pytorch_path(add_scaled_noise, p, seed, key, scale)
        out = add_scaled_noise(p, seed, key, scale)  # out of place, extension
        assert _same_bits(out, ref), (dtype, size, seed, key, scale)
        q = p.clone()
        assert add_scaled_noise_(q, seed, key, scale) is q  # in place, extension
        assert _same_bits(q, ref), (dtype, size, seed, key, scale)
        direct = torch.empty_like(p)  # the raw kernel, out of place and in place
        ext.add_scaled_noise(p, direct, seed, key, scale)
        q = p.clone()
        ext.add_scaled_noise(q, q, seed, key, scale)
        assert _same_bits(direct, ref) and _same_bits(q, ref)
        if size > 1 and abs(scale) > 1e-6:
            assert not _same_bits(out, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_2d_noncontiguous_and_threads(ext, pytorch_path, dtype):
    base = (torch.randn(333, 257) * 0.02).to(dtype)
    seed, key, scale = 99, param_key("w"), 2.5e-3
    ref = pytorch_path(add_scaled_noise, base, seed, key, scale)
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert _same_bits(add_scaled_noise(base, seed, key, scale), ref)
        finally:
            torch.set_num_threads(old)
    t = base.t()  # non-contiguous: noise follows the logical row-major order
    assert _same_bits(add_scaled_noise(t, seed, key, scale), pytorch_path(add_scaled_noise, t, seed, key, scale))
    w = torch.nn.Parameter(base.clone())  # in place on a leaf that requires grad
    add_scaled_noise_(w, seed, key, scale)
    assert w.requires_grad and _same_bits(w.detach(), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_matches_chunked_pytorch_path(ext, pytorch_path, monkeypatch, dtype):
    """test_noise's chunking tests now reach the kernel on CPU; the PyTorch path's chunking is checked here."""
    p = (torch.randn(5000) * 0.1).to(dtype)
    out = add_scaled_noise(p, 31, 41, -0.02)
    monkeypatch.setitem(noise.CHUNK_ELEMS, "cpu", 1024)
    assert _same_bits(pytorch_path(add_scaled_noise, p, 31, 41, -0.02), out)
    q = p.clone()
    pytorch_path(add_scaled_noise_, q, 31, 41, -0.02)
    assert _same_bits(q, out)


@pytest.mark.parametrize("seed,key,index,bits", PINNED)
def test_cpu_kernel_pinned_vectors(ext, seed, key, index, bits):
    z = torch.empty(1)
    ext.fill_noise(z, seed, key, index)
    assert z.view(torch.int32).item() & 0xFFFFFFFF == bits
    out = torch.empty(1)
    ext.add_scaled_noise(torch.zeros(1), out, seed, key, 1.0, index)  # 0 + float32(1 * z) == z exactly
    assert out.view(torch.int32).item() & 0xFFFFFFFF == bits


def test_cpu_kernel_offsets_match_zo_noise(ext):
    seed, key = 2024, param_key("offsets")
    for offset, n in [(0, 100_003), (3, 70_000), (2**31 - 1000, 1000)]:
        z = torch.empty(n)
        ext.fill_noise(z, seed, key, offset)
        assert _same_bits(z, zo_noise(seed, key, n, offset=offset))
        p = torch.randn(n)
        out = torch.empty(n)
        ext.add_scaled_noise(p, out, seed, key, noise._f32(0.3), offset)
        assert _same_bits(out, p + zo_noise(seed, key, n, offset=offset) * noise._f32(0.3))


def test_cpu_kernel_rejects_bad_arguments(ext):
    p = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.add_scaled_noise(p.t(), torch.empty(6, 4), 1, 2, 0.5)
    with pytest.raises(RuntimeError, match="dst"):
        ext.add_scaled_noise(p, torch.empty(4, 6, dtype=torch.float64), 1, 2, 0.5)
    with pytest.raises(RuntimeError, match="2\\*\\*31"):
        ext.add_scaled_noise(p, torch.empty_like(p), 1, 2, 0.5, 2**31 - 3)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.add_scaled_noise(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), 1, 2, 0.5)
    with pytest.raises(ValueError):  # the Python wrapper checks before calling the kernel
        add_scaled_noise(p, 1, 2, float("inf"))


# ----------------------------------------------------------------------------- (c) loaders


def test_no_ext_env_disables_extensions(fresh_loaders, monkeypatch):
    monkeypatch.setenv("ZQAT_NO_EXT", "1")
    kernels.cpu_noise_ext.cache_clear()
    assert kernels.extensions_disabled()
    assert kernels.cpu_noise_ext() is None
    assert kernels.cuda_ext() is None
    p = torch.randn(1000)
    expected = p + zo_noise(5, 6, 1000) * noise._f32(0.125)
    assert _same_bits(add_scaled_noise(p, 5, 6, 0.125), expected)
    add_scaled_noise_(p, 5, 6, 0.125)
    assert _same_bits(p, expected)
    seed, key, index, bits = PINNED[-1]
    assert zo_noise(seed, key, 1, offset=index).view(torch.int32).item() & 0xFFFFFFFF == bits
    monkeypatch.setenv("ZQAT_NO_EXT", "0")
    assert not kernels.extensions_disabled()


def test_loader_warns_once_and_caches_failures(fresh_loaders, monkeypatch):
    monkeypatch.delenv("ZQAT_NO_EXT", raising=False)
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Error building extension 'zqat': g++ not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.cpu_noise_ext() is None
        assert kernels.cpu_noise_ext() is None
        p = torch.randn(50)
        assert _same_bits(add_scaled_noise(p, 1, 2, 0.5), p + zo_noise(1, 2, 50) * 0.5)  # PyTorch path
    assert len(calls) == 1
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "zo_noise_cpu.cpp" in messages[0] and "g++ not found" in messages[0] and "PyTorch" in messages[0]


def test_loader_without_sources(fresh_loaders, monkeypatch):
    monkeypatch.delenv("ZQAT_NO_EXT", raising=False)
    monkeypatch.setattr(kernels, "ext_sources_dir", lambda: None)
    with pytest.warns(RuntimeWarning, match="sources were not found"):
        assert kernels.cpu_noise_ext() is None
    assert kernels.cpu_noise_ext() is None


def test_sources_resolve_next_to_the_package():
    folder = kernels.ext_sources_dir()
    assert folder is not None and folder.resolve() == CUDA_EXT_DIR.resolve()
    for name in ("zo_noise_cpu.cpp", "zqat_kernels.cu", "zqat_kernels.h", "zqat_kernels_bind.cpp", "README.md"):
        assert (folder / name).is_file(), name


# ----------------------------------------------------------------------------- (b) nvcc compile check


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compile-checked here")
    return nvcc


def test_cuda_kernels_compile_with_nvcc(tmp_path):
    from torch.utils.cpp_extension import include_paths

    nvcc = _nvcc()
    cmd = [
        nvcc, "-c", "-std=c++17", "-O3", "--fmad=false", "-Xcompiler", "-fPIC",
        "-gencode", "arch=compute_90,code=sm_90",
        *[f"-I{p}" for p in include_paths()],
        str(CUDA_EXT_DIR / "zqat_kernels.cu"), "-o", str(tmp_path / "zqat_kernels.o"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / "zqat_kernels.o").stat().st_size > 0


def test_cuda_binding_compiles(tmp_path):
    """The pybind11 binding (host code: nvcc hands it to the host compiler with the CUDA include folder).
    CPU builds of torch ship c10/cuda without its generated cuda_cmake_macros.h; a stand-in with the one
    macro a CUDA build of torch defines replaces it here."""
    from torch.utils.cpp_extension import include_paths

    nvcc = _nvcc()
    stub = tmp_path / "stub"
    if not (Path(include_paths()[0]) / "c10/cuda/impl/cuda_cmake_macros.h").is_file():
        (stub / "c10/cuda/impl").mkdir(parents=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [
        nvcc, "-c", "-std=c++17", "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=zqat_kernels_check",
        *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", f"-I{stub}",
        str(CUDA_EXT_DIR / "zqat_kernels_bind.cpp"), "-o", str(tmp_path / "bind.o"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"compile failed:\n{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


# ----------------------------------------------------------------------------- packed_linear_cuda (logic)


class _EmulatedPackedExt:
    """The two packed-weight kernels' contracts, in PyTorch, to test packed_linear_cuda's orchestration."""

    def __init__(self):
        self.calls = []

    def dequant_packed(self, qweight, scales, zeros, out, bits, in_features, row_begin):
        assert row_begin % 32 == 0 and out.is_contiguous()
        self.calls.append(("dequant", row_begin, out.shape[0]))
        codes = unpack_int(qweight, bits, in_features)  # [in, out]
        wt = dequantize_weight(codes.t(), scales, zeros, dtype=out.dtype).t()
        out.copy_(wt[row_begin : row_begin + out.shape[0]])

    def gemv_packed(self, x, qweight, scales, zeros, bias, y, bits, in_features):
        self.calls.append(("gemv",))
        wt = dequantize_weight(unpack_int(qweight, bits, in_features).t(), scales, zeros, dtype=x.dtype)
        y.copy_(F.linear(x, wt, bias))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_linear_orchestration(bits):
    torch.manual_seed(bits)
    out_f, in_f, group = 48, 200, 40
    w = torch.randn(out_f, in_f)
    scale, zero = weight_qparams(w, bits, group, symmetric=False)
    codes = quantize_weight(w, scale, zero, bits)
    qweight, zeros = pack_int(codes.t(), bits), zero.to(torch.uint8)
    wq = dequantize_weight(codes, scale, zeros)
    bias = torch.randn(out_f)
    x = torch.randn(3, 5, in_f)
    fake = _EmulatedPackedExt()
    ref = F.linear(x, wq, bias)
    y = kernels.packed_linear_cuda(x, qweight, scale, zeros, bits, in_f, bias, ext=fake)
    assert y.shape == (3, 5, out_f) and torch.allclose(y, ref, atol=1e-5)
    y = kernels.packed_linear_cuda(x, qweight, scale, zeros, bits, in_f, bias, tile_rows=64, ext=fake)
    assert torch.allclose(y, ref, atol=1e-4)
    assert [c[1:] for c in fake.calls[-4:]] == [(0, 64), (64, 64), (128, 64), (192, 8)]
    y1 = kernels.packed_linear_cuda(x[:1, :1], qweight, scale, zeros, bits, in_f, None, ext=fake)
    assert fake.calls[-1] == ("gemv",) and y1.shape == (1, 1, out_f)
    assert torch.allclose(y1, F.linear(x[:1, :1], wq), atol=1e-5)
    with pytest.raises(ValueError):
        kernels.packed_linear_cuda(x, qweight, scale, zeros, bits, in_f, tile_rows=48, ext=fake)


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that reports itself as a CUDA tensor: drives the CUDA dispatch decisions without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def _packed_layer(bits, out_f=48, in_f=200, group=40, seed=0):
    """(codes, qweight, scale, zeros) of a random [out_f, in_f] weight quantized with groups of ``group``."""
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f)
    scale, zero = weight_qparams(w, bits, group, symmetric=False)
    codes = quantize_weight(w, scale, zero, bits)
    return codes, pack_int(codes.t(), bits), scale, zero.to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_packed_dispatches_the_cuda_kernel(monkeypatch, bits):
    """Packed codes on CUDA are dequantized by the kernel (int32 codes must not turn the kernel away)."""
    from zqat_peft.quant import dequantize_packed, primitives

    codes, qweight, scale, zeros = _packed_layer(bits)
    fake = _EmulatedPackedExt()
    monkeypatch.setattr(primitives, "cuda_ext", lambda: fake)
    on_cuda = [t.as_subclass(_ReportsCuda) for t in (qweight, scale, zeros)]
    w = dequantize_packed(*on_cuda, bits, 200, dtype=torch.bfloat16)
    assert fake.calls == [("dequant", 0, 200)]
    assert _same_bits(w.contiguous(), dequantize_weight(codes, scale, zeros, dtype=torch.bfloat16))
    # Scales that need a gradient take the PyTorch path (the kernel has no backward); so does a CPU tensor.
    trainable = scale.clone().requires_grad_(True).as_subclass(_ReportsCuda)
    dequantize_packed(on_cuda[0], trainable, on_cuda[2], bits, 200)
    dequantize_packed(qweight, scale, zeros, bits, 200)
    assert len(fake.calls) == 1


# ----------------------------------------------------------------------------- CUDA (GPU machines only)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def cuda_ext():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    e = kernels.cuda_ext()
    if e is None:
        pytest.skip("the CUDA extension did not build")
    return e


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_noise_bit_identical(cuda_ext, dtype):
    for size in (1, 7, 1_000_003):
        p = (torch.randn(size) * 0.05).to(dtype)
        for seed, key, scale in CASES:
            ref = add_scaled_noise(p, seed, key, scale)  # CPU
            out = torch.empty_like(p, device="cuda")
            cuda_ext.add_scaled_noise(p.cuda(), out, seed, key, scale)
            assert _same_bits(out.cpu(), ref)
            q = p.cuda()
            cuda_ext.add_scaled_noise(q, q, seed, key, scale)
            assert _same_bits(q.cpu(), ref)
    for seed, key, index, bits in PINNED:
        out = torch.empty(1, device="cuda")
        cuda_ext.add_scaled_noise(torch.zeros(1, device="cuda"), out, seed, key, 1.0, index)
        assert out.view(torch.int32).item() & 0xFFFFFFFF == bits


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_noise_offsets_and_unaligned_views(cuda_ext, dtype):
    """The 16-byte path (aligned bulk) and the scalar path (tail, unaligned views) index the same stream."""
    seed, key, scale = 2024, param_key("offsets"), -0.3
    base = (torch.randn(70_011) * 0.05).to(dtype)
    for start, offset in [(0, 0), (0, 3), (1, 0), (3, 2**31 - 80_000)]:
        p = base[start:]
        t = zo_noise(seed, key, p.numel(), offset=offset) * noise._f32(scale)  # float32, as the definition says
        ref = p + t.double() if dtype == torch.float64 else (p.float() + t).to(dtype)
        q = base.cuda()[start:]
        cuda_ext.add_scaled_noise(q, q, seed, key, scale, offset)
        assert _same_bits(q.cpu(), ref), (start, offset)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (2, 64, False), (3, 128, True), (4, 256, False),
                                                  (8, -1, False), (3, 192, False)])
def test_cuda_perturbed_fake_quant_weight(cuda_ext, monkeypatch, dtype, bits, group, symmetric):
    """The fused kernel equals the PyTorch path on CUDA bit for bit, for groups held in registers (32-256)
    and strided ones (per channel over 768 columns, 192), with and without noise, in every output dtype."""
    from zqat_peft.quant import primitives

    w = (torch.randn(96, 768, device="cuda") * 0.02).to(dtype)
    n_groups = 768 // (768 if group == -1 else group)
    lo = torch.randn(96, n_groups, device="cuda") + 2
    hi = torch.randn(96, n_groups, device="cuda") + 2
    monkeypatch.setattr(primitives, "cuda_ext", lambda: None)  # the reference: torch's own ops on CUDA
    monkeypatch.setattr(noise, "cuda_ext", lambda: None)
    for scale in (0.0, 1e-3, -2e-3):
        wp = add_scaled_noise(w, 17, param_key("w"), scale)
        for out_dtype in (dtype, torch.bfloat16, torch.float32):
            ref = fake_quantize_weight(wp, bits, group, symmetric, lo, hi, dtype=out_dtype)
            out = torch.full_like(w, float("nan"), dtype=out_dtype)
            cuda_ext.perturbed_fake_quant_weight(w, out, 17, param_key("w"), scale, lo, hi, bits, group, symmetric)
            assert _same_bits(out, ref), (scale, out_dtype, (out.float() - ref.float()).abs().max().item())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fake_quantize_weight_with_noise_uses_the_fused_kernel(cuda_ext, monkeypatch, dtype):
    """fake_quantize_weight(noise=...) on CUDA (noise generated inside the kernel) equals the PyTorch
    path (perturbed copy, then fake quantization) bit for bit."""
    from zqat_peft.noise import WeightNoise
    from zqat_peft.quant import primitives

    w = (torch.randn(96, 256, device="cuda") * 0.02).to(dtype)
    lo, hi = torch.randn(96, 4, device="cuda") + 2, torch.randn(96, 4, device="cuda") + 2
    perturbation = WeightNoise(2**40 + 3, param_key("w"), -1.5e-3)  # seeds are taken mod 2**32 on both paths
    fused = fake_quantize_weight(w, 3, 64, False, lo, hi, noise=perturbation)
    fused_bf16 = fake_quantize_weight(w, 3, 64, False, lo, hi, noise=perturbation, dtype=torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(primitives, "cuda_ext", lambda: None)
        m.setattr(noise, "cuda_ext", lambda: None)
        ref = fake_quantize_weight(w, 3, 64, False, lo, hi, noise=perturbation)
    assert _same_bits(fused, ref)
    assert fused_bf16.dtype == torch.bfloat16 and _same_bits(fused_bf16, ref.to(torch.bfloat16))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits,group", [(8, -1), (4, -1), (4, 64)])
def test_cuda_fake_quant_activation(cuda_ext, dtype, bits, group):
    x = torch.randn(3, 17, 256, device="cuda").to(dtype)
    out = torch.empty_like(x)
    cuda_ext.fake_quant_activation(x, out, bits, group)
    assert _same_bits(out, fake_quantize_activation(x, bits, group))


@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_packed_weight_paths(cuda_ext, bits, dtype):
    out_f, in_f, group = 320, 4096 + 96, 32
    w = torch.randn(out_f, in_f, device="cuda") * 0.02
    scale, zero = weight_qparams(w, bits, group, symmetric=False)
    codes = quantize_weight(w, scale, zero, bits)
    qweight, zeros = pack_int(codes.t(), bits), zero.to(torch.uint8)
    wq = dequantize_weight(codes, scale, zeros, dtype=dtype)
    wt = torch.empty(in_f, out_f, dtype=dtype, device="cuda")
    cuda_ext.dequant_packed(qweight, scale, zeros, wt, bits, in_f, 0)
    assert _same_bits(wt, wq.t().contiguous())
    x = torch.randn(1, in_f, device="cuda").to(dtype)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    ref = F.linear(x.float(), wq.float(), bias.float())
    y = kernels.packed_linear_cuda(x, qweight, scale, zeros, bits, in_f, bias)  # GEMV
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 if dtype != torch.float32 else 1e-3)
    xb = torch.randn(8, in_f, device="cuda").to(dtype)
    yb = kernels.packed_linear_cuda(xb, qweight, scale, zeros, bits, in_f, bias, tile_rows=1024)
    assert torch.allclose(yb.float(), F.linear(xb.float(), wq.float(), bias.float()), rtol=2e-2, atol=5e-2)


@needs_cuda
@pytest.mark.parametrize("mode", ["full", "lightweight", "scales"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_model_same_bits_with_and_without_kernels(cuda_ext, monkeypatch, mode, dtype):
    """A whole ZeroQAT model on CUDA (W3 g32, A8): perturbed losses, and the weights after a ZO update, are
    bit-identical whether the kernels or the PyTorch ops compute the noise and the fake quantization."""
    import copy

    from peft import get_peft_model

    from zqat_peft import ZeroQATConfig
    from zqat_peft.quant import primitives
    from zqat_peft.zo import spsa_losses, zo_parameters, zo_update

    from .conftest import tiny_batch, tiny_model

    config = ZeroQATConfig(w_bits=3, a_bits=8, group_size=32, trainable=mode)
    base = get_peft_model(tiny_model("llama", dtype=dtype), config, autocast_adapter_dtype=False).cuda()
    batch = {k: v.cuda() for k, v in tiny_batch().items()}

    def run(model):
        params = zo_parameters(model)
        forward = lambda: model(**batch).loss  # noqa: E731
        losses = spsa_losses(params, forward, 5, 1e-3)
        zo_update(params, [5], [float(losses[0] - losses[1]) / 2e-3], 1e-4)
        with torch.no_grad():
            logits = model(**batch).logits
        return [float(x) for x in losses], [p.param.detach().clone() for p in params], logits

    with_kernels = run(copy.deepcopy(base))
    with monkeypatch.context() as m:
        m.setattr(primitives, "cuda_ext", lambda: None)  # also the packed path's (packing asks primitives)
        m.setattr(noise, "cuda_ext", lambda: None)
        without = run(copy.deepcopy(base))
    assert with_kernels[0] == without[0]
    assert all(_same_bits(a, b) for a, b in zip(with_kernels[1], without[1]))
    assert _same_bits(with_kernels[2], without[2])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
