"""Counter-based ZO noise: the same bits on every device, regenerated from (seed, key, index), never stored.

The ZO trainer perturbs every trainable parameter p by eps * z. z must be a pure function of the
step's seed, a stable 32-bit key of the parameter and the element's flat index, and a trajectory
recorded on one device must replay bit-exactly on another. torch's generators give neither, so z is
defined here with integer operations only, plus float32 operations that IEEE 754 rounds exactly
(round to nearest even) on every device. A CUDA kernel must implement exactly this definition
("zqat-noise-v1", ``NOISE_VERSION``); the test vectors below pin it.

Definition
----------
All integers are unsigned 32-bit: every operation is taken mod 2**32, ``>>`` is a logical shift.

``mix32(x)`` is Chris Wellons' "lowbias32", a bijection of the 32-bit integers::

    x ^= x >> 16;  x *= 0x7feb352d;  x ^= x >> 15;  x *= 0x846ca68b;  x ^= x >> 16

Stream key of a (seed, key) pair (``seed`` is the step's seed, ``key`` the parameter's id, see
``param_key``; both are reduced mod 2**32 first)::

    k = mix32(mix32(seed mod 2**32) ^ (key mod 2**32))

Element ``i`` (flat row-major index in the parameter, 0 <= i < 2**31) uses two 32-bit words::

    h1 = mix32(k ^ mix32(i))
    h2 = mix32(k ^ mix32(i | 0x80000000))     # i with bit 31 set

(The inner, unkeyed ``mix32`` scrambles the counter before the key enters, so two streams are not
simple index permutations of each other; all 2 * numel counters of a stream are distinct, so all its
words are distinct. Bit 31 rather than counters 2i, 2i+1 tells h1 from h2 so that a chunk's h1 and
h2 words form two contiguous blocks.) The four 16-bit halves are independent uniforms on {0, ..., 65535}::

    S = (h1 & 0xFFFF) + (h1 >> 16) + (h2 & 0xFFFF) + (h2 >> 16)          # integer, 0 <= S <= 262140
    z = float32(S - 131070) * C                                          # one float32 multiply

with ``C = float32(1 / sqrt(4 * (65536**2 - 1) / 12)) = float32(1 / sqrt(1431655765))`` rounded
once, bit pattern 0x37ddb3d7 (= 2.6428997443872504e-05). ``S - 131070`` is an integer of magnitude
at most 131070 < 2**24, so its float32 conversion is exact; the multiply is the only rounding.

Statistics: z is Irwin-Hall(4) noise (a sum of four independent discrete uniforms), centred and
scaled. Its distribution is symmetric about 0 and round-to-nearest-even is odd, so E[z] = 0 exactly;
Var[z] = 1 - 3.61e-8 (summed over the exact distribution: C's rounding, C**2 * 1431655765 - 1, gives
-3.61e-8 and the products' roundings ~1e-11). Distinct elements, parameters and seeds are independent
up to the quality of the hash, so E[z z^T] = I as SPSA needs. z is bounded (|z| <= 3.4642), hence
sub-Gaussian; its excess kurtosis is -0.3 (N(0, 1): 0).

Scaled addition (``add_scaled_noise``, ``add_scaled_noise_``): with ``s = float32(scale)``::

    t = float32(s * z)                                    # rounded once, a separate multiply
    float32/float16/bfloat16 params:  p' = dtype(float32(float32(p) + t))
    float64 params:                   p' = float64(p) + float64(t)

Two separately rounded operations, never a fused multiply-add (a CUDA kernel must use
``__fmul_rn`` / ``__fadd_rn`` or ``-fmad=false``). A scale of exactly 0 leaves p unchanged.
``zo_noise(..., dtype=d)`` forms the float32 z first and converts it to ``d`` afterwards.

Update of half-precision parameters (``add_noise_update_``)
-----------------------------------------------------------
A ZO step moves a weight by lr * g * z, often far less than half a bfloat16 ulp of the weight: rounded to
nearest, the update would vanish. A step's update of a parameter, ``p' = decay * p + sum_j s_j * z(seed_j, key)``,
is therefore formed in float32, in this order::

    x = float32(p);  x = float32(x * float32(decay));  then for each term j:  x = float32(x + float32(s_j * z_j))

float32 and float64 parameters take the same operations directly (``p.mul_(decay)``, then
``add_scaled_noise_`` per term). bfloat16 and float16 parameters are written once, rounded
stochastically from x with the bits of a second stream of the step, the rounding stream of
(``rounding_seed``, key): with ``k = stream_key(rounding_seed, key)``::

    kr = mix32(k ^ 0x9e3779b9)                          # distinct from every noise stream key k
    u  = (mix32(kr ^ mix32(i)) >> 16) * 2**-16          # element i: uniform on {0, 1/65536, ..., 65535/65536}
    x representable in the dtype:  p' = x
    otherwise, lo < x < hi the two adjacent values of the dtype:  p' = hi if x - lo > u * (hi - lo) else lo

``x - lo`` and ``u * (hi - lo)`` are exact in float32, so every device rounds alike, and
P(p' = hi) = (x - lo) / (hi - lo) exactly whenever that ratio is a multiple of 2**-16 (always for
bfloat16; for float16 except in its subnormal range): E[p'] = x. A non-finite x, or one beyond the
dtype's largest finite value, is rounded to nearest (a plain cast).

Test vectors (k, h1, h2 and z's float32 bits in hex; mix32(1) = 0x688990c0)::

    seed        key         index        k           h1          h2          z bits      z
    0           0x00000000  0            0x00000000  0x00000000  0x88d91857  0xc017e723  -2.3734825
    0           0x00000000  1            0x00000000  0x58f54975  0x8cb63899  0xbf83de89  -1.0302287
    1           0x00000000  0            0x58f54975  0x24009c6d  0x34c327fa  0xbfc4705d  -1.534679
    1           0xaa823655  2            0xdd37b41f  0xae6b0a5a  0xae3c355c  0xbf2c8ff4  -0.67407155
    12345       0x9b4e2d52  123456789    0x7779afd0  0xbdc6d246  0x2f0cdda3  0x3f87bd45  1.0604635
    4294967295  0xffffffff  2147483647   0x9945545d  0x6c1167a6  0x51269d74  0xbed5a6b3  -0.41728744

(0xaa823655 = param_key("model.layers.0.self_attn.q_proj.weight"), 0x9b4e2d52 = param_key("lm_head.weight").)

Implementation (pure PyTorch, any device)
-----------------------------------------
uint32 lanes are emulated in int64 tensors holding values in [0, 2**32). The multiply by 0x7feb352d
(< 2**31) cannot overflow int64; 0x846ca68b is replaced by 0x846ca68b - 2**32 (same residue,
magnitude < 2**31), so that product also stays inside int64, and ``& 0xFFFFFFFF`` reduces either
mod 2**32 (two's complement). Three exact identities cut the work:

* ``x -> x ^ (x >> 16)`` is GF(2)-linear, so mix32's first step of the counter ``B ^ j`` (B a
  multiple of the chunk length, j inside the chunk) is ``table[j] ^ (B ^ (B >> 16))``, and that of
  ``B ^ j ^ 2**31`` is ``table[j] ^ 0x80008000 ^ (B ^ (B >> 16))``;
* it is also an involution on 32-bit words, so the inner mix32's last step, the xor with k and the
  outer mix32's first step together are one xor with ``k ^ (k >> 16)``;
* the 16-bit halves of both words are summed in int32 views of the int64 buffers (values stay
  below 2**18 there, so the int32 adds never overflow).

On CPU, ``add_scaled_noise`` / ``add_scaled_noise_`` run a compiled kernel instead
(``zqat_peft/cuda_ext/zo_noise_cpu.cpp``, loaded by ``zqat_peft.kernels.cpu_noise_ext``) that computes the same
bits 10-20x faster per thread; without a compiler, or with ``ZQAT_NO_EXT=1``, the PyTorch path below runs.

Parameters are processed in chunks of ``CHUNK_ELEMS[device type]`` elements (a power of two) through
per-thread workspaces preallocated once per device, so the extra memory is a few chunk-sized buffers
whatever the parameter's size. The chunking does not change the result.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .kernels import cpu_noise_ext, cuda_ext

__all__ = [
    "NOISE_MAX",
    "NOISE_SCALE",
    "NOISE_VERSION",
    "WeightNoise",
    "add_noise_update_",
    "add_scaled_noise",
    "add_scaled_noise_",
    "mix32",
    "noise_reference",
    "param_key",
    "rounding_reference",
    "stream_key",
    "zo_noise",
]

NOISE_VERSION = "zqat-noise-v1"


@dataclass(frozen=True)
class WeightNoise:
    """A perturbation ``scale * z(seed, key)`` of one tensor, applied where the tensor is read.

    A layer that accepts one (``ZQATLayer.set_weight_noise``) sees its master weight as
    ``add_scaled_noise(weight, seed, key, scale)`` for the duration of a forward, so that a fused kernel
    can generate z while it quantizes the weight instead of writing a perturbed copy first.
    """

    seed: int
    key: int
    scale: float
    # bool, the tensor's shape: only these elements are perturbed (None: all); see ZOParameter.mask
    mask: Optional[Tensor] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _scale32(self.scale)  # raises on NaN/inf

    def applied_to(self, weight: Tensor) -> Tensor:
        """``weight`` as this noise perturbs it, out of place: ``add_scaled_noise`` where the mask holds."""
        perturbed = add_scaled_noise(weight, self.seed, self.key, self.scale)
        return perturbed if self.mask is None else torch.where(self.mask, perturbed, weight)

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_C2_INT64 = _C2 - (1 << 32)  # same residue mod 2**32; |x * _C2_INT64| < 2**63 for 0 <= x < 2**32
_BIT31 = 0x80000000
_MAX_INDEX = 1 << 31  # element indices must lie in [0, 2**31)
_CENTER = 131070  # E[S] = 4 * 65535 / 2
_ROUNDING_STREAM = 0x9E3779B9  # kr = mix32(k ^ _ROUNDING_STREAM): the rounding stream of a noise stream k
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


NOISE_SCALE: float = _f32(1.0 / math.sqrt((65536**2 - 1) / 3))  # bits 0x37ddb3d7
assert struct.pack("<f", NOISE_SCALE) == struct.pack("<I", 0x37DDB3D7)
NOISE_MAX: float = _f32(_CENTER * NOISE_SCALE)  # the largest |z|, 3.4642

# Elements per chunk by device type (powers of two). The workspace is 3 int64 buffers of 2 * chunk
# (two work buffers, the counter table) and a float32 chunk: 13 MiB at 2**18, 104 MiB at 2**21.
CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 21}
_DEFAULT_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- scalar definition


def mix32(x: int) -> int:
    """lowbias32 on a Python int (taken mod 2**32)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    x ^= x >> 16
    return x


