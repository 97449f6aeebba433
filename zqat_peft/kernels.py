"""Loaders of the optional compiled kernels in ``zqat_peft/cuda_ext/`` (built on first use, then cached),
and the ``zqat::packed_linear`` operator that runs them for packed layers.

* ``cpu_noise_ext()``: ``cuda_ext/zo_noise_cpu.cpp``, the CPU kernel of the ZO noise (``add_scaled_noise``,
  ``fill_noise``), bit-identical to the PyTorch implementation in ``zqat_peft.noise``, which uses it
  for CPU tensors.
* ``cpu_packed_ext()``: ``cuda_ext/packed_linear_cpu.cpp``, the CPU kernel of a packed linear layer
  (``x @ W^T + bias`` with W decoded one tile of output columns at a time, never whole).
* ``cuda_ext()``: ``cuda_ext/zqat_kernels.cu`` (+ its pybind11 binding ``zqat_kernels_bind.cpp``): the CUDA
  kernels (scaled noise, fused perturb + weight fake quantization, activation fake quantization,
  packed-weight dequantization and GEMV). ``zqat_peft.noise`` and ``zqat_peft.quant`` call them for
  CUDA tensors outside autograd (the same bits as their PyTorch paths); ``packed_linear_cuda`` adds the
  batch-1 GEMV and a tiled workspace.

All are JIT-compiled with ``torch.utils.cpp_extension.load`` into torch's extensions directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), where later processes find the built
library. The sources are package data (``zqat_peft/cuda_ext/``), so an editable install and a wheel both
carry them. When the sources, the compiler (or ninja) or CUDA are missing, or the build fails, the loader
warns once and returns None, and callers fall back to the PyTorch implementation. ``ZQAT_NO_EXT=1`` in the
environment disables every extension (read on the first call; ``cpu_noise_ext.cache_clear()`` makes the
loader look again).

``zqat::packed_linear`` (``torch.ops.zqat.packed_linear``) is registered with ``torch.library`` when this
module is imported: a CPU implementation (``cpu_packed_ext``), a CUDA one (``packed_linear_cuda``) and a
fake (meta) one, so ``torch.compile`` and meta tensors see its output shape. It always runs a kernel and
raises if none is built; ``zqat_peft.quant.packed_linear`` decides when to call it and otherwise computes
the same product in PyTorch.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "CpuNoiseKernels", "CpuPackedKernels", "cpu_noise_ext", "cpu_packed_ext", "cpu_tile_columns", "cuda_ext",
    "ext_sources_dir", "extensions_disabled", "packed_linear_cuda",
]

_DISABLE_ENV = "ZQAT_NO_EXT"
_CPU_SOURCES = ("zo_noise_cpu.cpp",)
_PACKED_CPU_SOURCES = ("packed_linear_cpu.cpp",)
_CUDA_SOURCES = ("zqat_kernels_bind.cpp", "zqat_kernels.cu")
# Bump when a kernel's sources or their place change (the name keys torch's build directory, which other
# checkouts of an older version may share).
_CPU_NAME = "zqat_zo_noise_cpu_v2"
_PACKED_CPU_NAME = "zqat_packed_linear_cpu_v1"
_CUDA_NAME = "zqat_kernels_cuda_v2"


def extensions_disabled() -> bool:
    """True when ``ZQAT_NO_EXT`` is set to a true value (anything but '', '0', 'false', 'no', 'off')."""
    return os.environ.get(_DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def ext_sources_dir() -> Optional[Path]:
    """The kernel sources, ``zqat_peft/cuda_ext`` (package data), or None when they are not there."""
    folder = Path(__file__).resolve().parent / "cuda_ext"
    return folder if folder.is_dir() else None


def _sources(names: tuple[str, ...]) -> Optional[list[str]]:
    folder = ext_sources_dir()
    if folder is None:
        return None
    paths = [folder / n for n in names]
    return [str(p) for p in paths] if all(p.is_file() for p in paths) else None


def _host_flags() -> tuple[list[str], list[str]]:
    """Host compiler flags: optimise, never contract a * b + c into an FMA (the noise is defined with two
    roundings), OpenMP so that at::parallel_for runs in parallel (Linux; torch ships libgomp)."""
    cflags = ["-O3", "-ffp-contract=off"]
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


# torch's JIT build holds a `lock` file in the extension's build folder while it compiles and every other
# process waits for it to go, forever: a build killed midway (Ctrl-C, a killed job) leaves it behind and
# hangs every later run at its first packed forward. Our builds take about a minute (CUDA: a few), so a lock
# older than this is a dead build's.
STALE_BUILD_LOCK_SECONDS = 1800.0


def remove_stale_build_lock(build_dir: Path, max_age_s: float = STALE_BUILD_LOCK_SECONDS) -> bool:
    """Remove ``build_dir/lock`` if it is older than ``max_age_s`` (left by a killed build), with a warning.
    Returns whether a lock was removed."""
    lock = Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False
    warnings.warn(f"zqat_peft: removing {lock}, a build lock {age / 60:.0f} minutes old left by a killed build "
                  "(torch would wait for it forever)", RuntimeWarning, stacklevel=3)
    lock.unlink(missing_ok=True)
    return True


def _build_dir(name: str) -> Optional[Path]:
    try:  # torch's own choice of folder (TORCH_EXTENSIONS_DIR, or its default root); private, so guarded
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except Exception:
        return None


def _load(what: str, name: str, sources: Optional[list[str]], **kwargs: Any) -> Optional[Any]:
    if sources is None:
        warnings.warn(
            f"zqat_peft: the {what} sources were not found in the package's cuda_ext/ folder (an install "
            "that left out the package data?); using the PyTorch implementation.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    try:
        from torch.utils.cpp_extension import load

        build_dir = _build_dir(name)
        if build_dir is not None:
            remove_stale_build_lock(build_dir)
        return load(name=name, sources=sources, verbose=False, **kwargs)
    except Exception as err:  # no compiler / ninja / CUDA toolkit, or a build error
        first = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {first[0] if first else ''}"
        warnings.warn(
            f"zqat_peft: building the {what} ({', '.join(Path(s).name for s in sources)}) with "
            f"torch.utils.cpp_extension failed ({reason}); using the PyTorch implementation. "
            f"Set {_DISABLE_ENV}=1 to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


_NOISE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_INDEX = 2**31


class CpuNoiseKernels:
    """The CPU noise kernels, with their arguments checked here before the call.

    The C++ side checks them too, but an exception thrown from this extension crashed the interpreter
    under a CUDA build of torch (2.11+cu130; not under the CPU build of 2.13), so a bad argument is
    reported from Python and never reaches the kernel.
    """

    def __init__(self, module: Any):
        self.module = module
        self.NOISE_VERSION = module.NOISE_VERSION

    def add_scaled_noise(self, src: torch.Tensor, dst: torch.Tensor, seed: int, key: int, scale: float,
                         offset: int = 0) -> None:
        """dst <- src + float32(scale) * z(seed, key, offset + i); dst may be src."""
        for name, t in (("src", src), ("dst", dst)):
            _check_cpu_contiguous(f"add_scaled_noise: {name}", t)
        if src.dtype not in _NOISE_DTYPES:
            raise RuntimeError(f"add_scaled_noise: unsupported dtype {src.dtype} (float32, bfloat16, float16, float64)")
        if dst.dtype != src.dtype or dst.numel() != src.numel():
            raise RuntimeError(f"add_scaled_noise: dst ({dst.dtype}, {dst.numel()} elements) must match src "
                               f"({src.dtype}, {src.numel()} elements)")
        _check_noise_range(offset, src.numel())
        self.module.add_scaled_noise(src, dst, seed, key, scale, offset)

    def fill_noise(self, out: torch.Tensor, seed: int, key: int, offset: int = 0) -> None:
        """out <- z(seed, key, offset + i), float32."""
        _check_cpu_contiguous("fill_noise: out", out)
        if out.dtype != torch.float32:
            raise RuntimeError(f"fill_noise: out must be float32, got dtype {out.dtype}")
        _check_noise_range(offset, out.numel())
        self.module.fill_noise(out, seed, key, offset)


def _check_cpu_contiguous(what: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise RuntimeError(f"{what} must be a contiguous CPU tensor")


def _check_noise_range(offset: int, numel: int) -> None:
    if offset < 0 or offset + numel > _MAX_INDEX:
        raise RuntimeError(f"noise element indices must lie in [0, 2**31): got offset={offset}, numel={numel}")


@functools.lru_cache(maxsize=None)
def cpu_noise_ext() -> Optional[CpuNoiseKernels]:
    """The CPU ZO-noise kernels, or None (disabled, no sources, or no working compiler).

    Built on the first call (a few tens of seconds, or instant when torch's extension cache holds it);
    a failure is reported once and remembered for the life of the process.
    """
    if extensions_disabled():
        return None
    cflags, ldflags = _host_flags()
    module = _load("CPU noise kernel", _CPU_NAME, _sources(_CPU_SOURCES), extra_cflags=cflags, extra_ldflags=ldflags)
    return CpuNoiseKernels(module) if module is not None else None


@functools.lru_cache(maxsize=None)
def cuda_ext() -> Optional[Any]:
    """The CUDA kernels extension module, or None (disabled, no CUDA device, no sources or no nvcc)."""
    if extensions_disabled() or not torch.cuda.is_available():
        return None
    cflags, ldflags = _host_flags()
    # --fmad=false: no a * b + c contracted into an FMA (the kernels also spell out __fmul_rn / __fadd_rn).
    nvcc_flags = ["-O3", "--fmad=false"]
    return _load(
        "CUDA kernels",
        _CUDA_NAME,
        _sources(_CUDA_SOURCES),
        extra_cflags=cflags,
        extra_cuda_cflags=nvcc_flags,
        extra_ldflags=ldflags,
    )


# One thread's tile of decoded weight stays within a core's L2 cache (2 MiB on recent x86 server cores).
_CPU_TILE_BYTES = 2 * 2**20
_CPU_TILE_ALIGN = 16  # columns: one AVX-512 register of float32
_PACKED_BITS = (2, 3, 4, 8)


def cpu_tile_columns(out_features: int, in_features: int, element_size: int, threads: int) -> int:
    """Output columns per tile of the CPU packed kernel.

    As few tiles as the threads can share evenly (each tile is one GEMM, and a thread with one tile more
    than the others sets the time), each holding at most ``_CPU_TILE_BYTES`` of decoded weight, rounded up
    to a multiple of 16 columns.
    """
    if min(out_features, in_features, element_size, threads) <= 0:
        raise ValueError(f"cpu_tile_columns: sizes must be positive, got {out_features}, {in_features}, "
                         f"{element_size}, {threads}")
    max_columns = max(_CPU_TILE_ALIGN, _CPU_TILE_BYTES // (in_features * element_size) // _CPU_TILE_ALIGN * _CPU_TILE_ALIGN)
    n_tiles = -(-out_features // max_columns)
    n_tiles = -(-n_tiles // threads) * threads
    columns = -(-out_features // n_tiles)
    return -(-columns // _CPU_TILE_ALIGN) * _CPU_TILE_ALIGN


class CpuPackedKernels:
    """The CPU packed-linear kernel, with its arguments checked here before the call (see CpuNoiseKernels
    for why nothing unchecked reaches a C++ extension)."""

    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, module: Any):
        self.module = module

    def packed_linear(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bias: Optional[torch.Tensor], bits: int, in_features: int) -> torch.Tensor:
        """``x [M, in_features] @ W^T + bias`` in x's dtype (float32 or bfloat16), W decoded tile by tile."""
        _check_packed_args(x, qweight, scales, zeros, bias, bits, in_features)
        if x.dtype not in self.DTYPES:
            raise RuntimeError(f"packed_linear (CPU kernel): x must be float32 or bfloat16, got {x.dtype}")
        for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
            if t is not None:
                _check_cpu_contiguous(f"packed_linear: {name}", t)
        tile = cpu_tile_columns(qweight.shape[1], in_features, x.element_size(), torch.get_num_threads())
        return self.module.packed_linear(x, qweight, scales, zeros, bias, bits, in_features, tile)


def _check_packed_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       bias: Optional[torch.Tensor], bits: int, in_features: int) -> None:
    """The packed layout's contract (zqat_peft.quant.packing), shared by the CPU and CUDA kernels."""
    if bits not in _PACKED_BITS:
        raise RuntimeError(f"packed_linear: bits must be one of {_PACKED_BITS}, got {bits}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise RuntimeError(f"packed_linear: x must be [M, {in_features}], got {tuple(x.shape)}")
    out_features = qweight.shape[1] if qweight.dim() == 2 else -1
    if qweight.dtype != torch.int32 or qweight.shape != (-(-in_features // 32) * bits, out_features):
        raise RuntimeError(f"packed_linear: qweight must be int32 [ceil({in_features} / 32) * {bits}, out_features], "
                           f"got {qweight.dtype} {tuple(qweight.shape)}")
    if (scales.dtype != torch.float32 or zeros.dtype != torch.uint8 or scales.dim() != 2
            or scales.shape != zeros.shape or scales.shape[0] != out_features or in_features % scales.shape[1]):
        raise RuntimeError(f"packed_linear: scales (float32) and zeros (uint8) must be [{out_features}, n_groups] "
                           f"with n_groups dividing {in_features}; got {scales.dtype} {tuple(scales.shape)} and "
                           f"{zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise RuntimeError(f"packed_linear: bias must be [{out_features}] in {x.dtype}, got {bias.dtype} "
                           f"{tuple(bias.shape)}")


@functools.lru_cache(maxsize=None)
def cpu_packed_ext() -> Optional[CpuPackedKernels]:
    """The CPU packed-linear kernel, or None (disabled, no sources, or no working compiler)."""
    if extensions_disabled():
        return None
    cflags, ldflags = _host_flags()
    module = _load("CPU packed-linear kernel", _PACKED_CPU_NAME, _sources(_PACKED_CPU_SOURCES),
                   extra_cflags=cflags, extra_ldflags=ldflags)
    return CpuPackedKernels(module) if module is not None else None


def packed_linear_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    in_features: int,
    bias: Optional[torch.Tensor] = None,
    *,
    tile_rows: Optional[int] = None,
    ext: Optional[Any] = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` for a GPTQ-packed ``W`` (``zqat_qweight``, ``zqat_scales``, ``zqat_zeros``) on CUDA.

    A single row of ``x`` (batch-1 decoding) runs the GEMV kernel on the codes. Otherwise the codes are
    dequantized to ``x``'s dtype into a workspace ``W^T`` [in, out] and multiplied by ``torch.matmul``
    (cuBLAS); with ``tile_rows`` (a multiple of 32) the workspace holds ``tile_rows`` input rows at a time
    and the K tiles are accumulated with ``addmm`` (one extra rounding to ``x``'s dtype per tile).
    ``ext`` defaults to ``cuda_ext()``.
    """
    ext = ext if ext is not None else cuda_ext()
    if ext is None:
        raise RuntimeError("packed_linear_cuda needs the CUDA extension (see zqat_peft.kernels.cuda_ext)")
    out_features = qweight.shape[1]
    scales = scales.detach().float().contiguous()  # the kernels read float32 scales and uint8 zeros
    zeros = zeros.to(torch.uint8).contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] == 1:
        y = torch.empty(out_features, dtype=x.dtype, device=x.device)
        ext.gemv_packed(x2.reshape(-1).contiguous(), qweight, scales, zeros, bias, y, bits, in_features)
        return y.view(*lead, out_features)
    if tile_rows is None or tile_rows >= in_features:
        wt = torch.empty(in_features, out_features, dtype=x.dtype, device=x.device)
        ext.dequant_packed(qweight, scales, zeros, wt, bits, in_features, 0)
        y = x2 @ wt
    else:
        if tile_rows <= 0 or tile_rows % 32:
            raise ValueError(f"tile_rows must be a positive multiple of 32, got {tile_rows}")
        workspace = torch.empty(tile_rows, out_features, dtype=x.dtype, device=x.device)
        y = x2.new_zeros(x2.shape[0], out_features)
        for r0 in range(0, in_features, tile_rows):
            w = workspace[: min(tile_rows, in_features - r0)]
            ext.dequant_packed(qweight, scales, zeros, w, bits, in_features, r0)
            y = torch.addmm(y, x2[:, r0 : r0 + w.shape[0]], w)
    if bias is not None:
        y = y + bias
    return y.view(*lead, out_features)


# ----------------------------------------------------------------------------- torch.library operator


@torch.library.custom_op("zqat::packed_linear", mutates_args=())
def packed_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """``x [..., in_features] @ W^T + bias`` for GPTQ-packed ``W`` on the kernel of x's device.

    Raises when that kernel is not built: callers that can do without it (``zqat_peft.quant.packed_linear``)
    check first. The tile of W the CPU kernel decodes is chosen for ``torch.get_num_threads()``.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x.is_cuda:
        _check_packed_args(x2, qweight, scales, zeros, bias, bits, in_features)
        y = packed_linear_cuda(x2, qweight, scales, zeros, bits, in_features, bias)
    elif x.device.type == "cpu":
        ext = cpu_packed_ext()
        if ext is None:
            raise RuntimeError("zqat::packed_linear needs the CPU packed-linear kernel (see zqat_peft.kernels)")
        contiguous = [t.contiguous() for t in (x2, qweight, scales, zeros)]
        y = ext.packed_linear(*contiguous, bias if bias is None else bias.contiguous(), bits, in_features)
    else:
        raise RuntimeError(f"zqat::packed_linear has no kernel for {x.device.type} tensors")
    return y.view(*lead, qweight.shape[1])


@packed_linear_op.register_fake
def _packed_linear_fake(x, qweight, scales, zeros, bias, bits, in_features):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
