// CPU kernel of the packed linear layer: y = x @ W^T + bias for a weight held as GPTQ-packed codes
// (zqat_peft/quant/packing.py), without ever holding more than one tile of W in floating point.
//
//   qweight  int32 [ceil(K / 32) * bits, N]   codes packed along K (the input dimension), 32 rows per chunk,
//                                             one little-endian bitstream of 32 * bits bits per chunk
//   scales   float32 [N, G], zeros uint8 [N, G]   group g covers input columns [g * K / G, (g + 1) * K / G)
//   W[n, k] = (float32(code) - float32(zero)) * scale       (exactly dequantize_weight's float32 operations)
//
// The output columns are cut into tiles of `tile_n`; at::parallel_for hands whole tiles to threads. A thread
// decodes its tile of W^T ([K, tile_n], in x's dtype, rounded once from float32 like dequantize_weight(...,
// dtype)) into a buffer of its own and multiplies x by it with at::addmm_out / at::mm_out, which write
// straight into the tile's columns of y. Inside the parallel region that GEMM runs on the calling thread
// (MKL and oneDNN do not nest), so the threads never wait on each other. The codes are read once per call.
//
// Decoding runs along N: a packed row holds one bit slice of 32 input rows for every output column, so a
// row of W^T is one pass over one or two packed rows with a fixed shift, which g++ -O3 vectorises.
// The scales and zeros are transposed to [G, N] float32 first (N * G elements, small), so that the decode
// reads them along N too. A tile's result equals F.linear(x, dequantize_packed(...)) up to the GEMM's
// summation order: the decoded weights are the same bits.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ZQAT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ZQAT_CLONES
#endif

namespace {

constexpr int64_t kRowsPerChunk = 32;
constexpr int64_t kWordBits = 32;

// float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7fc0: c10::BFloat16(float)'s rule, branch-free.
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// The codes of one input row k for output columns [0, n) of a tile: bits [offset, offset + bits) of the
// words `lo` (and, for a 3-bit value that straddles two words, the low `spill` bits of `hi`).
ZQAT_CLONES void decode_row_f32(const int32_t* lo, const int32_t* hi, int offset, int bits, int spill,
                                const float* zero, const float* scale, int64_t n, float* out) {
  const uint32_t mask = (1u << bits) - 1u;
  if (spill > 0) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t v = ((static_cast<uint32_t>(lo[j]) >> offset) | (static_cast<uint32_t>(hi[j]) << (bits - spill))) & mask;
      out[j] = (static_cast<float>(v) - zero[j]) * scale[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t v = (static_cast<uint32_t>(lo[j]) >> offset) & mask;
      out[j] = (static_cast<float>(v) - zero[j]) * scale[j];
    }
  }
}

ZQAT_CLONES void round_row_bf16(const float* row, int64_t n, uint16_t* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = f32_to_bf16_bits(row[j]);
}

// W^T rows [0, K), columns [n0, n0 + n) into `wt` ([K, n], contiguous, float32 or bfloat16).
// scales_t, zeros_t: float32 [G, N].
void decode_tile(const at::Tensor& qweight, const at::Tensor& scales_t, const at::Tensor& zeros_t, int64_t bits,
                 int64_t in_features, int64_t n0, int64_t n, at::Tensor& wt) {
  const int64_t N = qweight.size(1);
  const int64_t group = in_features / scales_t.size(0);
  const int32_t* q = qweight.const_data_ptr<int32_t>();
  const float* st = scales_t.const_data_ptr<float>();
  const float* zt = zeros_t.const_data_ptr<float>();
  const bool bf16 = wt.scalar_type() == at::kBFloat16;
  std::vector<float> row(bf16 ? n : 0);  // a bfloat16 row is decoded in float32, then rounded once
  for (int64_t k = 0; k < in_features; ++k) {
    const int64_t chunk = k / kRowsPerChunk, start = (k % kRowsPerChunk) * bits;
    const int64_t word = start / kWordBits;
    const int offset = static_cast<int>(start % kWordBits);
    const int spill = static_cast<int>(offset + bits - kWordBits);
    const int32_t* lo = q + (chunk * bits + word) * N + n0;
    const int32_t* hi = spill > 0 ? lo + N : lo;
    const int64_t g = k / group;
    const float* zero = zt + g * N + n0;
    const float* scale = st + g * N + n0;
    float* out = bf16 ? row.data() : wt.mutable_data_ptr<float>() + k * n;
    decode_row_f32(lo, hi, offset, static_cast<int>(bits), spill, zero, scale, n, out);
    if (bf16) round_row_bf16(out, n, reinterpret_cast<uint16_t*>(wt.mutable_data_ptr<at::BFloat16>()) + k * n);
  }
}

}  // namespace

// y [M, N] <- x [M, K] @ W^T + bias, W decoded tile by tile (tile_n output columns at a time).
// x: contiguous float32 or bfloat16 [M, K]; bias: [N] in x's dtype or None. Arguments are checked in
// Python (zqat_peft.kernels) before the call and again here.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                         int64_t in_features, int64_t tile_n) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.is_contiguous(), "packed_linear: x must be [M, in_features]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "packed_linear: x must be float32 or bfloat16");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "packed_linear: bits must be 2, 3, 4 or 8");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(0) == (in_features + kRowsPerChunk - 1) / kRowsPerChunk * bits,
              "packed_linear: qweight must be contiguous int32 [ceil(in_features / 32) * bits, out_features]");
  const int64_t N = qweight.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && zeros.sizes() == scales.sizes() &&
                  scales.size(1) > 0 && in_features % scales.size(1) == 0,
              "packed_linear: scales and zeros must be [out_features, n_groups] with n_groups dividing in_features");
  TORCH_CHECK(tile_n > 0, "packed_linear: tile_n must be positive");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type(),
                "packed_linear: bias must be [out_features] in x's dtype");
  }
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor scales_t = scales.to(at::kFloat).t().contiguous();  // [G, N]
  const at::Tensor zeros_t = zeros.to(at::kFloat).t().contiguous();
  const int64_t n_tiles = (N + tile_n - 1) / tile_n;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({in_features * tile_n}, x.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * tile_n, n = std::min(tile_n, N - n0);
      at::Tensor wt = buffer.narrow(0, 0, in_features * n).view({in_features, n});
      decode_tile(qweight, scales_t, zeros_t, bits, in_features, n0, n, wt);
      at::Tensor out = y.narrow(1, n0, n);  // row stride N: the GEMM writes in place
      if (bias.has_value()) {
        at::addmm_out(out, bias->narrow(0, n0, n), x, wt);
      } else {
        at::mm_out(out, x, wt);
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zqat_peft packed linear layer on CPU: x @ W^T + bias from GPTQ-packed codes, tile by tile";
  m.def("packed_linear", &packed_linear, "y <- x @ W^T + bias, W decoded from packed codes one tile at a time",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("bits"),
        py::arg("in_features"), py::arg("tile_n"), py::call_guard<py::gil_scoped_release>());
}
