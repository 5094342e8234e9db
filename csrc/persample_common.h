// Device-independent orchestration of the per-sample gradient statistics (docs/architecture.md).
//
// A layer's per-sample gradient is G_b = sum_t D[b,t]^T A[b,t]  (out x in). Nothing here ever holds
// the B x out x in tensor: the GEMM-shaped parts go through ATen (BLAS / cuBLAS), the memory-bound
// parts through two fused kernels that each device provides as a `Kernels` policy:
//
//   Kernels::centred_sq_sum(X (R, n), d (R, m) or undefined, M (m, n), scale) -> (m, n), X's dtype
//       S[o, j] = scale * sum_r (v[r, o, j] - vbar[o, j])^2 with v = d[r, o] * X[r, j] - M[o, j]
//       (d undefined means d == 1, m == 1): the squared deviations about M, corrected by the summed
//       deviations (the corrected two-pass algorithm, Chan, Golub & LeVeque 1983), so that the rounding
//       of a mean M in X's dtype does not bias the result (identical rows give 0, not (eps M)^2);
//       accumulated in float64 and rounded once at the end; with mean_out (optional last argument) also
//       the mean of the rows about M, M + sum_r (v[r] - M) / R, from the same totals
//   Kernels::batched_dot(U (R, K, J), X (R, J), T) -> (R / T, K)
//       out[b, k] = sum_{t < T} sum_j U[b*T + t, k, j] * X[b*T + t, j]
//
// Only ATen headers are included so that each kernel file compiles quickly.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace landscape_kernels {
namespace detail {

// Upper bound, in elements, on any temporary the plans below create (16 MiB of float32).
constexpr int64_t kTileBudget = int64_t(1) << 22;

// sum_r (v_r - vbar)^2 from the totals sum_r v_r^2 and sum_r v_r of R deviations (never below zero).
inline double corrected_sq_sum(double sq_total, double dev_total, int64_t R) {
  return std::max(0.0, sq_total - dev_total * dev_total / double(R));
}

struct Layout {
  int64_t B, T, in, out;
};

inline Layout check_pair(const at::Tensor& A, const at::Tensor& D, const char* op) {
  TORCH_CHECK_VALUE(A.defined() && D.defined(), op, ": A and D must be tensors");
  TORCH_CHECK_VALUE(A.dim() == 2 || A.dim() == 3, op,
              ": A (layer inputs) must have shape (B, in) or (B, T, in), got shape ", A.sizes());
  TORCH_CHECK_VALUE(D.dim() == A.dim(), op, ": D (output gradients) must have the same rank as A (",
              A.dim(), "-D, shape (B", A.dim() == 3 ? ", T" : "", ", out)), got shape ", D.sizes());
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, op,
              ": A must be float32 or float64, got ", A.scalar_type());
  TORCH_CHECK_TYPE(D.scalar_type() == A.scalar_type(), op, ": D must have A's dtype ", A.scalar_type(),
              ", got ", D.scalar_type());
  TORCH_CHECK_VALUE(D.device() == A.device(), op, ": D must be on A's device ", A.device(), ", got ",
              D.device());
  TORCH_CHECK_VALUE(A.size(0) == D.size(0), op, ": A and D must have the same batch size, got A ",
              A.sizes(), " and D ", D.sizes());
  TORCH_CHECK_VALUE(A.size(0) > 0, op, ": empty batch (B = 0): per-sample statistics need at least one sample");
  Layout L;
  L.B = A.size(0);
  L.T = A.dim() == 3 ? A.size(1) : 1;
  if (A.dim() == 3) {
    TORCH_CHECK_VALUE(D.size(1) == A.size(1), op, ": A and D must have the same number of positions T, got A ",
                A.sizes(), " and D ", D.sizes());
    TORCH_CHECK_VALUE(L.T > 0, op, ": T = 0 positions: nothing to sum over");
  }
  L.in = A.size(-1);
  L.out = D.size(-1);
  TORCH_CHECK_VALUE(L.in > 0 && L.out > 0, op, ": A and D need a non-empty last dimension, got A ", A.sizes(),
              " and D ", D.sizes());
  return L;
}

