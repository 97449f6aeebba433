// Entry points of zqat_kernels.cu (see there for what each computes). Every function checks its
// arguments, launches on `stream` on the current device and returns without synchronising; the caller
// (zqat_kernels_bind.cpp) makes the tensors' device current and passes torch's current stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>

namespace zqat {

// dst <- src + float32(scale) * z(seed, key, offset + i); float32/bfloat16/float16/float64; dst may be src.
void add_scaled_noise_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t seed, int64_t key, double scale,
                           int64_t offset, cudaStream_t stream);

// out <- fake_quantize_weight(add_scaled_noise(weight, seed, key, scale), bits, group_size, symmetric,
//                             clip_lower, clip_upper); weight and out [out_features, in_features].
void perturbed_fake_quant_weight_cuda(const at::Tensor& weight, const at::Tensor& out, int64_t seed, int64_t key,
                                      double scale, const std::optional<at::Tensor>& clip_lower,
                                      const std::optional<at::Tensor>& clip_upper, int64_t bits, int64_t group_size,
                                      bool symmetric, cudaStream_t stream);

// out <- fake_quantize_activation(x, bits, group_size), per token along the last dimension.
void fake_quant_activation_cuda(const at::Tensor& x, const at::Tensor& out, int64_t bits, int64_t group_size,
                                cudaStream_t stream);

// out [rows, out_features] <- rows [row_begin, row_begin + rows) of W^T dequantized from GPTQ-packed codes.
void dequant_packed_cuda(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                         const at::Tensor& out, int64_t bits, int64_t in_features, int64_t row_begin,
                         cudaStream_t stream);

// y [out_features] <- x [in_features] @ W^T + bias, straight from the packed codes (batch 1).
void gemv_packed_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, const std::optional<at::Tensor>& bias, const at::Tensor& y, int64_t bits,
                      int64_t in_features, cudaStream_t stream);

}  // namespace zqat
