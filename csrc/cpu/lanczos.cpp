// CPU kernel of lanczos_reorth (docs/architecture.md): the first Gram-Schmidt sweep's update and the second
// sweep's projections fused in one pass over tiles of the basis, so each tile of Q is read once for
// both (from cache the second time) instead of twice from memory.
#include "../lanczos.h"
#include "../lanczos_common.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace landscape_kernels {
namespace {

constexpr int64_t kTile = 1024;  // elements of P per task: j tile rows of Q stay in L2

struct CpuReorthKernels {
  // w -= h1^T q (in place) and return h2 = q w^T, for q (C, j, P) with contiguous rows (any chain
  // stride), w (C, b, P) contiguous, h1 (C, j, b).
  static at::Tensor update_and_project(const at::Tensor& q, at::Tensor& w, const at::Tensor& h1_) {
    const int64_t C = q.size(0), j = q.size(1), P = q.size(2), b = w.size(1), chain_stride = q.stride(0);
    const int64_t tiles = (P + kTile - 1) / kTile;
    const at::Tensor h1 = h1_.contiguous();
    // One float64 partial of h2 per tile, summed in tile order afterwards (deterministic).
    at::Tensor partial = at::zeros({C, tiles, j, b}, q.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "lanczos_reorth_cpu", [&] {
      const scalar_t* qp = q.data_ptr<scalar_t>();
      const scalar_t* hp = h1.data_ptr<scalar_t>();
      scalar_t* wp = w.data_ptr<scalar_t>();
      double* pp = partial.data_ptr<double>();
      at::parallel_for(0, C * tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c = task / tiles, t = task % tiles, p0 = t * kTile, n = std::min(kTile, P - p0);
          const scalar_t* qc = qp + c * chain_stride + p0;
          scalar_t* wc = wp + c * b * P + p0;
          for (int64_t v = 0; v < b; ++v)
            for (int64_t i = 0; i < j; ++i) sub_scaled_any(wc + v * P, hp[(c * j + i) * b + v], qc + i * P, n);
          double* out = pp + (c * tiles + t) * j * b;
          for (int64_t i = 0; i < j; ++i)
            for (int64_t v = 0; v < b; ++v) out[i * b + v] = double(dot_any(qc + i * P, wc + v * P, n));
        }
      });
    });
    return partial.sum(1).to(q.scalar_type());
  }
};

}  // namespace

namespace cpu {
std::tuple<at::Tensor, at::Tensor> lanczos_reorth(const at::Tensor& Q, const at::Tensor& W, int64_t j) {
  return detail::lanczos_reorth<CpuReorthKernels>(Q, W, j);
}
}  // namespace cpu
}  // namespace landscape_kernels