inline void check_directions(const at::Tensor& V, const at::Tensor& A, const Layout& L, const char* op) {
  TORCH_CHECK_VALUE(V.defined(), op, ": V must be a tensor");
  TORCH_CHECK_VALUE(V.dim() == 3 && V.size(1) == L.out && V.size(2) == L.in, op,
              ": V (directions) must have shape (K, out, in) = (K, ", L.out, ", ", L.in, "), got shape ",
              V.sizes());
  TORCH_CHECK_VALUE(V.size(0) > 0, op, ": V holds no directions (K = 0)");
  TORCH_CHECK_TYPE(V.scalar_type() == A.scalar_type(), op, ": V must have A's dtype ", A.scalar_type(),
              ", got ", V.scalar_type());
  TORCH_CHECK_VALUE(V.device() == A.device(), op, ": V must be on A's device ", A.device(), ", got ", V.device());
}

// Rows of the flattened (B*T, features) views.
inline at::Tensor flat(const at::Tensor& X, const Layout& L) {
  return X.reshape({L.B * L.T, X.size(-1)}).contiguous();
}

// Visit (out x in) tiles small enough that a (B, ot, it) block of per-sample gradients fits the budget.
template <class F>
void for_each_gradient_tile(const Layout& L, F&& fn) {
  const int64_t it = std::max<int64_t>(1, std::min(L.in, kTileBudget / L.B));
  const int64_t ot = std::max<int64_t>(1, std::min(L.out, kTileBudget / (L.B * it)));
  for (int64_t o0 = 0; o0 < L.out; o0 += ot)
    for (int64_t i0 = 0; i0 < L.in; i0 += it)
      fn(o0, std::min(ot, L.out - o0), i0, std::min(it, L.in - i0));
}

// (B, ot, it) block of per-sample gradients for T > 1: one batched GEMM over positions.
inline at::Tensor gradient_tile(const at::Tensor& A3, const at::Tensor& D3, int64_t o0, int64_t ot, int64_t i0,
                                int64_t it) {
  return at::bmm(D3.narrow(2, o0, ot).transpose(1, 2), A3.narrow(2, i0, it));
}

template <class Kernels>
at::Tensor sq_norms(const at::Tensor& A, const at::Tensor& D) {
  const Layout L = check_pair(A, D, "per_sample_sq_norms");
  if (L.T == 1) {
    // ||d a^T||_F^2 = ||d||^2 ||a||^2
    const at::Tensor A2 = A.reshape({L.B, L.in}), D2 = D.reshape({L.B, L.out});
    return A2.mul(A2).sum(1).mul_(D2.mul(D2).sum(1));
  }
  const at::Tensor A3 = A.contiguous(), D3 = D.contiguous();
  // Gram form sum_{t,s} (a_t.a_s)(d_t.d_s) costs T^2 (in + out) per sample; the direct form T in out.
  if (L.T * (L.in + L.out) <= L.in * L.out) {
    at::Tensor result = at::empty({L.B}, A.options());
    const int64_t chunk = std::max<int64_t>(1, kTileBudget / (L.T * L.T));
    for (int64_t b0 = 0; b0 < L.B; b0 += chunk) {
      const int64_t n = std::min(chunk, L.B - b0);
      const at::Tensor a = A3.narrow(0, b0, n), d = D3.narrow(0, b0, n);
      result.narrow(0, b0, n).copy_(at::bmm(a, a.transpose(1, 2)).mul_(at::bmm(d, d.transpose(1, 2))).sum({1, 2}));
    }
    return result;
  }
  at::Tensor result = at::zeros({L.B}, A.options());
  for_each_gradient_tile(L, [&](int64_t o0, int64_t ot, int64_t i0, int64_t it) {
    const at::Tensor g = gradient_tile(A3, D3, o0, ot, i0, it);
    result.add_(g.mul(g).sum({1, 2}));
  });
  return result;
}

