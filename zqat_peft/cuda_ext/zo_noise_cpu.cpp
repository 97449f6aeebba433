// CPU kernel of the counter-based ZO noise "zqat-noise-v1" (see zqat_peft/noise.py for the
// definition and its test vectors). Bit-identical to the PyTorch implementation there.
//
//   mix32(x):  x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16   (uint32)
//   k  = mix32(mix32(seed) ^ key)
//   h1 = mix32(k ^ mix32(i)),  h2 = mix32(k ^ mix32(i | 0x80000000))        i = flat element index
//   S  = lo16(h1) + hi16(h1) + lo16(h2) + hi16(h2)
//   z  = float32(S - 131070) * C,  C = 0x37ddb3d7 (float32 bits)
//   t  = float32(s * z)  with s = float32(scale)          -- rounded on its own ...
//   p' = dtype(float32(p) + t)   (float64 params: float64(p) + float64(t))   -- ... never an FMA
//
// Build flags matter: -ffp-contract=off keeps g++ from fusing `s * z` and `p + t` into an FMA (the
// loader passes it; the `#pragma STDC FP_CONTRACT OFF` below is ignored by g++). The hash is a plain
// loop of uint32 operations over a block of elements, which g++ -O3 vectorises (vpmulld & co.).
// Since the extension is built once and cached, it is not compiled with -march=native (the cache
// may be shared by machines with different CPUs); instead, on x86-64 Linux with g++, the block
// functions are compiled for AVX-512, AVX2 and baseline SSE2 (target_clones) and the best one is
// picked at load time. Elsewhere they are compiled once for the baseline target.
//
// Parallelism: at::parallel_for over blocks (OpenMP in the usual torch builds: the loader compiles
// with -fopenmp so that the pragma inside ATen's parallel_for is live).

// Only the headers it needs (not <torch/extension.h>): a third of the build time.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#pragma STDC FP_CONTRACT OFF

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ZQAT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ZQAT_CLONES
#endif

#if defined(__GNUC__)
#define ZQAT_INLINE inline __attribute__((always_inline))
#else
#define ZQAT_INLINE inline
#endif

namespace {

constexpr uint32_t kC1 = 0x7feb352du;
constexpr uint32_t kC2 = 0x846ca68bu;
constexpr uint32_t kBit31 = 0x80000000u;
constexpr int32_t kCenter = 131070;          // E[S] = 4 * 65535 / 2
constexpr float kNoiseScale = 0x1.bb67aep-16f;  // float32(1 / sqrt(1431655765)), bits 0x37ddb3d7
constexpr int64_t kMaxIndex = int64_t(1) << 31;

// Elements per inner block: the z of a block lives in a stack buffer (1 KiB, in L1) between the
// hash loop and the add loop.
constexpr int64_t kBlock = 256;
// Minimum elements per parallel task (~20-40 us of work); smaller tensors run on the calling thread.
constexpr int64_t kGrain = int64_t(1) << 15;

ZQAT_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kC1;
  x ^= x >> 15;
  x *= kC2;
  x ^= x >> 16;
  return x;
}

uint32_t stream_key(int64_t seed, int64_t key) {
  // Conversions of int64 to uint32 are taken mod 2**32, as the definition reduces seed and key.
  return mix32(mix32(static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(key));
}

// z of elements start .. start + n - 1 of stream k into z[0 .. n-1]. A straight loop of uint32
// operations, one element per iteration, so that the compiler vectorises it.
ZQAT_INLINE void noise_block(uint32_t k, uint32_t start, int64_t n, float* __restrict z) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t i = start + static_cast<uint32_t>(j);
    const uint32_t h1 = mix32(k ^ mix32(i));
    const uint32_t h2 = mix32(k ^ mix32(i | kBit31));
    // 0 <= S <= 4 * 65535 < 2**31: the int32 arithmetic is exact, so is its float32 conversion.
    const int32_t s = static_cast<int32_t>((h1 & 0xFFFFu) + (h1 >> 16) + (h2 & 0xFFFFu) + (h2 >> 16));
    z[j] = static_cast<float>(s - kCenter) * kNoiseScale;
  }
}

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7fc0. The same rule as
// c10::BFloat16(float) (which torch's casts use), written branch-free so that it vectorises.
ZQAT_INLINE uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
}

ZQAT_INLINE float bf16_bits_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One block of dst = src + float32(s * z), per parameter dtype. `src` and `dst` may be the same
// pointer (in place), so they are not __restrict; each element is read before it is written.

ZQAT_CLONES void block_f32(const float* src, float* dst, int64_t n, uint32_t k, uint32_t start, float s) {
  alignas(64) float z[kBlock];
  noise_block(k, start, n, z);
  for (int64_t j = 0; j < n; ++j) {
    const float t = s * z[j];  // its own rounding (no FMA: -ffp-contract=off)
    dst[j] = src[j] + t;
  }
}

ZQAT_CLONES void block_f64(const double* src, double* dst, int64_t n, uint32_t k, uint32_t start, float s) {
  alignas(64) float z[kBlock];
  noise_block(k, start, n, z);
  for (int64_t j = 0; j < n; ++j) {
    const float t = s * z[j];
    dst[j] = src[j] + static_cast<double>(t);
  }
}

