// CUDA kernels of zqat_peft (built by zqat_peft.kernels.cuda_ext; pybind11 binding in zqat_kernels_bind.cpp).
//
//   (a) add_scaled_noise_cuda          p' = p + float32(scale) * z(seed, key, i)    (in or out of place)
//   (b) perturbed_fake_quant_weight_cuda
//                                      fake-quantized (w + scale * z), per group, without materialising z or w'
//   (c) fake_quant_activation_cuda     per-token (per-group) asymmetric activation fake quantization
//   (d) dequant_packed_cuda            GPTQ-packed codes -> W^T rows [row_begin, row_end) in bf16/fp16/fp32
//                                      (a workspace for torch.matmul / cuBLAS)
//       gemv_packed_cuda               batch-1 y = x W^T + b straight from the packed codes
//
// Exactness. The noise is "zqat-noise-v1" (zqat_peft/noise.py): uint32 arithmetic, logical shifts, and
// float32 operations written as __fmul_rn / __fadd_rn, which round separately (never contracted into an
// FMA; the file is also built with --fmad=false). (a) is bit-identical to the PyTorch definition on any
// device. (b), (c), (d) mirror the float32 operations of zqat_peft/quant/primitives.py as torch runs them
// on CUDA (IEEE division for tensor / tensor, multiplication by the float32 reciprocal for tensor / Python
// scalar -- that is what torch's CUDA div does -- rintf for torch.round, 1 / (1 + expf(-x)) for
// torch.sigmoid), so they are meant to match torch's CUDA results bit for bit on finite inputs; torch on
// CPU divides by scalars exactly, so CPU and CUDA torch may themselves differ by an ulp in a scale. The
// GEMV accumulates in float32 in its own order: close to, not bit-equal to, cuBLAS.
//
// These kernels are deliberately simple (a warp per quantization group, a thread per packed column).
// Notes marked "Faster:" say what an optimised version would change.
//
// STATUS: run and tested on an NVIDIA H100 (tests/test_kernels.py).

// Only ATen's Tensor and the CUDA headers: no c10/cuda headers here (CPU builds of torch ship them
// incomplete), so this file compiles against any torch. The binding (zqat_kernels_bind.cpp, built only
// with a CUDA torch) sets the device and passes torch's current stream to the entry points below.
#include "zqat_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <type_traits>

namespace zqat {
namespace {

// ----------------------------------------------------------------------------------------------- noise

constexpr uint32_t kC1 = 0x7feb352du;
constexpr uint32_t kC2 = 0x846ca68bu;
constexpr uint32_t kBit31 = 0x80000000u;
constexpr int32_t kCenter = 131070;             // E[S] = 4 * 65535 / 2
constexpr float kNoiseScale = 0x1.bb67aep-16f;  // float32(1 / sqrt(1431655765)), bits 0x37ddb3d7
constexpr int64_t kMaxIndex = int64_t(1) << 31;
constexpr float kMinScale = 1e-8f;              // primitives._MIN_SCALE as torch casts it to float32

// lowbias32; unsigned arithmetic wraps mod 2**32 and >> on uint32_t is a logical shift.
__host__ __device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kC1;
  x ^= x >> 15;
  x *= kC2;
  x ^= x >> 16;
  return x;
}

// k = mix32(mix32(seed mod 2**32) ^ (key mod 2**32)), computed on the host once per launch.
uint32_t stream_key(int64_t seed, int64_t key) {
  return mix32(mix32(static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(key));
}

// z of flat element i of stream k: Irwin-Hall(4) from the four 16-bit halves of two hashes.
__device__ __forceinline__ float zo_noise(uint32_t k, uint32_t i) {
  const uint32_t h1 = mix32(k ^ mix32(i));
  const uint32_t h2 = mix32(k ^ mix32(i | kBit31));
  const int32_t s = static_cast<int32_t>((h1 & 0xFFFFu) + (h1 >> 16) + (h2 & 0xFFFFu) + (h2 >> 16));
  // |s - 131070| < 2**24: the conversion is exact, the multiply is the only rounding.
  return __fmul_rn(__int2float_rn(s - kCenter), kNoiseScale);
}

// ----------------------------------------------------------------------------------------- dtype glue

template <typename T>
struct Num;
template <>
struct Num<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Num<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }  // RNE, like torch
};
template <>
struct Num<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};