// T > 1: tiles of per-sample gradients (B T P + B^2 P) or blocks of sample pairs ((B T)^2 (in + out)).
inline bool gram_direct_is_cheaper(const Layout& L) {
  const double P = double(L.in) * double(L.out);
  const double cost_gram_form = double(L.B * L.T) * double(L.B * L.T) * double(L.in + L.out);
  const double cost_direct = double(L.B) * double(L.T) * P + double(L.B) * double(L.B) * P;
  return cost_direct <= cost_gram_form;
}

template <class Kernels>
at::Tensor gram(const at::Tensor& A, const at::Tensor& D) {
  const Layout L = check_pair(A, D, "per_sample_gram");
  if (L.T == 1) {
    // <d_b a_b^T, d_c a_c^T> = (a_b . a_c)(d_b . d_c)
    const at::Tensor A2 = A.reshape({L.B, L.in}), D2 = D.reshape({L.B, L.out});
    return at::mm(A2, A2.t()).mul_(at::mm(D2, D2.t()));
  }
  const at::Tensor A3 = A.contiguous(), D3 = D.contiguous();
  if (gram_direct_is_cheaper(L)) {
    at::Tensor result = at::zeros({L.B, L.B}, A.options());
    for_each_gradient_tile(L, [&](int64_t o0, int64_t ot, int64_t i0, int64_t it) {
      const at::Tensor g = gradient_tile(A3, D3, o0, ot, i0, it).reshape({L.B, ot * it});
      result.addmm_(g, g.t());
    });
    return result;
  }
  // Blocks of sample pairs: <G_b, G_c> = sum_{t,s} (A_bt . A_cs)(D_bt . D_cs).
  const at::Tensor Af = flat(A3, L), Df = flat(D3, L);
  at::Tensor result = at::empty({L.B, L.B}, A.options());
  const int64_t block = std::max<int64_t>(1, int64_t(std::sqrt(double(kTileBudget))) / L.T);
  for (int64_t b0 = 0; b0 < L.B; b0 += block) {
    const int64_t nb = std::min(block, L.B - b0);
    for (int64_t c0 = b0; c0 < L.B; c0 += block) {
      const int64_t nc = std::min(block, L.B - c0);
      const at::Tensor ka = at::mm(Af.narrow(0, b0 * L.T, nb * L.T), Af.narrow(0, c0 * L.T, nc * L.T).t());
      const at::Tensor kd = at::mm(Df.narrow(0, b0 * L.T, nb * L.T), Df.narrow(0, c0 * L.T, nc * L.T).t());
      const at::Tensor blk = ka.mul(kd).reshape({nb, L.T, nc, L.T}).sum({1, 3});
      result.narrow(0, b0, nb).narrow(1, c0, nc).copy_(blk);
      if (c0 != b0) result.narrow(0, c0, nc).narrow(1, b0, nb).copy_(blk.t());
    }
  }
  return result;
}

// Mean of G_b over the batch by one GEMM (1/B folded into the small factor).
inline at::Tensor batch_mean(const at::Tensor& A, const at::Tensor& D, const Layout& L) {
  return at::mm(flat(D, L).t().mul(1.0 / double(L.B)), flat(A, L));
}

