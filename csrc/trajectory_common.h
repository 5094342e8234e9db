// Device-independent part of the trajectory kernels (docs/architecture.md), compiled once per device.
//
// trajectory_cov_update(M2, mean, count, X): merge a chunk X (T, N) of snapshots into the running float64
//   statistics of `count` earlier snapshots (Chan et al.'s parallel update):
//     m_c = mean of X,  d = m_c - mean,  n = count + T
//     M2 += (X - m_c)^T (X - m_c) + (count T / n) d d^T,   mean += (T / n) d
//   The rank-one correction rides along as one extra row of the centred chunk, so the whole update is a
//   single symmetric rank-(T+1) product; only the block upper triangle is multiplied (half the flops of
//   a full GEMM) and each off-diagonal block is mirrored.
// trajectory_project(X, mean, basis): for each snapshot x, c = x - mean, proj = basis c (k values) and
//   the norm of the residual c - basis^T proj, formed explicitly (not as sqrt(|c|^2 - |proj|^2), which
//   cancels when the basis captures nearly all of c). Rows of X are processed in tiles so the float64
//   temporaries stay bounded.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace landscape_kernels {
namespace detail {

constexpr int64_t kTrajectoryTileBudget = int64_t(1) << 21;  // float64 elements per temporary (16 MiB)
constexpr int64_t kSyrkBlock = 512;                           // columns per block of the triangular product

inline void check_snapshots(const at::Tensor& X, const char* op) {
  TORCH_CHECK_VALUE(X.dim() == 2, op, ": X (snapshots) must have shape (T, N), got shape ", X.sizes());
  TORCH_CHECK_VALUE(X.size(0) > 0 && X.size(1) > 0, op, ": X must have at least one snapshot and one parameter, got shape ",
              X.sizes());
  TORCH_CHECK_TYPE(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble, op,
              ": X must be float32 or float64, got ", X.scalar_type());
}

inline void check_float64_on(const at::Tensor& t, const at::Tensor& X, const char* name, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == X.device(), op, ": ", name, " must be on X's device ", X.device(), ", got ", t.device());
}

inline void trajectory_cov_update(at::Tensor& M2, at::Tensor& mean, int64_t count, const at::Tensor& X) {
  const char* op = "trajectory_cov_update";
  check_snapshots(X, op);
  const int64_t T = X.size(0), N = X.size(1);
  TORCH_CHECK_VALUE(M2.dim() == 2 && M2.size(0) == N && M2.size(1) == N, op, ": M2 must have shape (N, N) = (", N, ", ",
              N, "), got shape ", M2.sizes());
  TORCH_CHECK_VALUE(mean.dim() == 1 && mean.size(0) == N, op, ": mean must have shape (N,) = (", N, ",), got shape ",
              mean.sizes());
  check_float64_on(M2, X, "M2", op);
  check_float64_on(mean, X, "mean", op);
  TORCH_CHECK_VALUE(M2.is_contiguous() && mean.is_contiguous(), op, ": M2 and mean must be contiguous (they are updated in place)");
  TORCH_CHECK_VALUE(count >= 0, op, ": count (snapshots merged so far) must be >= 0, got ", count);
  TORCH_CHECK_VALUE(count <= (int64_t(1) << 53) - X.size(0), op, ": count + T = ", count, " + ", X.size(0),
                    " exceeds 2^53, where float64 weights of the merge stop being exact (and int64 sums overflow near 2^63)");

  const at::Tensor chunk_mean = X.to(at::kDouble).mean(0);
  const double n = double(count + T);
  const at::Tensor d = at::sub(chunk_mean, mean);
  // (T + 1, N): the centred chunk and the scaled mean shift as its last row.
  const at::Tensor shift_row = at::mul(d, std::sqrt(double(count) * double(T) / n)).unsqueeze(0);
  const at::Tensor rows = at::cat(at::TensorList{at::sub(X, chunk_mean), shift_row}, 0);
  for (int64_t i0 = 0; i0 < N; i0 += kSyrkBlock) {
    const int64_t ni = std::min(kSyrkBlock, N - i0);
    const at::Tensor left = rows.narrow(1, i0, ni).t();
    for (int64_t j0 = i0; j0 < N; j0 += kSyrkBlock) {
      const int64_t nj = std::min(kSyrkBlock, N - j0);
      at::Tensor block = M2.narrow(0, i0, ni).narrow(1, j0, nj);
      at::Tensor product = at::mm(left, rows.narrow(1, j0, nj));
      if (j0 == i0) {
        // BLAS may sum the (a, b) and (b, a) entries in different orders: average them, so M2 stays
        // exactly symmetric.
        block.add_(product.add(product.t()), 0.5);
      } else {
        block.add_(product);
        M2.narrow(0, j0, nj).narrow(1, i0, ni).copy_(block.t());
      }
    }
  }
  mean.add_(d, double(T) / n);
}

inline std::tuple<at::Tensor, at::Tensor> trajectory_project(const at::Tensor& X, const at::Tensor& mean,
                                                             const at::Tensor& basis) {
  const char* op = "trajectory_project";
  check_snapshots(X, op);
  const int64_t T = X.size(0), N = X.size(1);
  TORCH_CHECK_VALUE(mean.dim() == 1 && mean.size(0) == N, op, ": mean must have shape (N,) = (", N, ",), got shape ",
              mean.sizes());
  TORCH_CHECK_VALUE(basis.dim() == 2 && basis.size(1) == N, op, ": basis must have shape (k, N) with N = ", N,
              ", got shape ", basis.sizes());
  check_float64_on(mean, X, "mean", op);
  check_float64_on(basis, X, "basis", op);
  const int64_t k = basis.size(0);
  at::Tensor proj = at::empty({T, k}, X.options().dtype(at::kDouble));
  at::Tensor residual = at::empty({T}, X.options().dtype(at::kDouble));
  const at::Tensor basis_t = basis.t();
  const int64_t rows = std::max<int64_t>(16, kTrajectoryTileBudget / N);
  for (int64_t r0 = 0; r0 < T; r0 += rows) {
    const int64_t nr = std::min(rows, T - r0);
    at::Tensor centred = at::sub(X.narrow(0, r0, nr), mean);  // float64
    at::Tensor p = proj.narrow(0, r0, nr);
    if (k > 0) {
      at::mm_out(p, centred, basis_t);
      centred.sub_(at::mm(p, basis));
    }
    residual.narrow(0, r0, nr).copy_(centred.mul_(centred).sum(1).sqrt_());
  }
  return std::make_tuple(proj, residual);
}

}  // namespace detail
}  // namespace landscape_kernels