// p' = dtype(float32(p) + t); float64 params add in float64.
template <typename T>
__device__ __forceinline__ T add_t(T p, float t) {
  return Num<T>::store(__fadd_rn(Num<T>::load(p), t));
}
template <>
__device__ __forceinline__ double add_t<double>(double p, float t) {
  return __dadd_rn(p, static_cast<double>(t));
}

// torch's NaN-propagating clamp / maximum, on float32.
__device__ __forceinline__ float clamp_min_nan(float v, float lo) { return (v != v || v >= lo) ? v : lo; }
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) {
  return v != v ? v : fminf(fmaxf(v, lo), hi);
}
__device__ __forceinline__ float maximum_nan(float a, float b) {
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

// torch.sigmoid on CUDA for float32: 1 / (1 + exp(-x)) with the accurate expf.
__device__ __forceinline__ float sigmoid_f(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x))); }

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

constexpr int kThreads = 256;  // threads per block for the element-wise and per-warp kernels
constexpr int kWarpsPerBlock = kThreads / 32;

int blocks_for(int64_t work, int per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<int>(b < 1 ? 1 : (b > (int64_t(1) << 30) ? (int64_t(1) << 30) : b));
}

// ------------------------------------------------------------------- (a) scaled noise, in or out of place

// dst[i] = src[i] + float32(s * z(k, offset + i)). src may equal dst (no __restrict__): each element is
// read by the thread that writes it. Grid-stride loop.
// The tail and unaligned tensors take this kernel; the bulk takes the 16-byte one below.
template <typename T>
__global__ void add_scaled_noise_kernel(const T* src, T* dst, int64_t n, uint32_t k, float s, uint32_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float t = __fmul_rn(s, zo_noise(k, offset + static_cast<uint32_t>(i)));
    dst[i] = add_t(src[i], t);
  }
}

// The same for 16-byte-aligned src and dst: a thread loads and stores kVec = 16 / sizeof(T) consecutive
// elements at once (the update streams every master weight through here, so it is bandwidth-bound).
template <typename T>
__global__ void add_scaled_noise_vec_kernel(const T* src, T* dst, int64_t n_vec, uint32_t k, float s, uint32_t offset) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec; v += stride) {
    union { uint4 bits; T e[kVec]; } in, res;
    in.bits = reinterpret_cast<const uint4*>(src)[v];
    const uint32_t first = offset + static_cast<uint32_t>(v * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) res.e[j] = add_t(in.e[j], __fmul_rn(s, zo_noise(k, first + j)));
    reinterpret_cast<uint4*>(dst)[v] = res.bits;
  }
}

template <typename T>
void launch_add_scaled_noise(const T* src, T* dst, int64_t n, uint32_t k, float s, uint32_t offset,
                             cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  const int64_t n_vec = aligned ? n / kVec : 0;
  if (n_vec > 0) {
    add_scaled_noise_vec_kernel<T><<<blocks_for(n_vec, kThreads), kThreads, 0, stream>>>(src, dst, n_vec, k, s, offset);
  }
  const int64_t done = n_vec * kVec;
  if (done < n) {
    add_scaled_noise_kernel<T><<<blocks_for(n - done, kThreads * 4), kThreads, 0, stream>>>(
        src + done, dst + done, n - done, k, s, offset + static_cast<uint32_t>(done));
  }
}

// ------------------------------------------------- (b) fused perturbation + group-wise weight fake quant

struct WeightQuantParams {
  int64_t rows, cols;   // master weight [rows = out_features, cols = in_features], row-major, contiguous
  int64_t group;        // input columns per group (divides cols)
  int64_t n_groups;     // cols / group
  float qmax;           // 2**bits - 1
  float inv_range;      // float32(1 / qmax) (asymmetric) or float32(1 / (2**(bits-1) - 1)) (symmetric)
  float sym_zero;       // 2**(bits-1)
  bool symmetric;
  bool perturb;         // false: scale == 0, plain fake quantization of w
  uint32_t k;           // stream key
  float s;              // float32(scale)
};