def param_key(name: str) -> int:
    """The stable 32-bit key of a parameter: CRC-32 of its UTF-8 name."""
    return zlib.crc32(name.encode("utf-8")) & _M32


def stream_key(seed: int, key: int) -> int:
    """k = mix32(mix32(seed mod 2**32) ^ (key mod 2**32))."""
    return mix32(mix32(seed & _M32) ^ (key & _M32))


def noise_reference(seed: int, key: int, index: int) -> float:
    """z for one element, straight from the definition in Python ints (slow; for tests and kernels).

    The float32 steps are exact here: S - 131070 (18 bits) times C (24 bits) is exact in a double,
    which is then rounded once to float32.
    """
    if not 0 <= index < _MAX_INDEX:
        raise ValueError(f"index must be in [0, 2**31), got {index}")
    k = stream_key(seed, key)
    h1 = mix32(k ^ mix32(index))
    h2 = mix32(k ^ mix32(index | _BIT31))
    s = (h1 & _M16) + (h1 >> 16) + (h2 & _M16) + (h2 >> 16)
    return _f32(float(s - _CENTER) * NOISE_SCALE)


def rounding_reference(seed: int, key: int, index: int) -> float:
    """u for one element of the rounding stream of (seed, key), straight from the definition."""
    if not 0 <= index < _MAX_INDEX:
        raise ValueError(f"index must be in [0, 2**31), got {index}")
    kr = mix32(stream_key(seed, key) ^ _ROUNDING_STREAM)
    return (mix32(kr ^ mix32(index)) >> 16) / 65536.0