// One pass over (B, ot, it) tiles of per-sample gradients (T > 1): the mean and the variance of every
// element (each tile's mean is the sum of its rows, not a GEMM of its own: the corrected two-pass sum
// needs no exact mean) and, when asked for, the Gram matrix or else the squared norms from the same
// tiles (with the Gram matrix the norms are its diagonal).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> tile_pass(const at::Tensor& A, const at::Tensor& D, const Layout& L,
                                             at::Tensor* sq_norms, at::Tensor* gram) {
  at::Tensor mean = at::empty({L.out, L.in}, A.options());
  at::Tensor var = at::empty({L.out, L.in}, A.options());
  const at::Tensor A3 = A.contiguous(), D3 = D.contiguous();
  const double inv_b = 1.0 / double(L.B);
  for_each_gradient_tile(L, [&](int64_t o0, int64_t ot, int64_t i0, int64_t it) {
    const at::Tensor g = gradient_tile(A3, D3, o0, ot, i0, it).reshape({L.B, ot * it});
    const at::Tensor m = g.sum(0, true).mul_(inv_b);
    mean.narrow(0, o0, ot).narrow(1, i0, it).copy_(m.reshape({ot, it}));
    var.narrow(0, o0, ot).narrow(1, i0, it).copy_(Kernels::centred_sq_sum(g, at::Tensor(), m, inv_b).reshape({ot, it}));
    if (gram) gram->addmm_(g, g.t());
    else if (sq_norms) sq_norms->add_(g.mul(g).sum(1));
  });
  return std::make_tuple(mean, var);
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> moments(const at::Tensor& A, const at::Tensor& D) {
  const Layout L = check_pair(A, D, "per_sample_moments");
  // Two passes (never E[G^2] - E[G]^2, which cancels): for T = 1 the mean by one GEMM, then centred
  // squares; for T > 1 both from each tile of per-sample gradients.
  if (L.T > 1) return tile_pass<Kernels>(A, D, L, nullptr, nullptr);
  const at::Tensor mean = batch_mean(A, D, L);
  return std::make_tuple(mean, Kernels::centred_sq_sum(flat(A, L), flat(D, L), mean, 1.0 / double(L.B)));
}

// Squared norms, Gram matrix, mean and variance together: for T > 1 every tile of per-sample
// gradients is built once and serves all four (the separate ops would build it up to three times).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats(const at::Tensor& A, const at::Tensor& D) {
  const Layout L = check_pair(A, D, "per_sample_stats");
  if (L.T == 1) {
    const auto mv = moments<Kernels>(A, D);
    return std::make_tuple(sq_norms<Kernels>(A, D), gram<Kernels>(A, D), std::get<0>(mv), std::get<1>(mv));
  }
  at::Tensor norms = at::zeros({L.B}, A.options());
  const bool gram_from_tiles = gram_direct_is_cheaper(L);
  at::Tensor g = gram_from_tiles ? at::zeros({L.B, L.B}, A.options()) : gram<Kernels>(A, D);
  const auto mv = tile_pass<Kernels>(A, D, L, &norms, gram_from_tiles ? &g : nullptr);
  if (gram_from_tiles) norms = g.diagonal().clone();
  return std::make_tuple(norms, g, std::get<0>(mv), std::get<1>(mv));
}