// w' of flat element idx, rounded to the master's dtype (as add_scaled_noise would store it), as float32.
template <typename TW>
__device__ __forceinline__ float perturbed_value(const TW* w, int64_t idx, const WeightQuantParams& p) {
  TW v = w[idx];
  if (p.perturb) v = add_t(v, __fmul_rn(p.s, zo_noise(p.k, static_cast<uint32_t>(idx))));
  return Num<TW>::load(v);
}

// Scale and zero of one group from the min/max of its w' (the range always includes 0), in float32 and in
// this order:
//   wmin = min(min_g w', 0) * sigmoid(clip_lower), wmax = max(max_g w', 0) * sigmoid(clip_upper)
//   asymmetric: scale = max((wmax - wmin) * inv_range, 1e-8), zero = clamp(round(-wmin / scale), 0, qmax)
//   symmetric:  scale = max(max(-wmin, wmax) * inv_range, 1e-8), zero = 2**(bits-1)
__device__ __forceinline__ void group_qparams(float lo, float hi, int64_t qi, const float* __restrict__ clip_lower,
                                              const float* __restrict__ clip_upper, const WeightQuantParams& p,
                                              float& scale, float& zero) {
  float wmin = warp_min(lo), wmax = warp_max(hi);
  if (clip_lower != nullptr) wmin = __fmul_rn(wmin, sigmoid_f(clip_lower[qi]));
  if (clip_upper != nullptr) wmax = __fmul_rn(wmax, sigmoid_f(clip_upper[qi]));
  if (p.symmetric) {
    scale = clamp_min_nan(__fmul_rn(maximum_nan(-wmin, wmax), p.inv_range), kMinScale);
    zero = p.sym_zero;
  } else {
    scale = clamp_min_nan(__fmul_rn(__fsub_rn(wmax, wmin), p.inv_range), kMinScale);
    zero = clamp_nan(rintf(__fdiv_rn(-wmin, scale)), 0.0f, p.qmax);
  }
}

// dequant(quant(w')) = dtype((clamp(round(w' / scale) + zero, 0, qmax) - zero) * scale). The + 0.0f turns a
// code of -0 into +0, as the uint8 codes of quantize_weight do (the activation path below keeps float codes,
// as fake_quantize_activation does).
__device__ __forceinline__ float fake_quant_value(float v, float scale, float zero, float qmax) {
  const float code = __fadd_rn(clamp_nan(__fadd_rn(rintf(__fdiv_rn(v, scale)), zero), 0.0f, qmax), 0.0f);
  return __fmul_rn(__fsub_rn(code, zero), scale);
}

// One warp per (row, group), kPerLane = group / 32 values per lane (group 32, 64, 128 or 256): each lane reads
// its w' once (coalesced across the warp, the noise hashed once) and keeps them in registers between the
// min/max reduction and the write.
template <typename TW, typename TO, int kPerLane>
__global__ void perturbed_fake_quant_weight_kernel(const TW* __restrict__ w, TO* __restrict__ out,
                                                   const float* __restrict__ clip_lower,
                                                   const float* __restrict__ clip_upper, WeightQuantParams p) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= p.rows * p.n_groups) return;  // the whole warp leaves together
  const int64_t base = warp * (32 * kPerLane);  // groups tile each row, so group `warp` starts here
  float v[kPerLane];
  float lo = 0.0f, hi = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    v[j] = perturbed_value(w, base + lane + 32 * j, p);
    lo = fminf(lo, v[j]);
    hi = fmaxf(hi, v[j]);
  }
  float scale, zero;
  group_qparams(lo, hi, warp, clip_lower, clip_upper, p, scale, zero);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    out[base + lane + 32 * j] = Num<TO>::store(fake_quant_value(v[j], scale, zero, p.qmax));
  }
}

