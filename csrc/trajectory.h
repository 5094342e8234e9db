// Declarations of the trajectory kernels (docs/architecture.md): registered in csrc/ops.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace landscape_kernels {
#define LK_DECLARE_TRAJECTORY_OPS                                                                   \
  void trajectory_cov_update(at::Tensor& M2, at::Tensor& mean, int64_t count, const at::Tensor& X); \
  std::tuple<at::Tensor, at::Tensor> trajectory_project(const at::Tensor& X, const at::Tensor& mean,  \
                                                        const at::Tensor& basis);
namespace cpu {
LK_DECLARE_TRAJECTORY_OPS
}
namespace cuda {
LK_DECLARE_TRAJECTORY_OPS
}
#undef LK_DECLARE_TRAJECTORY_OPS
}  // namespace landscape_kernels
