"""Compiled kernels (zqat_peft/cuda_ext/): the CPU noise kernel against the PyTorch definition, the CPU packed
linear kernel against the PyTorch reference, the dispatch to both, the loaders and the wheel that ships their
sources, an nvcc compile check of the CUDA kernels, and CUDA tests that run where a GPU is present."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from zqat_peft import kernels, noise
from zqat_peft.quant import dequantize_weight, fake_quantize_activation, fake_quantize_weight, pack_int, unpack_int
from zqat_peft.quant import quantize_weight, weight_qparams
from zqat_peft.noise import WeightNoise, add_scaled_noise, add_scaled_noise_, param_key, zo_noise

from .test_noise import PINNED

REPO = Path(__file__).resolve().parent.parent
CUDA_EXT_DIR = REPO / "zqat_peft" / "cuda_ext"
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


_LOADERS = (kernels.cpu_noise_ext, kernels.cpu_packed_ext, kernels.cuda_ext)


@pytest.fixture
def fresh_loaders():
    for loader in _LOADERS:
        loader.cache_clear()
    yield
    for loader in _LOADERS:
        loader.cache_clear()


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
    assert kernels.cpu_packed_ext() is None
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
    for name in KERNEL_SOURCES:
        assert (folder / name).is_file(), name


KERNEL_SOURCES = ("zo_noise_cpu.cpp", "packed_linear_cpu.cpp", "zqat_kernels.cu", "zqat_kernels.h",
                  "zqat_kernels_bind.cpp", "README.md")


def test_wheel_carries_the_kernel_sources(tmp_path):
    """A wheel built from the project holds every kernel source where ext_sources_dir() looks for them."""
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(REPO / "zqat_peft", src / "zqat_peft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           str(src), "-w", str(tmp_path / "dist")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout}\n{res.stderr}"
    (wheel,) = (tmp_path / "dist").glob("zqat_peft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in KERNEL_SOURCES if f"zqat_peft/cuda_ext/{n}" not in names]
    assert not missing, f"the wheel lacks {missing}"


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


# ----------------------------------------------------------------------------- CPU packed linear kernel


def _have_toolchain() -> bool:
    return shutil.which("ninja") is not None and (shutil.which("c++") or shutil.which("g++")) is not None


@pytest.fixture(scope="module")
def packed_ext():
    """The real CPU packed-linear kernel. Where a compiler and ninja exist it must build: a build failure
    there is a failure, not a skip (the layers would silently run the PyTorch path)."""
    if kernels.extensions_disabled():
        pytest.skip("ZQAT_NO_EXT is set")
    e = kernels.cpu_packed_ext()
    if e is None:
        assert not _have_toolchain(), "a C++ compiler and ninja are here, but the CPU packed kernel did not build"
        pytest.skip("no C++ compiler or ninja: the CPU packed kernel cannot be built here")
    return e


def _summation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x| @ |W|^T * 2 K u (u = 2**-24): how far two float32 sums of the same K products, taken in different
    orders, can lie apart (each lies within K u |x| |W|^T of the exact sum)."""
    k = x.shape[-1]
    return (x.double().abs() @ w.double().abs().t()) * (2 * k * 2.0**-24)


def _check_against_reference(y, x, codes, scale, zeros, bias):
    """y against the PyTorch reference, F.linear(x, dequantize_weight(codes, ...), bias), in x's dtype.

    float32: the kernel decodes the same weight bits, so the two differ only by the GEMM's summation order:
    |y - ref| <= 2 K u |x| |W|^T (+ 1e-30 for the all-zero rows). bfloat16: both round their float32 sum to
    bfloat16 once, so on top of that they may differ by one bfloat16 step of the output (2**-7 relative)."""
    w = dequantize_weight(codes, scale, zeros, dtype=x.dtype)
    ref = F.linear(x, w, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    bound = _summation_bound(x, w) + 1e-30
    if x.dtype == torch.bfloat16:
        bound = bound + ref.double().abs() * 2.0**-7
    err = (y.double() - ref.double()).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} over the bound {bound[err > bound].min():.3g}"


