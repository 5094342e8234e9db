// CUDA version of lanczos_reorth (docs/architecture.md). The basis products are GEMM-shaped (C batches of
// (j x P)(P x b)) and go through cuBLAS on the current stream; the update and the projection are two
// calls here (the CPU kernel fuses them over tiles).
#include "../lanczos.h"
#include "../lanczos_common.h"

#include <c10/cuda/CUDAGuard.h>

namespace landscape_kernels {
namespace {

struct CudaReorthKernels {
  static at::Tensor update_and_project(const at::Tensor& q, at::Tensor& w, const at::Tensor& h1) {
    w.baddbmm_(h1.transpose(1, 2), q, 1.0, -1.0);
    return at::bmm(q, w.transpose(1, 2));
  }
};

}  // namespace

namespace cuda {
std::tuple<at::Tensor, at::Tensor> lanczos_reorth(const at::Tensor& Q, const at::Tensor& W, int64_t j) {
  const c10::cuda::CUDAGuard guard(Q.device());
  return detail::lanczos_reorth<CudaReorthKernels>(Q, W, j);
}
}  // namespace cuda
}  // namespace landscape_kernels