// per_sample_stats with a centre M (out, in) close to the batch mean (autograd's gradient): for T = 1 the
// mean is M + the mean deviation from it, out of the variance pass itself, instead of a GEMM of its own;
// for T > 1 the tiles give the mean and M is not read. The results are those of per_sample_stats up to
// rounding; a centre far from the mean costs precision, as the deviations about it then cancel.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_about(const at::Tensor& A, const at::Tensor& D,
                                                                       const at::Tensor& M) {
  const char* op = "per_sample_stats_about";
  const Layout L = check_pair(A, D, op);
  TORCH_CHECK_VALUE(M.defined() && M.dim() == 2 && M.size(0) == L.out && M.size(1) == L.in, op,
                    ": M (the centre) must have shape (out, in) = (", L.out, ", ", L.in, "), got shape ",
                    M.defined() ? M.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(M.scalar_type() == A.scalar_type(), op, ": M must have A's dtype ", A.scalar_type(), ", got ",
                   M.scalar_type());
  TORCH_CHECK_VALUE(M.device() == A.device(), op, ": M must be on A's device ", A.device(), ", got ", M.device());
  if (L.T > 1) return stats<Kernels>(A, D);
  at::Tensor mean;
  const at::Tensor var = Kernels::centred_sq_sum(flat(A, L), flat(D, L), M, 1.0 / double(L.B), &mean);
  return std::make_tuple(sq_norms<Kernels>(A, D), gram<Kernels>(A, D), mean, var);
}

// P[b, k] = <G_b, V_k> computed as sum_t d_bt^T V_k a_bt through the smaller of in / out.
inline at::Tensor project_impl_check(const at::Tensor& A, const at::Tensor& D, const at::Tensor& V, const char* op,
                                     Layout& L) {
  L = check_pair(A, D, op);
  check_directions(V, A, L, op);
  return V.contiguous();
}

template <class Kernels>
at::Tensor project_checked(const at::Tensor& A, const at::Tensor& D, const at::Tensor& V, const Layout& L) {
  const int64_t K = V.size(0);
  const at::Tensor Af = flat(A, L), Df = flat(D, L);
  const bool through_in = L.in <= L.out;  // U = A V^T is (R, K, out) or U = D V is (R, K, in)
  const int64_t J = through_in ? L.out : L.in;
  // Directions laid out so that one GEMM gives U for a chunk of rows and all directions of a chunk.
  const at::Tensor Vm = through_in ? V.reshape({K * L.out, L.in}).t()            // (in, K*out)
                                   : V.permute({1, 0, 2}).reshape({L.out, K * L.in});  // (out, K*in)
  const at::Tensor X = through_in ? Df : Af;
  const at::Tensor Y = through_in ? Af : Df;
  at::Tensor result = at::empty({L.B, K}, A.options());
  const int64_t k_chunk = std::max<int64_t>(1, std::min(K, kTileBudget / (L.T * J)));
  const int64_t b_chunk = std::max<int64_t>(1, std::min(L.B, kTileBudget / (L.T * J * k_chunk)));
  for (int64_t k0 = 0; k0 < K; k0 += k_chunk) {
    const int64_t nk = std::min(k_chunk, K - k0);
    const at::Tensor Vk = Vm.narrow(1, k0 * J, nk * J);
    for (int64_t b0 = 0; b0 < L.B; b0 += b_chunk) {
      const int64_t nb = std::min(b_chunk, L.B - b0);
      const at::Tensor U = at::mm(Y.narrow(0, b0 * L.T, nb * L.T), Vk).reshape({nb * L.T, nk, J});
      result.narrow(0, b0, nb).narrow(1, k0, nk).copy_(
          Kernels::batched_dot(U, X.narrow(0, b0 * L.T, nb * L.T), L.T));
    }
  }
  return result;
}

template <class Kernels>
at::Tensor project(const at::Tensor& A, const at::Tensor& D, const at::Tensor& V) {
  Layout L;
  const at::Tensor Vc = project_impl_check(A, D, V, "per_sample_project", L);
  return project_checked<Kernels>(A, D, Vc, L);
}

// S_k = sum_b W[b, k] G_b = (D * w_k)^T A over rows (b, t), scaling the narrower of A and D per k.
inline at::Tensor weighted_sum_checked(const at::Tensor& A, const at::Tensor& D, const at::Tensor& W,
                                       const Layout& L) {
  const int64_t K = W.size(1), R = L.B * L.T;
  const at::Tensor w = W.t().repeat_interleave(L.T, 1).unsqueeze(2);  // (K, R, 1): W[b, k] on each row (b, t)
  const at::Tensor Af = flat(A, L), Df = flat(D, L);
  at::Tensor result = at::empty({K, L.out, L.in}, A.options());
  const bool scale_in = L.in <= L.out;
  const int64_t k_chunk = std::max<int64_t>(1, std::min(K, kTileBudget / (R * std::min(L.in, L.out))));
  for (int64_t k0 = 0; k0 < K; k0 += k_chunk) {
    const int64_t nk = std::min(k_chunk, K - k0);
    const at::Tensor wk = w.narrow(0, k0, nk);
    if (scale_in)  // D^T (w * A): (nk, out, R) x (nk, R, in)
      result.narrow(0, k0, nk).copy_(at::bmm(Df.t().unsqueeze(0).expand({nk, L.out, R}), wk.mul(Af.unsqueeze(0))));
    else  // (w * D)^T A: (nk, out, R) x (nk, R, in)
      result.narrow(0, k0, nk).copy_(
          at::bmm(wk.mul(Df.unsqueeze(0)).transpose(1, 2), Af.unsqueeze(0).expand({nk, R, L.in})));
  }
  return result;
}

inline at::Tensor weighted_sum(const at::Tensor& A, const at::Tensor& D, const at::Tensor& W) {
  const char* op = "per_sample_weighted_sum";
  const Layout L = check_pair(A, D, op);
  TORCH_CHECK_VALUE(W.defined() && W.dim() == 2 && W.size(0) == L.B, op, ": W (weights) must have shape (B, K) = (", L.B,
              ", K), got shape ", W.defined() ? W.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(W.size(1) > 0, op, ": W holds no weight vectors (K = 0)");
  TORCH_CHECK_TYPE(W.scalar_type() == A.scalar_type(), op, ": W must have A's dtype ", A.scalar_type(), ", got ",
              W.scalar_type());
  TORCH_CHECK_VALUE(W.device() == A.device(), op, ": W must be on A's device ", A.device(), ", got ", W.device());
  return weighted_sum_checked(A, D, W, L);
}

// C_1 V_k = (1/B) sum_b s_bk G_b with s the batch-centred projections <G_b, V_k>.
template <class Kernels>
at::Tensor cov_matvec(const at::Tensor& A, const at::Tensor& D, const at::Tensor& V) {
  Layout L;
  const at::Tensor Vc = project_impl_check(A, D, V, "per_sample_cov_matvec", L);
  const at::Tensor s = project_checked<Kernels>(A, D, Vc, L);
  return weighted_sum_checked(A, D, s.sub(s.mean(0, true)).div_(double(L.B)), L);
}

}  // namespace detail
}  // namespace landscape_kernels