# (in_features, group): groups of 32/64/128 and per channel; 200 and 7 are no multiple of 32 (a ragged last chunk)
PACKED_SHAPES = [(384, 32), (384, 64), (384, 128), (384, -1), (200, 40), (200, -1), (7, -1)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_f,group", PACKED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_packed_kernel_matches_reference(packed_ext, bits, in_f, group, dtype):
    out_f = 100  # two tiles of 64 and 36 columns with 2 threads, a ragged last tile
    codes, qweight, scale, zeros = _packed_layer(bits, out_f, in_f, group if group > 0 else in_f, seed=bits + in_f)
    bias = torch.randn(out_f).to(dtype)
    for lead in [(1,), (7,), (3, 5)]:  # one token, an odd number, a batch of sequences
        x = torch.randn(*lead, in_f).to(dtype)
        y = torch.ops.zqat.packed_linear(x, qweight, scale, zeros, bias, bits, in_f)
        _check_against_reference(y, x, codes, scale, zeros, bias)
        y = torch.ops.zqat.packed_linear(x, qweight, scale, zeros, None, bits, in_f)
        _check_against_reference(y, x, codes, scale, zeros, None)


@pytest.mark.parametrize("bits", [3, 4])
def test_cpu_packed_kernel_any_tiling(packed_ext, bits):
    """The kernel's result does not depend on how the output columns are cut into tiles."""
    codes, qweight, scale, zeros = _packed_layer(bits, 77, 160, 32, seed=3)
    x = torch.randn(9, 160)
    for tile in (1, 16, 48, 76, 77, 500):
        y = packed_ext.module.packed_linear(x, qweight, scale, zeros, None, bits, 160, tile)
        _check_against_reference(y, x, codes, scale, zeros, None)


def test_cpu_packed_kernel_rejects_bad_arguments(packed_ext):
    codes, qweight, scale, zeros = _packed_layer(4, 48, 200, 40)
    x = torch.randn(3, 200)
    with pytest.raises(RuntimeError, match="x must be"):
        packed_ext.packed_linear(x[:, :100], qweight, scale, zeros, None, 4, 200)
    with pytest.raises(RuntimeError, match="qweight must be int32"):
        packed_ext.packed_linear(x, qweight[:-1], scale, zeros, None, 4, 200)
    with pytest.raises(RuntimeError, match="bits must be"):
        packed_ext.packed_linear(x, qweight, scale, zeros, None, 5, 200)
    with pytest.raises(RuntimeError, match="scales"):
        packed_ext.packed_linear(x, qweight, scale[:, :3], zeros[:, :3], None, 4, 200)
    with pytest.raises(RuntimeError, match="bias"):
        packed_ext.packed_linear(x, qweight, scale, zeros, torch.zeros(47), 4, 200)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        packed_ext.packed_linear(x.half(), qweight, scale, zeros, None, 4, 200)


def test_cpu_tile_columns():
    # Balanced over the threads, multiples of 16, at most 2 MiB of decoded weight unless 16 columns exceed it.
    assert kernels.cpu_tile_columns(576, 576, 4, 2) == 288
    assert kernels.cpu_tile_columns(192, 576, 4, 2) == 96
    assert kernels.cpu_tile_columns(100, 200, 4, 2) == 64
    assert kernels.cpu_tile_columns(4096, 11008, 4, 2) == 32  # 64 tiles of 32 x 11008 x 4 B = 1.3 MiB
    assert kernels.cpu_tile_columns(11008, 2**20, 4, 2) == 16
    with pytest.raises(ValueError):
        kernels.cpu_tile_columns(0, 4, 4, 2)


def test_packed_linear_op_meta_and_fake_tensors(packed_ext):
    """zqat::packed_linear is a torch.library operator with a fake implementation (torch.compile, meta)."""
    codes, qweight, scale, zeros = _packed_layer(3, 48, 200, 40)
    x = torch.randn(2, 5, 200)
    torch.library.opcheck(torch.ops.zqat.packed_linear.default, (x, qweight, scale, zeros, torch.randn(48), 3, 200))
    on_meta = [t.to("meta") for t in (x, qweight, scale, zeros)]
    y = torch.ops.zqat.packed_linear(*on_meta, None, 3, 200)
    assert y.device.type == "meta" and y.shape == (2, 5, 48)


class _RecordingPackedExt:
    """Stands in for CpuPackedKernels: records each call and computes the reference product."""

    DTYPES = kernels.CpuPackedKernels.DTYPES

    def __init__(self, inner=None):
        self.inner, self.calls = inner, []

    def packed_linear(self, x, qweight, scales, zeros, bias, bits, in_features):
        self.calls.append({"x": x, "scales": scales.clone(), "bits": bits})
        if self.inner is not None:
            return self.inner.packed_linear(x, qweight, scales, zeros, bias, bits, in_features)
        w = dequantize_weight(unpack_int(qweight, bits, in_features).t(), scales, zeros, dtype=x.dtype)
        return F.linear(x, w, bias)


def _scales_model(dtype=torch.float32):
    from peft import get_peft_model

    from zqat_peft import ZeroQATConfig

    from .conftest import tiny_model

    config = ZeroQATConfig(w_bits=3, group_size=32, trainable="scales")
    return get_peft_model(tiny_model("llama", dtype=dtype), config, autocast_adapter_dtype=False)


def _packed_layers(model):
    from zqat_peft.tuner import ZQATLinear

    return [m for m in model.modules() if isinstance(m, ZQATLinear)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_forward_dispatches_the_cpu_kernel(monkeypatch, dtype):
    """Every packed layer's forward goes to the CPU kernel (a stand-in here) and gives the reference output;
    where a gradient is needed, or for float16 (no kernel), the PyTorch path runs instead."""
    from .conftest import tiny_batch

    model = _scales_model(dtype)
    batch = tiny_batch()
    with torch.no_grad():
        monkeypatch.setattr(kernels, "cpu_packed_ext", lambda: None)
        ref = model(**batch).logits
        fake = _RecordingPackedExt()
        monkeypatch.setattr(kernels, "cpu_packed_ext", lambda: fake)
        out = model(**batch).logits
    assert len(fake.calls) == len(_packed_layers(model)) > 0
    assert all(c["bits"] == 3 and c["x"].dtype == dtype for c in fake.calls)
    assert _same_bits(out, ref)
    model(**batch)  # with autograd on, the scales need a gradient: the reference path runs
    with torch.no_grad():
        model.half()(**batch)
    assert len(fake.calls) == len(_packed_layers(model))


def test_scales_mode_perturbation_reaches_the_kernel(monkeypatch):
    """In scales mode the ZO perturbation is one of the scales tensor: the kernel gets the perturbed scales
    (stored + eps z) in each perturbed forward, and no dequantized weight is ever built."""
    from zqat_peft.noise import add_scaled_noise
    from zqat_peft.quant import packing
    from zqat_peft.zo import zo_parameters
    from zqat_peft.zo.perturbation import perturbed

    from .conftest import tiny_batch

    model = _scales_model()
    params = zo_parameters(model)
    fake = _RecordingPackedExt()
    monkeypatch.setattr(kernels, "cpu_packed_ext", lambda: fake)

    def no_dequantize(*args, **kwargs):
        raise AssertionError("a packed forward built a dequantized weight")

    monkeypatch.setattr(packing, "dequantize_packed", no_dequantize)
    batch = tiny_batch()
    for eps in (1e-3, -1e-3):
        fake.calls.clear()
        with perturbed(params, seed=11, scale=eps):
            model(**batch)
        stored = [p.param for p in params]
        expected = [add_scaled_noise(p.param, 11, p.key, eps) for p in params]
        assert len(fake.calls) == len(stored)
        for call, p, want in zip(fake.calls, stored, expected):
            assert _same_bits(call["scales"], want) and not torch.equal(call["scales"], p)


def test_packed_forward_uses_the_built_cpu_kernel(packed_ext, monkeypatch):
    """With the extension built, the layers' forward runs it (a spy around the real kernel) and matches the
    PyTorch path (float32: the summation-order bound of every layer carries into logits within 1e-4)."""
    from .conftest import tiny_batch

    model = _scales_model()
    batch = tiny_batch()
    spy = _RecordingPackedExt(inner=packed_ext)
    with torch.no_grad():
        monkeypatch.setattr(kernels, "cpu_packed_ext", lambda: spy)
        out = model(**batch).logits
        monkeypatch.setattr(kernels, "cpu_packed_ext", lambda: None)
        ref = model(**batch).logits
    assert len(spy.calls) == len(_packed_layers(model))
    assert torch.allclose(out, ref, rtol=0, atol=1e-4)


def test_packed_forward_dispatches_the_cuda_kernel(monkeypatch):
    """On CUDA (tensors that report CUDA here) the packed forward runs packed_linear_cuda's kernels."""
    from zqat_peft.quant import packed_linear, primitives

    codes, qweight, scale, zeros = _packed_layer(4)
    fake = _EmulatedPackedExt()
    monkeypatch.setattr(primitives, "cuda_ext", lambda: fake)
    monkeypatch.setattr(kernels, "cuda_ext", lambda: fake)
    on_cuda = [t.as_subclass(_ReportsCuda) for t in (qweight, scale, zeros)]
    x = torch.randn(3, 200)
    y = packed_linear(x.as_subclass(_ReportsCuda), *on_cuda, 4, 200)
    assert [c[0] for c in fake.calls] == ["dequant"]
    _check_against_reference(y.as_subclass(torch.Tensor), x, codes, scale, zeros, None)


class _RecordingFakeQuantExt:
    """The perturbed fake-quantization kernel's contract, in PyTorch, recording its calls."""

    def __init__(self):
        self.calls = 0

    def perturbed_fake_quant_weight(self, w, out, seed, key, scale, lo, hi, bits, group, symmetric):
        self.calls += 1
        noisy = add_scaled_noise(w.as_subclass(torch.Tensor), seed, key, scale)
        out.copy_(fake_quantize_weight(noisy, bits, group, symmetric, lo, hi, dtype=out.dtype))


def test_a_masked_perturbation_takes_the_pytorch_path_and_an_unmasked_one_the_kernel(monkeypatch):
    """The fused kernel perturbs every element, so a masked noise (ZOOptimizer(mask="rounding")) must not reach it;
    an unmasked one must (the fallback gives the same bits and would hide a dispatch bug)."""
    from zqat_peft.quant import primitives

    fake = _RecordingFakeQuantExt()
    monkeypatch.setattr(primitives, "cuda_ext", lambda: fake)
    torch.manual_seed(0)
    w = (torch.randn(8, 64) * 0.05).as_subclass(_ReportsCuda)
    mask = torch.rand(8, 64) < 0.3
    unmasked = fake_quantize_weight(w, 3, 32, False, noise=WeightNoise(5, 9, 1e-2))
    assert fake.calls == 1
    masked = fake_quantize_weight(w, 3, 32, False, noise=WeightNoise(5, 9, 1e-2, mask))
    assert fake.calls == 1
    plain = w.as_subclass(torch.Tensor)
    expected = fake_quantize_weight(torch.where(mask, add_scaled_noise(plain, 5, 9, 1e-2), plain), 3, 32, False)
    assert torch.equal(masked.as_subclass(torch.Tensor), expected)
    assert not torch.equal(masked.as_subclass(torch.Tensor), unmasked.as_subclass(torch.Tensor))


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


def test_a_build_lock_left_by_a_killed_build_is_removed_before_loading(tmp_path, monkeypatch):
    # torch waits forever for a lock that a killed build left: the first packed forward hung with no message
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = Path(cpp_extension._get_build_directory("zqat_lock_probe", verbose=False))
    lock = build_dir / "lock"
    lock.touch()
    old = time.time() - 2 * 24 * 3600  # two days
    os.utime(lock, (old, old))
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **_: seen.append(lock.exists()) or "module")
    with pytest.warns(RuntimeWarning, match="build lock .* left by a killed build"):
        assert kernels._load("probe", "zqat_lock_probe", [str(tmp_path / "probe.cpp")]) == "module"
    assert seen == [False]
    lock.touch()  # a build in progress (a fresh lock) is waited for, as torch does
    kernels._load("probe", "zqat_lock_probe", [str(tmp_path / "probe.cpp")])
    assert seen == [False, True]
