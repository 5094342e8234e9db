// Declarations of the per-sample gradient statistics kernels (docs/architecture.md).
// Registered with the dispatcher in csrc/ops.cpp; implemented per device in csrc/cpu and csrc/cuda.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace landscape_kernels {

#define LK_DECLARE_PERSAMPLE_OPS(NS)                                                      \
  namespace NS {                                                                         \
  at::Tensor per_sample_sq_norms(const at::Tensor& A, const at::Tensor& D);              \
  at::Tensor per_sample_gram(const at::Tensor& A, const at::Tensor& D);                  \
  std::tuple<at::Tensor, at::Tensor> per_sample_moments(const at::Tensor& A,             \
                                                        const at::Tensor& D);            \
  at::Tensor per_sample_project(const at::Tensor& A, const at::Tensor& D,                \
                                const at::Tensor& V);                                    \
  at::Tensor per_sample_cov_matvec(const at::Tensor& A, const at::Tensor& D,             \
                                   const at::Tensor& V);                                 \
  at::Tensor per_sample_weighted_sum(const at::Tensor& A, const at::Tensor& D,           \
                                     const at::Tensor& W);                               \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> per_sample_stats(           \
      const at::Tensor& A, const at::Tensor& D);                                         \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> per_sample_stats_about(     \
      const at::Tensor& A, const at::Tensor& D, const at::Tensor& M);                    \
  }

LK_DECLARE_PERSAMPLE_OPS(cpu)
LK_DECLARE_PERSAMPLE_OPS(cuda)

#undef LK_DECLARE_PERSAMPLE_OPS

}  // namespace landscape_kernels
