// Declarations of the Lanczos kernels (docs/architecture.md): registered in csrc/ops.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace landscape_kernels {
namespace cpu {
std::tuple<at::Tensor, at::Tensor> lanczos_reorth(const at::Tensor& Q, const at::Tensor& W, int64_t j);
}
namespace cuda {
std::tuple<at::Tensor, at::Tensor> lanczos_reorth(const at::Tensor& Q, const at::Tensor& W, int64_t j);
}
}  // namespace landscape_kernels