// Any other group size (per-channel included): one warp per (row, group), lanes striding over its columns;
// pass 2 recomputes w' (hashing again is cheaper than holding a long group in shared memory).
template <typename TW, typename TO>
__global__ void perturbed_fake_quant_weight_strided_kernel(const TW* __restrict__ w, TO* __restrict__ out,
                                                           const float* __restrict__ clip_lower,
                                                           const float* __restrict__ clip_upper,
                                                           WeightQuantParams p) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= p.rows * p.n_groups) return;
  const int64_t base = warp * p.group;
  float lo = 0.0f, hi = 0.0f;
  for (int64_t c = lane; c < p.group; c += 32) {
    const float v = perturbed_value(w, base + c, p);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  float scale, zero;
  group_qparams(lo, hi, warp, clip_lower, clip_upper, p, scale, zero);
  for (int64_t c = lane; c < p.group; c += 32) {
    out[base + c] = Num<TO>::store(fake_quant_value(perturbed_value(w, base + c, p), scale, zero, p.qmax));
  }
}

// ------------------------------------------------------------- (c) per-token activation fake quant

// x viewed as [tokens, D] (contiguous), groups of `group` channels along D (group == D: per token).
// One warp per (token, group):
//   xmin = min(min x, 0), xmax = max(max x, 0), scale = max((xmax - xmin) * float32(1/qmax), 1e-8)
//   zero = round(-xmin / scale), code = clamp(round(x / scale) + zero, 0, qmax), out = dtype((code - zero) * scale)
// Faster: fuse into the consumer GEMM's prologue (quantize the A tile on load), or emit int8 codes plus
// per-token scales for an int8 tensor-core GEMM instead of writing the fake-quantized tensor back.
template <typename T>
__global__ void fake_quant_activation_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n_rows,
                                             int64_t group, float qmax, float inv_qmax) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= n_rows) return;
  const int64_t base = warp * group;  // rows of `group` elements, one per (token, group)
  float lo = 0.0f, hi = 0.0f;
  for (int64_t c = lane; c < group; c += 32) {
    const float v = Num<T>::load(x[base + c]);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  const float xmin = warp_min(lo), xmax = warp_max(hi);
  const float scale = clamp_min_nan(__fmul_rn(__fsub_rn(xmax, xmin), inv_qmax), kMinScale);
  const float zero = rintf(__fdiv_rn(-xmin, scale));
  for (int64_t c = lane; c < group; c += 32) {
    const float v = Num<T>::load(x[base + c]);
    const float code = clamp_nan(__fadd_rn(rintf(__fdiv_rn(v, scale)), zero), 0.0f, qmax);
    out[base + c] = Num<T>::store(__fmul_rn(__fsub_rn(code, zero), scale));
  }
}

// ------------------------------------------------------------------------ (d) GPTQ-packed weights

// Packed layout (zqat_peft/quant/packing.py): qweight is int32 [ceil(in / 32) * BITS, out]. Input rows
// come in chunks of 32; chunk c of column o is a little-endian bitstream of 32 * BITS bits in the BITS
// words qweight[c * BITS + w, o], w = 0 .. BITS-1: row j of the chunk is stream bits [j * BITS, (j+1) * BITS).
// 3-bit values 10 and 21 straddle two words. scales: float32 [out, n_groups]; zeros: uint8 [out, n_groups]
// (integer zero points); group = in / n_groups input rows per group. W[o, i] = (code - zero) * scale.

// Code of row j (0..31) of a chunk whose BITS words are in w[]; j is a compile-time constant after
// unrolling, so this is a shift and a mask (and an or for the two straddling 3-bit values).
template <int BITS>
__device__ __forceinline__ uint32_t chunk_code(const uint32_t (&w)[BITS], int j) {
  const int start = j * BITS;
  const int word = start >> 5;
  const int off = start & 31;
  uint32_t v = w[word] >> off;
  if (off + BITS > 32) v |= w[word + 1] << (32 - off);
  return v & ((1u << BITS) - 1u);
}

template <int BITS>
__device__ __forceinline__ void load_chunk(const uint32_t* __restrict__ qweight, int64_t c, int64_t o,
                                           int64_t out_features, uint32_t (&w)[BITS]) {
#pragma unroll
  for (int b = 0; b < BITS; ++b) w[b] = __ldg(qweight + (c * BITS + b) * out_features + o);
}