ZQAT_CLONES void block_bf16(const uint16_t* src, uint16_t* dst, int64_t n, uint32_t k, uint32_t start, float s) {
  alignas(64) float z[kBlock];
  noise_block(k, start, n, z);
  for (int64_t j = 0; j < n; ++j) {
    const float t = s * z[j];
    dst[j] = f32_to_bf16_bits(bf16_bits_to_f32(src[j]) + t);
  }
}

ZQAT_CLONES void block_f16(const c10::Half* src, c10::Half* dst, int64_t n, uint32_t k, uint32_t start, float s) {
  alignas(64) float z[kBlock];
  noise_block(k, start, n, z);
  for (int64_t j = 0; j < n; ++j) {
    const float t = s * z[j];
    // c10::Half's conversions are IEEE round-to-nearest-even, as in torch's own casts.
    dst[j] = c10::Half(static_cast<float>(src[j]) + t);
  }
}

ZQAT_CLONES void block_fill(float* out, int64_t n, uint32_t k, uint32_t start) {
  noise_block(k, start, n, out);
}

template <typename T, typename Fn>
void run_blocks(const T* src, T* dst, int64_t numel, uint32_t k, int64_t offset, float s, Fn fn) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; p += kBlock) {
      const int64_t n = std::min(kBlock, end - p);
      fn(src + p, dst + p, n, k, static_cast<uint32_t>(offset + p), s);
    }
  });
}

void check_range(int64_t offset, int64_t numel) {
  TORCH_CHECK(offset >= 0 && offset + numel <= kMaxIndex,
              "noise element indices must lie in [0, 2**31): got offset=", offset, ", numel=", numel);
}

}  // namespace

// dst <- src + float32(scale) * z(seed, key, offset + flat index). src and dst: contiguous CPU tensors
// of the same floating dtype (float32, bfloat16, float16, float64) and size; dst may be src.
// A scale of exactly 0 copies src (the definition leaves p unchanged).
void add_scaled_noise(const at::Tensor& src, const at::Tensor& dst, int64_t seed, int64_t key, double scale,
                      int64_t offset) {
  TORCH_CHECK(src.device().is_cpu() && dst.device().is_cpu(), "add_scaled_noise (CPU kernel): tensors must be on CPU");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "add_scaled_noise: src is ", src.scalar_type(),
              " but dst is ", dst.scalar_type());
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous(), "add_scaled_noise: src and dst must be contiguous");
  TORCH_CHECK(src.numel() == dst.numel(), "add_scaled_noise: src has ", src.numel(), " elements, dst ", dst.numel());
  const int64_t numel = src.numel();
  check_range(offset, numel);
  if (numel == 0) return;
  if (scale == 0.0) {
    if (!dst.is_same(src)) dst.copy_(src);
    return;
  }
  const float s = static_cast<float>(scale);  // round to nearest even, like the Python side
  const uint32_t k = stream_key(seed, key);
  switch (src.scalar_type()) {
    case at::kFloat:
      run_blocks(src.const_data_ptr<float>(), dst.mutable_data_ptr<float>(), numel, k, offset, s, block_f32);
      break;
    case at::kDouble:
      run_blocks(src.const_data_ptr<double>(), dst.mutable_data_ptr<double>(), numel, k, offset, s, block_f64);
      break;
    case at::kBFloat16:
      run_blocks(reinterpret_cast<const uint16_t*>(src.const_data_ptr<at::BFloat16>()),
                 reinterpret_cast<uint16_t*>(dst.mutable_data_ptr<at::BFloat16>()), numel, k, offset, s,
                 block_bf16);
      break;
    case at::kHalf:
      run_blocks(src.const_data_ptr<c10::Half>(), dst.mutable_data_ptr<c10::Half>(), numel, k, offset, s, block_f16);
      break;
    default:
      TORCH_CHECK(false, "add_scaled_noise: unsupported dtype ", src.scalar_type(),
                  " (float32, bfloat16, float16, float64)");
  }
}

// out <- z(seed, key, offset + flat index), float32 (the definition's z itself; for tests and tools).
void fill_noise(const at::Tensor& out, int64_t seed, int64_t key, int64_t offset) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "fill_noise: out must be a contiguous float32 CPU tensor");
  const int64_t numel = out.numel();
  check_range(offset, numel);
  if (numel == 0) return;
  const uint32_t k = stream_key(seed, key);
  float* p = out.mutable_data_ptr<float>();
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; q += kBlock) {
      block_fill(p + q, std::min(kBlock, end - q), k, static_cast<uint32_t>(offset + q));
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zqat-noise-v1 on CPU: scaled counter-based ZO noise, bit-identical to zqat_peft.noise";
  m.attr("NOISE_VERSION") = "zqat-noise-v1";
  m.def("add_scaled_noise", &add_scaled_noise, "dst <- src + float32(scale) * z(seed, key); dst may be src",
        py::arg("src"), py::arg("dst"), py::arg("seed"), py::arg("key"), py::arg("scale"), py::arg("offset") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("fill_noise", &fill_noise, "out <- z(seed, key, offset + i), float32", py::arg("out"), py::arg("seed"),
        py::arg("key"), py::arg("offset") = 0, py::call_guard<py::gil_scoped_release>());
}