// Defines the ops of namespace NS on the Kernels policy; GUARD is a statement run first (device guard).
#define LK_DEFINE_PERSAMPLE_OPS(NS, Kernels, GUARD)                                                        \
  namespace NS {                                                                                       \
  at::Tensor per_sample_sq_norms(const at::Tensor& A, const at::Tensor& D) {                           \
    GUARD;                                                                                             \
    return detail::sq_norms<Kernels>(A, D);                                                            \
  }                                                                                                    \
  at::Tensor per_sample_gram(const at::Tensor& A, const at::Tensor& D) {                               \
    GUARD;                                                                                             \
    return detail::gram<Kernels>(A, D);                                                                \
  }                                                                                                    \
  std::tuple<at::Tensor, at::Tensor> per_sample_moments(const at::Tensor& A, const at::Tensor& D) {    \
    GUARD;                                                                                             \
    return detail::moments<Kernels>(A, D);                                                             \
  }                                                                                                    \
  at::Tensor per_sample_project(const at::Tensor& A, const at::Tensor& D, const at::Tensor& V) {       \
    GUARD;                                                                                             \
    return detail::project<Kernels>(A, D, V);                                                          \
  }                                                                                                    \
  at::Tensor per_sample_cov_matvec(const at::Tensor& A, const at::Tensor& D, const at::Tensor& V) {    \
    GUARD;                                                                                             \
    return detail::cov_matvec<Kernels>(A, D, V);                                                       \
  }                                                                                                    \
  at::Tensor per_sample_weighted_sum(const at::Tensor& A, const at::Tensor& D, const at::Tensor& W) {  \
    GUARD;                                                                                             \
    return detail::weighted_sum(A, D, W);                                                              \
  }                                                                                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> per_sample_stats(const at::Tensor& A,     \
                                                                              const at::Tensor& D) {   \
    GUARD;                                                                                             \
    return detail::stats<Kernels>(A, D);                                                               \
  }                                                                                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> per_sample_stats_about(                  \
      const at::Tensor& A, const at::Tensor& D, const at::Tensor& M) {                                 \
    GUARD;                                                                                             \
    return detail::stats_about<Kernels>(A, D, M);                                                      \
  }                                                                                                    \
  }