// scale and zero of input row i of column o, for rows visited in increasing order: one division when a
// chunk starts, then a reload only when i crosses into the next group (once per chunk, or never, when the
// group size is a multiple of 32).
struct GroupCursor {
  __device__ GroupCursor(const float* __restrict__ scales_, const uint8_t* __restrict__ zeros_, int64_t o,
                         int64_t n_groups, int64_t group_, int64_t first_row)
      : scales(scales_ + o * n_groups), zeros(zeros_ + o * n_groups), group(group_) {
    g = first_row / group;
    next = (g + 1) * group;
    load();
  }
  __device__ __forceinline__ void advance_to(int64_t i) {
    while (i >= next) {  // at most once per row: rows advance by one
      ++g;
      next += group;
      load();
    }
  }
  __device__ __forceinline__ void load() {
    scale = scales[g];
    zero = static_cast<float>(zeros[g]);
  }
  const float* __restrict__ scales;
  const uint8_t* __restrict__ zeros;
  int64_t group, g, next;
  float scale, zero;
};

// Workspace dequantization: out[i - row_begin, o] = (code[i, o] - zero[o, g(i)]) * scale[o, g(i)] for
// input rows i in [row_begin, row_end), i.e. rows of W^T, so that y = x[:, row_begin:row_end] @ out is
// a plain (cuBLAS) matmul and tiles of K can be accumulated. row_begin is a multiple of 32.
// Thread (o, chunk): consecutive threads take consecutive output columns, so the qweight reads and the
// workspace writes are coalesced; the scale/zero reads ([out, n_groups], stride n_groups along o) are not.
// Faster: scales/zeros transposed to [n_groups, out] (coalesced), 4 columns per thread with 128-bit
// loads, and no workspace at all: a fused dequant-GEMM (Marlin / exllama style: codes reshuffled
// offline for tensor-core fragments, LOP3-based int4 -> bf16 conversion, cp.async pipelining).
template <int BITS, typename TO>
__global__ void dequant_packed_kernel(const uint32_t* __restrict__ qweight, const float* __restrict__ scales,
                                      const uint8_t* __restrict__ zeros, TO* __restrict__ out,
                                      int64_t out_features, int64_t group, int64_t n_groups, int64_t row_begin,
                                      int64_t row_end) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = row_begin / 32 + blockIdx.y;  // packed chunk
  if (o >= out_features) return;
  uint32_t w[BITS];
  load_chunk<BITS>(qweight, c, o, out_features, w);
  GroupCursor q(scales, zeros, o, n_groups, group, c * 32);
#pragma unroll
  for (int j = 0; j < 32; ++j) {  // fully unrolled (a guard, not a break), so w[] stays in registers
    const int64_t i = c * 32 + j;
    if (i < row_end) {
      q.advance_to(i);
      const float code = static_cast<float>(chunk_code<BITS>(w, j));
      out[(i - row_begin) * out_features + o] = Num<TO>::store(__fmul_rn(__fsub_rn(code, q.zero), q.scale));
    }
  }
}

// Batch-1 GEMV straight from the codes: y[o] = sum_i x[i] * T(W[o, i]) + b[o], float32 accumulation.
// W[o, i] is rounded to x's dtype first, as the workspace path (dequant to T, then matmul) does.
// Block = kGemvCols x kGemvSplit threads: kGemvCols output columns (coalesced qweight reads), the K
// chunks of a tile split over kGemvSplit thread rows, x staged tile by tile in shared memory, and the
// kGemvSplit partial sums reduced through shared memory at the end.
// Faster: several columns and a 128-bit load per thread, x in registers via warp shuffles, scales and
// zeros transposed for coalescing, split-K across blocks for narrow layers (out < #SMs * kGemvCols),
// and a dp4a/int8 path when activations are quantized too.
constexpr int kGemvCols = 64;
constexpr int kGemvSplit = 4;
constexpr int kGemvTileChunks = 32;  // 1024 input rows of x per shared-memory tile (4 KiB)

