// Declarations of the loss-profile kernel (Feng & Tu 2021): registered in csrc/ops.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace landscape_kernels {
#define LK_DECLARE_PROFILE_OPS                                                                                \
  at::Tensor profile_ce_losses(const at::Tensor& z0, const at::Tensor& zd, const at::Tensor& direction,     \
                               const at::Tensor& offset, const at::Tensor& weight,                          \
                               const c10::optional<at::Tensor>& bias, const at::Tensor& target);
namespace cpu {
LK_DECLARE_PROFILE_OPS
}
namespace cuda {
LK_DECLARE_PROFILE_OPS
}
#undef LK_DECLARE_PROFILE_OPS
}  // namespace landscape_kernels