# ----------------------------------------------------------------------------- tensor implementation


class _Workspace:
    """Preallocated buffers for one (device, thread, stream): reused by every call.

    Views into them are cached per (chunk offset, length) because parameter shapes repeat every
    step and creating a dozen views costs more than the arithmetic on a small tensor.
    """

    __slots__ = ("chunk", "table", "x", "t", "z", "_views")

    def __init__(self, device: torch.device, chunk: int):
        self.chunk = chunk
        j = torch.arange(chunk, dtype=torch.int64, device=device)
        j ^= j >> 16  # mix32's first step of the in-chunk part of the counter ...
        # ... and of the same counter with bit 31 set, relative to the chunk's h1 base (see _fill_noise)
        self.table = torch.stack([j, j ^ (_BIT31 ^ (_BIT31 >> 16))])
        self.x = torch.empty(2 * chunk, dtype=torch.int64, device=device)
        self.t = torch.empty(2 * chunk, dtype=torch.int64, device=device)
        self.z = torch.empty(chunk, dtype=torch.float32, device=device)
        self._views: dict[tuple[int, int], tuple[Tensor, ...]] = {}

    def views(self, r: int, n: int) -> tuple[Tensor, ...]:
        v = self._views.get((r, n))
        if v is None:
            if len(self._views) >= 512:
                self._views.clear()
            x, t = self.x[: 2 * n], self.t[: 2 * n]
            x32 = x.view(torch.int32)
            v = self._views[(r, n)] = (
                self.table[:, r : r + n], x, t, x.view(2, n), x[:n], x32, t.view(torch.int32), x32[: 2 * n],
                x32[2 * n :], self.z[:n],
            )
        return v