template <int BITS, typename T>
__global__ void __launch_bounds__(kGemvCols* kGemvSplit)
    gemv_packed_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, const float* __restrict__ scales,
                       const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
                       int64_t in_features, int64_t out_features, int64_t group, int64_t n_groups) {
  __shared__ float xs[kGemvTileChunks * 32];
  __shared__ float partial[kGemvSplit][kGemvCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kGemvCols + tx;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kGemvCols + tx;
  const int64_t n_chunks = (in_features + 31) / 32;
  float acc = 0.0f;
  for (int64_t tile = 0; tile < n_chunks; tile += kGemvTileChunks) {
    const int64_t row0 = tile * 32;
    __syncthreads();  // the previous tile is consumed
    for (int t = tid; t < kGemvTileChunks * 32; t += kGemvCols * kGemvSplit) {
      const int64_t i = row0 + t;
      xs[t] = i < in_features ? Num<T>::load(x[i]) : 0.0f;
    }
    __syncthreads();
    if (o < out_features) {
      const int64_t tile_end = min(tile + kGemvTileChunks, n_chunks);
      for (int64_t c = tile + ty; c < tile_end; c += kGemvSplit) {
        uint32_t w[BITS];
        load_chunk<BITS>(qweight, c, o, out_features, w);
        GroupCursor q(scales, zeros, o, n_groups, group, c * 32);
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          const int64_t i = c * 32 + j;
          if (i < in_features) {  // x beyond in_features is 0 in xs, but the codes must not be read as rows
            q.advance_to(i);
            const float code = static_cast<float>(chunk_code<BITS>(w, j));
            const float wv = Num<T>::load(Num<T>::store(__fmul_rn(__fsub_rn(code, q.zero), q.scale)));
            acc = __fmaf_rn(xs[i - row0], wv, acc);  // a dot product: an explicit FMA is fine here
          }
        }
      }
    }
  }
  partial[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && o < out_features) {
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kGemvSplit; ++r) sum += partial[r][tx];
    if (bias != nullptr) sum += Num<T>::load(bias[o]);
    y[o] = Num<T>::store(sum);
  }
}

// ------------------------------------------------------------------------------------ host helpers

void check_cuda(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

// Calls f(T{}) with T the CUDA element type of a float32 / bfloat16 / float16 tensor.
template <typename F>
void dispatch_half_types(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", st, " (float32, bfloat16, float16)");
  }
}

template <typename F>
void dispatch_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8, got ", bits);
  }
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "zqat CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                  int64_t in_features) {
  check_cuda(qweight, "qweight");
  check_cuda(scales, "scales");
  check_cuda(zeros, "zeros");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2, "qweight must be int32 [in*bits/32, out]");
  TORCH_CHECK(qweight.size(0) == (in_features + 31) / 32 * bits, "qweight has ", qweight.size(0),
              " rows, expected ", (in_features + 31) / 32 * bits, " for in_features=", in_features, ", bits=", bits);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kByte,
              "scales must be float32 and zeros uint8");
  TORCH_CHECK(scales.dim() == 2 && scales.sizes() == zeros.sizes() && scales.size(0) == qweight.size(1),
              "scales and zeros must be [out_features, n_groups]");
  TORCH_CHECK(in_features % scales.size(1) == 0, "n_groups must divide in_features");
}

}  // namespace

// ------------------------------------------------------------------------------ entry points

void add_scaled_noise_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t seed, int64_t key, double scale,
                           int64_t offset, cudaStream_t stream) {
  check_cuda(src, "src");
  check_cuda(dst, "dst");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type() && src.numel() == dst.numel() && src.device() == dst.device(),
              "src and dst must have the same dtype, size and device");
  const int64_t n = src.numel();
  TORCH_CHECK(offset >= 0 && offset + n <= kMaxIndex, "noise indices must lie in [0, 2**31)");
  if (n == 0) return;
  if (scale == 0.0) {
    if (!dst.is_same(src)) dst.copy_(src);
    return;
  }
  const uint32_t k = stream_key(seed, key);
  const float s = static_cast<float>(scale);
  const uint32_t off = static_cast<uint32_t>(offset);
  if (src.scalar_type() == at::kDouble) {
    launch_add_scaled_noise<double>(ptr<const double>(src), ptr<double>(dst), n, k, s, off, stream);
  } else {
    dispatch_half_types(src.scalar_type(), "add_scaled_noise_cuda", [&](auto tag) {
      using T = decltype(tag);
      launch_add_scaled_noise<T>(ptr<const T>(src), ptr<T>(dst), n, k, s, off, stream);
    });
  }
  check_launch();
}

