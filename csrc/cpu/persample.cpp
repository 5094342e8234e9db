// CPU kernels of the per-sample gradient statistics (DESIGN §2.1): the two fused, memory-bound
// passes; the GEMM-shaped parts are shared with CUDA in persample_common.h.
#include "../persample.h"
#include "../persample_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace landscape_kernels {
namespace {

// Tile of the (m, n) output handled by one task: kRows rows x kCols columns of accumulators (L1-sized).
constexpr int64_t kRows = 4;
constexpr int64_t kCols = 256;
// Rows of X summed in the input precision before being flushed into the float64 accumulators.
constexpr int64_t kFlush = 64;

// acc[j] += (d * x[j] - m[j])^2 for j < n. d * x - m is one fused multiply-add (one rounding), so a
// float32 deviation keeps full precision even when the mean is many times the spread. Compiled for
// AVX2+FMA and for the baseline ISA; the loader picks the clone that the CPU supports.
template <typename scalar_t>
__attribute__((always_inline)) inline void centred_sq_row(scalar_t* __restrict acc, const scalar_t* __restrict x,
                                                          scalar_t d, const scalar_t* __restrict m, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t v = std::fma(d, x[j], -m[j]);
    acc[j] += v * v;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LK_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define LK_CPU_CLONES
#endif

LK_CPU_CLONES void centred_sq_row_f(float* acc, const float* x, float d, const float* m, int64_t n) {
  centred_sq_row(acc, x, d, m, n);
}
LK_CPU_CLONES void centred_sq_row_d(double* acc, const double* x, double d, const double* m, int64_t n) {
  centred_sq_row(acc, x, d, m, n);
}
inline void centred_sq_row_any(float* acc, const float* x, float d, const float* m, int64_t n) {
  centred_sq_row_f(acc, x, d, m, n);
}
inline void centred_sq_row_any(double* acc, const double* x, double d, const double* m, int64_t n) {
  centred_sq_row_d(acc, x, d, m, n);
}

template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t dot(const scalar_t* __restrict u, const scalar_t* __restrict x,
                                                   int64_t n) {
  scalar_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += u[j] * x[j];
  return s;
}
LK_CPU_CLONES float dot_f(const float* u, const float* x, int64_t n) { return dot(u, x, n); }
LK_CPU_CLONES double dot_d(const double* u, const double* x, int64_t n) { return dot(u, x, n); }
inline float dot_any(const float* u, const float* x, int64_t n) { return dot_f(u, x, n); }
inline double dot_any(const double* u, const double* x, int64_t n) { return dot_d(u, x, n); }

struct CpuKernels {
  static at::Tensor centred_sq_sum(const at::Tensor& X_, const at::Tensor& d_, const at::Tensor& M_) {
    const at::Tensor X = X_.contiguous(), M = M_.contiguous();
    const at::Tensor d = d_.defined() ? d_.contiguous() : d_;
    const int64_t R = X.size(0), n = X.size(1), m = M.size(0);
    at::Tensor S = at::empty({m, n}, X.options().dtype(at::kDouble));
    const int64_t row_tiles = (m + kRows - 1) / kRows, col_tiles = (n + kCols - 1) / kCols;
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "centred_sq_sum_cpu", [&] {
      const scalar_t* x = X.data_ptr<scalar_t>();
      const scalar_t* dp = d.defined() ? d.data_ptr<scalar_t>() : nullptr;
      const scalar_t* mp = M.data_ptr<scalar_t>();
      double* s = S.data_ptr<double>();
      at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> part(kRows * kCols);
        std::vector<double> total(kRows * kCols);
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t o0 = (tile / col_tiles) * kRows, j0 = (tile % col_tiles) * kCols;
          const int64_t no = std::min(kRows, m - o0), nj = std::min(kCols, n - j0);
          std::fill(total.begin(), total.end(), 0.0);
          for (int64_t r0 = 0; r0 < R; r0 += kFlush) {
            std::fill(part.begin(), part.end(), scalar_t(0));
            const int64_t r1 = std::min(R, r0 + kFlush);
            for (int64_t r = r0; r < r1; ++r)
              for (int64_t o = 0; o < no; ++o)
                centred_sq_row_any(part.data() + o * kCols, x + r * n + j0, dp ? dp[r * m + o0 + o] : scalar_t(1),
                                   mp + (o0 + o) * n + j0, nj);
            for (int64_t o = 0; o < no; ++o)
              for (int64_t j = 0; j < nj; ++j) total[o * kCols + j] += double(part[o * kCols + j]);
          }
          for (int64_t o = 0; o < no; ++o)
            std::copy(total.begin() + o * kCols, total.begin() + o * kCols + nj, s + (o0 + o) * n + j0);
        }
      });
    });
    return S;
  }

  static at::Tensor batched_dot(const at::Tensor& U_, const at::Tensor& X_, int64_t T) {
    const at::Tensor U = U_.contiguous(), X = X_.contiguous();
    const int64_t R = U.size(0), K = U.size(1), J = U.size(2), Bn = R / T;
    at::Tensor out = at::empty({Bn, K}, U.options());
    AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "batched_dot_cpu", [&] {
      const scalar_t* u = U.data_ptr<scalar_t>();
      const scalar_t* x = X.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, T * K * J));
      at::parallel_for(0, Bn, grain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
          for (int64_t k = 0; k < K; ++k) {
            scalar_t s = 0;
            for (int64_t t = 0; t < T; ++t) {
              const int64_t r = b * T + t;
              s += dot_any(u + (r * K + k) * J, x + r * J, J);
            }
            o[b * K + k] = s;
          }
      });
    });
    return out;
  }
};

}  // namespace

LK_DEFINE_PERSAMPLE_OPS(cpu, CpuKernels, (void)0)


}  // namespace landscape_kernels