_local = threading.local()


def _chunk_elems(device: torch.device) -> int:
    chunk = int(CHUNK_ELEMS.get(device.type, _DEFAULT_CHUNK))
    if chunk <= 0 or chunk & (chunk - 1):
        raise ValueError(f"CHUNK_ELEMS[{device.type!r}] must be a power of two, got {chunk}")
    return chunk


def _workspace(device: torch.device) -> _Workspace:
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    stream = 0
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.current_stream(device).cuda_stream
    chunk = _chunk_elems(device)
    slot = (device.type, device.index, stream)
    ws = cache.get(slot)
    if ws is None or ws.chunk != chunk:
        ws = cache[slot] = _Workspace(device, chunk)
    return ws


def _fold(seed: int, key: int) -> int:
    """k ^ (k >> 16) of the stream (seed, key): what _fill_noise xors in (see the implementation notes)."""
    k = stream_key(seed, key)
    return k ^ (k >> 16)


def _mul_mod32(x: Tensor, c: int) -> None:
    """x <- x * c mod 2**32 in place (x int64 in [0, 2**32), |c| < 2**31: the product fits int64)."""
    x.mul_(c).bitwise_and_(_M32)


def _fill_noise(ws: _Workspace, kfold: int, start: int, n: int, out: Optional[Tensor] = None) -> Tensor:
    """z of elements start .. start + n - 1 into `out` (float32, contiguous) or the workspace; returns it.

    The elements must lie in one aligned chunk: start // chunk == (start + n - 1) // chunk.
    kfold = k ^ (k >> 16).
    """
    r = start & (ws.chunk - 1)
    base = start - r
    table, x, t, x_blocks, x_h1, x32, t32, x32_h1, x32_h2, z = ws.views(r, n)
    if out is not None:
        z = out
    # Counters i = base ^ j (h1 block) and i ^ 2**31 (h2 block), after mix32's first step.
    torch.bitwise_xor(table, base ^ (base >> 16), out=x_blocks)
    # inner mix32, rest
    _mul_mod32(x, _C1)
    torch.bitwise_right_shift(x, 15, out=t)
    x.bitwise_xor_(t)
    _mul_mod32(x, _C2_INT64)
    # inner last step, ^ k, outer first step == ^ (k ^ (k >> 16))
    x.bitwise_xor_(kfold)
    # outer mix32, up to its last step
    _mul_mod32(x, _C1)
    torch.bitwise_right_shift(x, 15, out=t)
    x.bitwise_xor_(t)
    _mul_mod32(x, _C2_INT64)
    # outer last step h = x ^ (x >> 16): hi16(h) = x >> 16, lo16(h) = (x ^ (x >> 16)) & 0xFFFF
    torch.bitwise_right_shift(x, 16, out=t)
    x.bitwise_xor_(t).bitwise_and_(_M16)
    # lo + hi per word, then h1 + h2 per element, in int32 views (< 2**18, the high halves stay 0)
    x32.add_(t32)
    x32_h1.add_(x32_h2)
    z.copy_(x_h1)  # S, exact in float32
    z.sub_(float(_CENTER)).mul_(NOISE_SCALE)
    return z


