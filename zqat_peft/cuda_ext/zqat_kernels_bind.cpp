// pybind11 binding of the CUDA kernels in zqat_kernels.cu (built by zqat_peft.kernels.cuda_ext, with a
// CUDA build of torch only). Each wrapper makes the first tensor's device current, takes torch's current
// stream on it, releases the GIL and calls the launcher; nothing synchronises.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include "zqat_kernels.h"

namespace {

// The current device set to t's, and torch's current stream on it, for the duration of a call.
struct OnDevice {
  explicit OnDevice(const at::Tensor& t) : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream(t.get_device())) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
};

void add_scaled_noise(const at::Tensor& src, const at::Tensor& dst, int64_t seed, int64_t key, double scale,
                      int64_t offset) {
  TORCH_CHECK(src.is_cuda(), "add_scaled_noise (CUDA kernel): src must be a CUDA tensor");
  OnDevice on(src);
  zqat::add_scaled_noise_cuda(src, dst, seed, key, scale, offset, on.stream);
}

void perturbed_fake_quant_weight(const at::Tensor& weight, const at::Tensor& out, int64_t seed, int64_t key,
                                 double scale, const std::optional<at::Tensor>& clip_lower,
                                 const std::optional<at::Tensor>& clip_upper, int64_t bits, int64_t group_size,
                                 bool symmetric) {
  TORCH_CHECK(weight.is_cuda(), "perturbed_fake_quant_weight: weight must be a CUDA tensor");
  OnDevice on(weight);
  zqat::perturbed_fake_quant_weight_cuda(weight, out, seed, key, scale, clip_lower, clip_upper, bits, group_size,
                                         symmetric, on.stream);
}

void fake_quant_activation(const at::Tensor& x, const at::Tensor& out, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.is_cuda(), "fake_quant_activation: x must be a CUDA tensor");
  OnDevice on(x);
  zqat::fake_quant_activation_cuda(x, out, bits, group_size, on.stream);
}

void dequant_packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                    const at::Tensor& out, int64_t bits, int64_t in_features, int64_t row_begin) {
  TORCH_CHECK(qweight.is_cuda(), "dequant_packed: qweight must be a CUDA tensor");
  OnDevice on(qweight);
  zqat::dequant_packed_cuda(qweight, scales, zeros, out, bits, in_features, row_begin, on.stream);
}

void gemv_packed(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                 const std::optional<at::Tensor>& bias, const at::Tensor& y, int64_t bits, int64_t in_features) {
  TORCH_CHECK(x.is_cuda(), "gemv_packed: x must be a CUDA tensor");
  OnDevice on(x);
  zqat::gemv_packed_cuda(x, qweight, scales, zeros, bias, y, bits, in_features, on.stream);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zqat_peft CUDA kernels: ZO noise, fused perturb + fake quantization, packed-weight matmul helpers";
  m.attr("NOISE_VERSION") = "zqat-noise-v1";
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("add_scaled_noise", &add_scaled_noise, "dst <- src + float32(scale) * z(seed, key); dst may be src",
        arg("src"), arg("dst"), arg("seed"), arg("key"), arg("scale"), arg("offset") = 0, nogil);
  m.def("perturbed_fake_quant_weight", &perturbed_fake_quant_weight,
        "out <- fake_quantize_weight(weight + float32(scale) * z(seed, key)); scale 0: plain fake quantization",
        arg("weight"), arg("out"), arg("seed"), arg("key"), arg("scale"), arg("clip_lower"), arg("clip_upper"),
        arg("bits"), arg("group_size"), arg("symmetric"), nogil);
  m.def("fake_quant_activation", &fake_quant_activation, "out <- per-token asymmetric fake quantization of x",
        arg("x"), arg("out"), arg("bits"), arg("group_size") = -1, nogil);
  m.def("dequant_packed", &dequant_packed, "out <- rows [row_begin, row_begin + out.size(0)) of W^T from packed codes",
        arg("qweight"), arg("scales"), arg("zeros"), arg("out"), arg("bits"), arg("in_features"),
        arg("row_begin") = 0, nogil);
  m.def("gemv_packed", &gemv_packed, "y <- x @ W^T + bias from packed codes (batch 1)", arg("x"), arg("qweight"),
        arg("scales"), arg("zeros"), arg("bias"), arg("y"), arg("bits"), arg("in_features"), nogil);
}