// out = fake_quantize_weight(add_scaled_noise(weight, seed, key, scale), bits, group_size, symmetric,
//                            clip_lower, clip_upper), written into `out` ([out, in], float32/bf16/fp16).
void perturbed_fake_quant_weight_cuda(const at::Tensor& weight, const at::Tensor& out, int64_t seed, int64_t key,
                                      double scale, const std::optional<at::Tensor>& clip_lower,
                                      const std::optional<at::Tensor>& clip_upper, int64_t bits, int64_t group_size,
                                      bool symmetric, cudaStream_t stream) {
  check_cuda(weight, "weight");
  check_cuda(out, "out");
  TORCH_CHECK(weight.dim() == 2 && out.sizes() == weight.sizes() && out.device() == weight.device(),
              "weight must be [out, in] and out of the same shape and device");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const int64_t group = group_size == -1 ? cols : group_size;
  TORCH_CHECK(group > 0 && cols % group == 0, "group_size must be -1 or divide in_features");
  TORCH_CHECK(weight.numel() <= kMaxIndex, "noise indices must lie in [0, 2**31)");
  WeightQuantParams p;
  p.rows = rows;
  p.cols = cols;
  p.group = group;
  p.n_groups = cols / group;
  p.qmax = static_cast<float>((1 << bits) - 1);
  const float range = symmetric ? static_cast<float>((1 << (bits - 1)) - 1) : p.qmax;
  p.inv_range = 1.0f / range;  // torch's CUDA tensor / scalar multiplies by this float32 reciprocal
  p.sym_zero = static_cast<float>(1 << (bits - 1));
  p.symmetric = symmetric;
  p.perturb = scale != 0.0;
  p.k = stream_key(seed, key);
  p.s = static_cast<float>(scale);
  const float* lo = nullptr;
  const float* hi = nullptr;
  for (int side = 0; side < 2; ++side) {
    const auto& clip = side == 0 ? clip_lower : clip_upper;
    if (!clip.has_value()) continue;
    check_cuda(*clip, "clip logits");
    TORCH_CHECK(clip->scalar_type() == at::kFloat && clip->dim() == 2 && clip->size(0) == rows &&
                    clip->size(1) == p.n_groups,
                "clip logits must be float32 [out, n_groups]");
    (side == 0 ? lo : hi) = ptr<const float>(*clip);
  }
  if (rows * cols == 0) return;
  const int blocks = blocks_for(rows * p.n_groups, kWarpsPerBlock);
  dispatch_half_types(weight.scalar_type(), "perturbed_fake_quant_weight_cuda (weight)", [&](auto wtag) {
    using TW = decltype(wtag);
    dispatch_half_types(out.scalar_type(), "perturbed_fake_quant_weight_cuda (out)", [&](auto otag) {
      using TO = decltype(otag);
      const TW* src = ptr<const TW>(weight);
      TO* dst = ptr<TO>(out);
      auto in_registers = [&](auto per_lane) {
        perturbed_fake_quant_weight_kernel<TW, TO, decltype(per_lane)::value>
            <<<blocks, kThreads, 0, stream>>>(src, dst, lo, hi, p);
      };
      switch (group) {
        case 32: in_registers(std::integral_constant<int, 1>{}); break;
        case 64: in_registers(std::integral_constant<int, 2>{}); break;
        case 128: in_registers(std::integral_constant<int, 4>{}); break;
        case 256: in_registers(std::integral_constant<int, 8>{}); break;
        default:
          perturbed_fake_quant_weight_strided_kernel<TW, TO><<<blocks, kThreads, 0, stream>>>(src, dst, lo, hi, p);
      }
    });
  });
  check_launch();
}

// out = fake_quantize_activation(x, bits, group_size) for a contiguous x [..., D].
void fake_quant_activation_cuda(const at::Tensor& x, const at::Tensor& out, int64_t bits, int64_t group_size,
                                cudaStream_t stream) {
  check_cuda(x, "x");
  check_cuda(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && x.dim() >= 1,
              "out must have x's shape and dtype");
  TORCH_CHECK(bits >= 2 && bits <= 8, "activation bits must be in [2, 8] (16 = off is handled by the caller)");
  const int64_t d = x.size(-1);
  const int64_t group = group_size == -1 ? d : group_size;
  TORCH_CHECK(group > 0 && d % group == 0, "group_size must be -1 or divide the last dimension");
  const int64_t n_rows = x.numel() / group;
  if (n_rows == 0) return;
  const float qmax = static_cast<float>((1 << bits) - 1);
  dispatch_half_types(x.scalar_type(), "fake_quant_activation_cuda", [&](auto tag) {
    using T = decltype(tag);
    fake_quant_activation_kernel<T><<<blocks_for(n_rows, kWarpsPerBlock), kThreads, 0, stream>>>(
        ptr<const T>(x), ptr<T>(out), n_rows, group, qmax, 1.0f / qmax);
  });
  check_launch();
}