def _chunks(offset: int, numel: int, chunk: int):
    """(local start, global start, length) of the aligned chunks covering offset .. offset + numel - 1."""
    pos = 0
    while pos < numel:
        g = offset + pos
        n = min(chunk - (g & (chunk - 1)), numel - pos)
        yield pos, g, n
        pos += n


def _check_range(offset: int, numel: int) -> None:
    if offset < 0 or offset + numel > _MAX_INDEX:
        raise ValueError(
            f"noise element indices must lie in [0, 2**31): got offset={offset}, numel={numel}"
        )


def _as_shape(shape: Union[int, Sequence[int], torch.Size]) -> tuple[int, ...]:
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(s) for s in shape)


@torch.no_grad()
def zo_noise(
    seed: int,
    key: int,
    shape: Union[int, Sequence[int], torch.Size],
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    offset: int = 0,
) -> Tensor:
    """z of elements offset .. offset + numel - 1 of stream (seed, key), shaped `shape`.

    Formed in float32 and then converted to `dtype`.
    """
    shape = _as_shape(shape)
    numel = math.prod(shape)
    _check_range(offset, numel)
    device = torch.device(device) if device is not None else torch.get_default_device()
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        kfold = _fold(seed, key)
        ws = _workspace(device)
        for pos, g, n in _chunks(offset, numel, ws.chunk):
            _fill_noise(ws, kfold, g, n, out[pos : pos + n])
    out = out.view(shape)
    return out if dtype == torch.float32 else out.to(dtype)


