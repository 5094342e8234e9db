// CPU registration of the trajectory kernels (docs/architecture.md); the work is GEMM-shaped and goes through
// ATen's BLAS, see trajectory_common.h.
#include "../trajectory.h"
#include "../trajectory_common.h"

namespace landscape_kernels {
namespace cpu {
void trajectory_cov_update(at::Tensor& M2, at::Tensor& mean, int64_t count, const at::Tensor& X) {
  detail::trajectory_cov_update(M2, mean, count, X);
}
std::tuple<at::Tensor, at::Tensor> trajectory_project(const at::Tensor& X, const at::Tensor& mean,
                                                      const at::Tensor& basis) {
  return detail::trajectory_project(X, mean, basis);
}
}  // namespace cpu
}  // namespace landscape_kernels