// out [row_end - row_begin, out_features] (float32/bf16/fp16) <- rows [row_begin, row_end) of W^T, with
// row_end = row_begin + out.size(0) <= in_features and row_begin a multiple of 32.
void dequant_packed_cuda(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                         const at::Tensor& out, int64_t bits, int64_t in_features, int64_t row_begin,
                         cudaStream_t stream) {
  check_packed(qweight, scales, zeros, bits, in_features);
  check_cuda(out, "out");
  const int64_t out_features = qweight.size(1);
  const int64_t row_end = row_begin + out.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(1) == out_features, "out must be [rows, out_features]");
  TORCH_CHECK(row_begin >= 0 && row_begin % 32 == 0 && row_end <= in_features,
              "row_begin must be a multiple of 32 and row_end <= in_features");
  if (row_end == row_begin || out_features == 0) return;
  const int64_t n_groups = scales.size(1);
  const int64_t group = in_features / n_groups;
  const int64_t chunks = (row_end - row_begin + 31) / 32;
  TORCH_CHECK(chunks <= 65535, "at most 65535 chunks (2M input rows) per call");
  const dim3 grid(blocks_for(out_features, kThreads), static_cast<unsigned>(chunks));
  dispatch_bits(bits, [&](auto b) {
    constexpr int BITS = decltype(b)::value;
    dispatch_half_types(out.scalar_type(), "dequant_packed_cuda", [&](auto tag) {
      using TO = decltype(tag);
      dequant_packed_kernel<BITS, TO><<<grid, kThreads, 0, stream>>>(
          ptr<const uint32_t>(qweight), ptr<const float>(scales), ptr<const uint8_t>(zeros), ptr<TO>(out),
          out_features, group, n_groups, row_begin, row_end);
    });
  });
  check_launch();
}

// y [out_features] <- x [in_features] @ W^T + bias, all of x's dtype (float32/bf16/fp16).
void gemv_packed_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, const std::optional<at::Tensor>& bias, const at::Tensor& y, int64_t bits,
                      int64_t in_features, cudaStream_t stream) {
  check_packed(qweight, scales, zeros, bits, in_features);
  check_cuda(x, "x");
  check_cuda(y, "y");
  const int64_t out_features = qweight.size(1);
  TORCH_CHECK(x.numel() == in_features && y.numel() == out_features && y.scalar_type() == x.scalar_type(),
              "x must hold in_features and y out_features elements of x's dtype");
  if (bias.has_value()) {
    check_cuda(*bias, "bias");
    TORCH_CHECK(bias->numel() == out_features && bias->scalar_type() == x.scalar_type(), "bias: [out_features], x's dtype");
  }
  if (out_features == 0) return;
  const int64_t n_groups = scales.size(1);
  const int64_t group = in_features / n_groups;
  const dim3 block(kGemvCols, kGemvSplit);
  const dim3 grid(blocks_for(out_features, kGemvCols));
  dispatch_bits(bits, [&](auto b) {
    constexpr int BITS = decltype(b)::value;
    dispatch_half_types(x.scalar_type(), "gemv_packed_cuda", [&](auto tag) {
      using T = decltype(tag);
      gemv_packed_kernel<BITS, T><<<grid, block, 0, stream>>>(
          ptr<const T>(x), ptr<const uint32_t>(qweight), ptr<const float>(scales), ptr<const uint8_t>(zeros),
          bias.has_value() ? ptr<const T>(*bias) : nullptr, ptr<T>(y), in_features, out_features, group, n_groups);
    });
  });
  check_launch();
}

}  // namespace zqat
