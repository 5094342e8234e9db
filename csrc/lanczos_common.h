// Device-independent part of lanczos_reorth: full reorthogonalisation of the new Lanczos vectors of C
// chains against the first j vectors of each chain's basis, classical Gram-Schmidt applied twice:
//   H1 = Q W^T;  W1 = W - H1^T Q;  H2 = Q W1^T;  W2 = W1 - H2^T Q;  norms = ||W2 rows||.
// Q is (C, m, P) with m >= j, W is (C, b, P). The middle two steps are one pass over Q when the device's
// Kernels::update_and_project fuses them (each tile of Q updates W and projects the update at once).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace landscape_kernels {
namespace detail {

inline void check_reorth(const at::Tensor& Q, const at::Tensor& W, int64_t j) {
  const char* op = "lanczos_reorth";
  TORCH_CHECK_VALUE(Q.dim() == 3, op, ": Q (bases) must have shape (C, m, P), got shape ", Q.sizes());
  TORCH_CHECK_VALUE(W.dim() == 3, op, ": W (new vectors) must have shape (C, b, P), got shape ", W.sizes());
  TORCH_CHECK_VALUE(Q.size(0) == W.size(0) && Q.size(2) == W.size(2), op,
              ": Q (C, m, P) and W (C, b, P) must agree in C and P, got Q ", Q.sizes(), " and W ", W.sizes());
  TORCH_CHECK_VALUE(W.size(0) > 0 && W.size(1) > 0 && W.size(2) > 0, op, ": W must be non-empty, got shape ", W.sizes());
  TORCH_CHECK_VALUE(j >= 0 && j <= Q.size(1), op, ": j (basis vectors in use) must be in [0, m] = [0, ", Q.size(1),
              "], got ", j);
  TORCH_CHECK_TYPE(Q.scalar_type() == at::kFloat || Q.scalar_type() == at::kDouble, op,
              ": Q must be float32 or float64, got ", Q.scalar_type());
  TORCH_CHECK_TYPE(W.scalar_type() == Q.scalar_type(), op, ": W must have Q's dtype ", Q.scalar_type(), ", got ",
              W.scalar_type());
  TORCH_CHECK_VALUE(W.device() == Q.device(), op, ": W must be on Q's device ", Q.device(), ", got ", W.device());
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> lanczos_reorth(const at::Tensor& Q, const at::Tensor& W, int64_t j) {
  check_reorth(Q, W, j);
  at::Tensor w = W.contiguous().clone();
  if (j > 0) {
    // The first j vectors of each chain as a view: with C > 1 they are not contiguous (each chain's
    // unused rows sit between them), but rows are, which is all bmm and the tile kernel need. Copying
    // them would cost a full pass over the bases per call.
    at::Tensor q = Q.narrow(1, 0, j);  // (C, j, P)
    if (q.stride(2) != 1 || q.stride(1) != q.size(2)) q = q.contiguous();
    const at::Tensor h1 = at::bmm(q, w.transpose(1, 2));   // (C, j, b)
    const at::Tensor h2 = Kernels::update_and_project(q, w, h1);  // w -= h1^T q; returns q w^T
    w.baddbmm_(h2.transpose(1, 2), q, 1.0, -1.0);
  }
  return std::make_tuple(w, w.mul(w).sum(2).sqrt_());
}

}  // namespace detail
}  // namespace landscape_kernels