def _scale32(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return _f32(scale)


def _apply(src: Tensor, dst: Tensor, seed: int, key: int, scale: float) -> None:
    """dst <- src + float32(scale) * z, chunk by chunk (src, dst flat, contiguous; may be the same).

    CPU and CUDA tensors go through the compiled kernels (``zqat_peft.kernels``: the same bits, z
    generated inside the kernel) when they are available.
    """
    numel = src.numel()
    _check_range(0, numel)
    s = _scale32(scale)
    if src.device.type in ("cpu", "cuda"):
        ext = cpu_noise_ext() if src.device.type == "cpu" else cuda_ext()
        if ext is not None:
            # the kernel rounds scale to float32 itself (as _scale32 does); it copies only for exactly 0
            ext.add_scaled_noise(src, dst, seed & _M32, key & _M32, float(scale))
            return
    kfold = _fold(seed, key)
    ws = _workspace(src.device)
    for pos, g, n in _chunks(0, numel, ws.chunk):
        z = _fill_noise(ws, kfold, g, n)
        z.mul_(s)  # t = float32(s * z): its own rounding, never fused into the add
        a, b = (src, dst) if n == numel else (src[pos : pos + n], dst[pos : pos + n])
        if dst is src:
            b.add_(z)  # computed in float32 (float64 for float64), rounded to dst's dtype
        else:
            torch.add(a, z, out=b)


def _check_param(param: Tensor) -> None:
    if not param.is_floating_point():
        raise TypeError(f"add_scaled_noise needs a floating-point tensor, got {param.dtype}")


@torch.no_grad()
def add_scaled_noise(param: Tensor, seed: int, key: int, scale: float) -> Tensor:
    """param + scale * z(seed, key), out of place: a new contiguous tensor of param's dtype and shape.

    Exactly p + float32(float32(scale) * z) in float32 (float64 for float64 params), then rounded to
    param's dtype. Runs without autograd.
    """
    _check_param(param)
    if float(scale) == 0.0:
        return param.detach().clone(memory_format=torch.contiguous_format)
    src = param.detach().reshape(-1)  # a view when param is contiguous, else a row-major copy
    out = torch.empty(param.shape, dtype=param.dtype, device=param.device)
    _apply(src, out.view(-1), seed, key, scale)
    return out


@torch.no_grad()
def add_scaled_noise_(param: Tensor, seed: int, key: int, scale: float) -> Tensor:
    """param += scale * z(seed, key) in place (the ZO update, scale = -lr * g); returns param.

    Bit-identical to add_scaled_noise(param, seed, key, scale).
    """
    _check_param(param)
    if float(scale) == 0.0:
        return param
    if param.is_contiguous():
        flat = param.detach().view(-1)
        _apply(flat, flat, seed, key, scale)
    else:
        param.copy_(add_scaled_noise(param, seed, key, scale))
    return param


# ----------------------------------------------------------------------------- the update


def _mix32_(x: Tensor) -> Tensor:
    """lowbias32 in place on an int64 tensor of values in [0, 2**32)."""
    x.bitwise_xor_(x >> 16)
    _mul_mod32(x, _C1)
    x.bitwise_xor_(x >> 15)
    _mul_mod32(x, _C2_INT64)
    return x.bitwise_xor_(x >> 16)


def _rounding_uniform(kr: int, start: int, n: int, device: torch.device) -> Tensor:
    """u of elements start .. start + n - 1 of the rounding stream kr: float32, multiples of 2**-16 in [0, 1)."""
    words = _mix32_(_mix32_(torch.arange(start, start + n, dtype=torch.int64, device=device)).bitwise_xor_(kr))
    return (words >> 16).to(torch.float32).mul_(2.0**-16)


def _round_stochastic(x: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 x rounded to `dtype`: up with probability (x - lo) / (hi - lo), i.e. when x - lo > u (hi - lo)."""
    nearest = x.to(dtype)
    nearest32 = nearest.to(torch.float32)
    toward = torch.where(nearest32 < x, math.inf, -math.inf).to(dtype)
    other = torch.nextafter(nearest, toward).to(torch.float32)  # the neighbour on x's other side
    lo, hi = torch.minimum(nearest32, other), torch.maximum(nearest32, other)
    rounded = torch.where(x - lo > u * (hi - lo), hi, lo)  # x == nearest: lo < hi == x, always taken
    return torch.where(torch.isfinite(rounded) & torch.isfinite(nearest32), rounded, nearest32).to(dtype)


def _update_half_(flat: Tensor, key: int, terms: Sequence[tuple[int, float]], decay: float, rounding_seed: int) -> None:
    """The update of a contiguous flat bfloat16/float16 tensor, chunk by chunk (see the module docstring)."""
    folds = [(_fold(seed, key), _scale32(scale)) for seed, scale in terms]
    kr = mix32(stream_key(rounding_seed, key) ^ _ROUNDING_STREAM)
    ws = _workspace(flat.device)
    for pos, g, n in _chunks(0, flat.numel(), ws.chunk):
        part = flat[pos : pos + n]
        x = part.to(torch.float32)
        if decay != 1.0:
            x.mul_(decay)
        for kfold, s in folds:
            x.add_(_fill_noise(ws, kfold, g, n).mul_(s))  # t = float32(s * z), then its own addition
        part.copy_(_round_stochastic(x, _rounding_uniform(kr, g, n, flat.device), flat.dtype))


@torch.no_grad()
def add_noise_update_(
    param: Tensor, key: int, terms: Sequence[tuple[int, float]], decay: float = 1.0, rounding_seed: int = 0
) -> Tensor:
    """param <- decay * param + sum of scale * z(seed, key) over the (seed, scale) terms, in place; returns param.

    float32/float64 params: ``param.mul_(decay)`` then ``add_scaled_noise_`` per term (each rounded to
    nearest). bfloat16/float16 params: the same operations in float32, rounded stochastically once with
    the rounding stream of (rounding_seed, key), so that updates far below the dtype's ulp still move
    the weight on average; always in PyTorch (the compiled kernels round to nearest).
    """
    _check_param(param)
    decay = float(decay)
    if not math.isfinite(decay):
        raise ValueError(f"decay must be finite, got {decay}")
    terms = [(seed, scale) for seed, scale in terms if float(scale) != 0.0]
    if not terms and decay == 1.0:
        return param
    if param.dtype not in _HALF_DTYPES:
        if decay != 1.0:
            param.detach().mul_(decay)
        for seed, scale in terms:
            add_scaled_noise_(param, seed, key, scale)
        return param
    flat = param.detach().reshape(-1) if param.is_contiguous() else param.detach().contiguous().view(-1)
    _check_range(0, flat.numel())
    _update_half_(flat, key, terms, decay, rounding_seed)
    if not param.is_contiguous():
        param.detach().copy_(flat.view(param.shape))
    return param
