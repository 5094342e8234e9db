// CUDA registration of the trajectory kernels (docs/architecture.md): the same plan as on the CPU, with the
// products on cuBLAS through ATen, on the current stream of X's device.
#include "../trajectory.h"
#include "../trajectory_common.h"

#include <c10/cuda/CUDAGuard.h>

namespace landscape_kernels {
namespace cuda {
void trajectory_cov_update(at::Tensor& M2, at::Tensor& mean, int64_t count, const at::Tensor& X) {
  const c10::cuda::CUDAGuard guard(X.device());
  detail::trajectory_cov_update(M2, mean, count, X);
}
std::tuple<at::Tensor, at::Tensor> trajectory_project(const at::Tensor& X, const at::Tensor& mean,
                                                      const at::Tensor& basis) {
  const c10::cuda::CUDAGuard guard(X.device());
  return detail::trajectory_project(X, mean, basis);
}
}  // namespace cuda
}  // namespace landscape_kernels
