// CPU kernels of the per-sample gradient statistics (docs/architecture.md): the two fused, memory-bound
// passes; the GEMM-shaped parts are shared with CUDA in persample_common.h.
#include "../persample.h"
#include "../persample_common.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

namespace landscape_kernels {
namespace {

// Tile of the (m, n) output handled by one task: kRows rows x kCols columns. Tall and narrow, so that
// the (R x kCols) strip of X a tile reads is reused from cache by every group of output rows.
constexpr int64_t kRows = 64;
constexpr int64_t kCols = 32;
// Rows of X summed in the input precision before being flushed into the float64 totals.
constexpr int64_t kFlush = 64;


// acc[j] += v^2 and dev[j] += v with v = d * x[j] - m[j], for j < n. d * x - m is one fused multiply-add
// (one rounding), so a float32 deviation keeps full precision even when the mean is many times the
// spread; the summed deviations correct for the rounding of m itself (see centred_sq_sum). Compiled for
// AVX+FMA (selected by CPU feature, not model) and for the baseline ISA, picked at load time.
template <typename scalar_t>
__attribute__((always_inline)) inline void centred_sq_row(scalar_t* __restrict acc, scalar_t* __restrict dev,
                                                          const scalar_t* __restrict x, scalar_t d,
                                                          const scalar_t* __restrict m, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t v = std::fma(d, x[j], -m[j]);
    acc[j] += v * v;
    dev[j] += v;
  }
}

LK_CPU_CLONES void centred_sq_row_f(float* acc, float* dev, const float* x, float d, const float* m, int64_t n) {
  centred_sq_row(acc, dev, x, d, m, n);
}
LK_CPU_CLONES void centred_sq_row_d(double* acc, double* dev, const double* x, double d, const double* m, int64_t n) {
  centred_sq_row(acc, dev, x, d, m, n);
}
inline void centred_sq_row_any(float* acc, float* dev, const float* x, float d, const float* m, int64_t n) {
  centred_sq_row_f(acc, dev, x, d, m, n);
}
inline void centred_sq_row_any(double* acc, double* dev, const double* x, double d, const double* m, int64_t n) {
  centred_sq_row_d(acc, dev, x, d, m, n);
}

// One tile's view of the centred_sq_sum problem: S[o, j] = sum_r (d[r, o] X[r, j] - M[o, j])^2.
template <typename scalar_t>
struct CentredSqTile {
  const scalar_t* x;  // X (R, n)
  const scalar_t* dt;  // d transposed, (m, R) contiguous, or nullptr for d == 1
  const scalar_t* mean;  // M (m, n)
  int64_t R, n, m;
  int64_t o0, no, j0;  // tile rows o0 .. o0 + no, columns from j0
  double* total;       // (kRows, kCols) float64 totals of the squared deviations of the tile
  double* dev_total;   // (kRows, kCols) float64 totals of the deviations
  const scalar_t* strip;  // columns j0 .. j0 + kCols of X packed row after row (R, kCols): rows of X are
                          // n apart, often a multiple of 4 KiB, and would all fall into the same L1 sets
  scalar_t dval(int64_t r, int64_t o) const { return dt ? dt[(o0 + o) * R + r] : scalar_t(1); }
};

// Portable path for columns [ja, jb) of a tile: rows of X stream through L1-resident accumulators.
template <typename scalar_t>
void centred_sq_columns_portable(const CentredSqTile<scalar_t>& t, int64_t ja, int64_t jb) {
  if (jb <= ja) return;
  std::vector<scalar_t> part_buffer(2 * kRows * kCols);
  scalar_t* part = part_buffer.data();
  scalar_t* dev_part = part + kRows * kCols;
  const int64_t nj = jb - ja;
  for (int64_t r0 = 0; r0 < t.R; r0 += kFlush) {
    std::fill(part_buffer.begin(), part_buffer.end(), scalar_t(0));
    for (int64_t r = r0; r < std::min(t.R, r0 + kFlush); ++r)
      for (int64_t o = 0; o < t.no; ++o)
        centred_sq_row_any(part + o * kCols, dev_part + o * kCols, t.x + r * t.n + ja, t.dval(r, o),
                           t.mean + (t.o0 + o) * t.n + ja, nj);
    for (int64_t o = 0; o < t.no; ++o)
      for (int64_t j = 0; j < nj; ++j) {
        t.total[o * kCols + (ja - t.j0) + j] += double(part[o * kCols + j]);
        t.dev_total[o * kCols + (ja - t.j0) + j] += double(dev_part[o * kCols + j]);
      }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LK_HAVE_AVX2_KERNEL 1
#define LK_AVX2 __attribute__((target("avx2,fma")))

// 256-bit AVX2/FMA operations for float (8 lanes) and double (4 lanes).
struct Avx2Float {
  using T = float;
  using V = __m256;
  static constexpr int W = 8;
  LK_AVX2 static V load(const T* p) { return _mm256_loadu_ps(p); }
  LK_AVX2 static V set1(T v) { return _mm256_set1_ps(v); }
  LK_AVX2 static V zero() { return _mm256_setzero_ps(); }
  LK_AVX2 static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  LK_AVX2 static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  LK_AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  LK_AVX2 static void add_to(double* t, V v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    _mm256_storeu_pd(t, _mm256_add_pd(_mm256_loadu_pd(t), lo));
    _mm256_storeu_pd(t + 4, _mm256_add_pd(_mm256_loadu_pd(t + 4), hi));
  }
};
struct Avx2Double {
  using T = double;
  using V = __m256d;
  static constexpr int W = 4;
  LK_AVX2 static V load(const T* p) { return _mm256_loadu_pd(p); }
  LK_AVX2 static V set1(T v) { return _mm256_set1_pd(v); }
  LK_AVX2 static V zero() { return _mm256_setzero_pd(); }
  LK_AVX2 static V fmsub(V a, V b, V c) { return _mm256_fmsub_pd(a, b, c); }
  LK_AVX2 static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  LK_AVX2 static V add(V a, V b) { return _mm256_add_pd(a, b); }
  LK_AVX2 static void add_to(double* t, V v) { _mm256_storeu_pd(t, _mm256_add_pd(_mm256_loadu_pd(t), v)); }
};
template <typename T> struct Avx2;
template <> struct Avx2<float> : Avx2Float {};
template <> struct Avx2<double> : Avx2Double {};

// Register-blocked micro-kernel: ROWS output rows x VECS vectors of columns starting at column j, all
// accumulators in registers while the R rows of X stream by (ROWS * VECS independent FMA chains). The
// fixed-count loops are unrolled explicitly so that the small arrays live in registers at -O2.
#define LK_UNROLL _Pragma("GCC unroll 8")
template <class Ops, int ROWS, int VECS, bool HAS_D>
LK_AVX2 void centred_sq_block_avx2(const CentredSqTile<typename Ops::T>& t, int64_t orow, int64_t j,
                                   const typename Ops::T* x_col, int64_t ldx) {
  using V = typename Ops::V;
  V mean[ROWS][VECS], acc[ROWS][VECS], dev_acc[ROWS][VECS];
  const typename Ops::T* d_rows = HAS_D ? t.dt + (t.o0 + orow) * t.R : nullptr;
  LK_UNROLL for (int o = 0; o < ROWS; ++o)
    LK_UNROLL for (int v = 0; v < VECS; ++v) mean[o][v] = Ops::load(t.mean + (t.o0 + orow + o) * t.n + j + v * Ops::W);
  for (int64_t r0 = 0; r0 < t.R; r0 += kFlush) {
    LK_UNROLL for (int o = 0; o < ROWS; ++o)
      LK_UNROLL for (int v = 0; v < VECS; ++v) acc[o][v] = dev_acc[o][v] = Ops::zero();
    const int64_t r1 = std::min(t.R, r0 + kFlush);
    for (int64_t r = r0; r < r1; ++r) {
      V x[VECS];
      LK_UNROLL for (int v = 0; v < VECS; ++v) x[v] = Ops::load(x_col + r * ldx + v * Ops::W);
      LK_UNROLL for (int o = 0; o < ROWS; ++o) {
        const V dv = Ops::set1(HAS_D ? d_rows[o * t.R + r] : typename Ops::T(1));
        LK_UNROLL for (int v = 0; v < VECS; ++v) {
          const V dev = Ops::fmsub(dv, x[v], mean[o][v]);  // one rounding, as in the portable path
          acc[o][v] = Ops::fmadd(dev, dev, acc[o][v]);
          dev_acc[o][v] = Ops::add(dev_acc[o][v], dev);
        }
      }
    }
    LK_UNROLL for (int o = 0; o < ROWS; ++o)
      LK_UNROLL for (int v = 0; v < VECS; ++v) {
        Ops::add_to(t.total + (orow + o) * kCols + (j - t.j0) + v * Ops::W, acc[o][v]);
        Ops::add_to(t.dev_total + (orow + o) * kCols + (j - t.j0) + v * Ops::W, dev_acc[o][v]);
      }
  }
}

const bool kCpuHasAvx2Fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");

// Columns [j0, j0 + nj) of a tile through the micro-kernels; returns the first column left undone.
template <typename scalar_t>
int64_t centred_sq_columns_avx2(const CentredSqTile<scalar_t>& t, int64_t nj) {
  using Ops = Avx2<scalar_t>;
  int64_t j = t.j0;
  if (t.dt == nullptr) {  // d == 1: one output row (the T > 1 tiles); four vectors for four FMA chains
    for (; j + 4 * Ops::W <= t.j0 + nj; j += 4 * Ops::W)
      for (int64_t o = 0; o < t.no; ++o) centred_sq_block_avx2<Ops, 1, 4, false>(t, o, j, t.strip + (j - t.j0), kCols);
    for (; j + Ops::W <= t.j0 + nj; j += Ops::W)
      for (int64_t o = 0; o < t.no; ++o) centred_sq_block_avx2<Ops, 1, 1, false>(t, o, j, t.strip + (j - t.j0), kCols);
    return j;
  }
  for (; j + Ops::W <= t.j0 + nj; j += Ops::W) {
    const scalar_t* xs = t.strip + (j - t.j0);
    int64_t o = 0;
    for (; o + 4 <= t.no; o += 4) centred_sq_block_avx2<Ops, 4, 1, true>(t, o, j, xs, kCols);
    for (; o < t.no; ++o) centred_sq_block_avx2<Ops, 1, 1, true>(t, o, j, xs, kCols);
  }
  return j;
}
#endif

struct CpuKernels {
  static at::Tensor centred_sq_sum(const at::Tensor& X_, const at::Tensor& d_, const at::Tensor& M_, double scale,
                                   at::Tensor* mean_out = nullptr) {
    const at::Tensor X = X_.contiguous(), M = M_.contiguous();
    // d is read down its columns: transposed once so that each output row reads a contiguous stream.
    const at::Tensor dt = d_.defined() ? d_.t().contiguous() : d_;
    const int64_t R = X.size(0), n = X.size(1), m = M.size(0);
    at::Tensor S = at::empty({m, n}, X.options());
    if (mean_out) *mean_out = at::empty({m, n}, X.options());
    const int64_t row_tiles = (m + kRows - 1) / kRows, col_tiles = (n + kCols - 1) / kCols;
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "centred_sq_sum_cpu", [&] {
      scalar_t* s = S.data_ptr<scalar_t>();
      scalar_t* mean = mean_out ? mean_out->data_ptr<scalar_t>() : nullptr;
      const scalar_t* centre = M.data_ptr<scalar_t>();
      at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
        std::vector<double> total(kRows * kCols), dev_total(kRows * kCols);
        std::vector<scalar_t> strip(R * kCols);
        for (int64_t tile = begin; tile < end; ++tile) {
          CentredSqTile<scalar_t> t{X.data_ptr<scalar_t>(), dt.defined() ? dt.data_ptr<scalar_t>() : nullptr,
                                    M.data_ptr<scalar_t>(), R, n, m, (tile / col_tiles) * kRows, 0,
                                    (tile % col_tiles) * kCols, total.data(), dev_total.data(), strip.data()};
          t.no = std::min(kRows, m - t.o0);
          const int64_t nj = std::min(kCols, n - t.j0);
          const scalar_t* x = X.data_ptr<scalar_t>();
          for (int64_t r = 0; r < R; ++r) std::copy(x + r * n + t.j0, x + r * n + t.j0 + nj, strip.data() + r * kCols);
          std::fill(total.begin(), total.begin() + t.no * kCols, 0.0);  // only the tile's rows: a one-row
          std::fill(dev_total.begin(), dev_total.begin() + t.no * kCols, 0.0);  // tile must not clear 64
          int64_t j = t.j0;
#ifdef LK_HAVE_AVX2_KERNEL
          if (kCpuHasAvx2Fma) j = centred_sq_columns_avx2(t, nj);
#endif
          centred_sq_columns_portable(t, j, t.j0 + nj);
          for (int64_t o = 0; o < t.no; ++o)
            for (int64_t jj = 0; jj < nj; ++jj) {
              const int64_t k = o * kCols + jj, idx = (t.o0 + o) * n + t.j0 + jj;
              s[idx] = scalar_t(detail::corrected_sq_sum(total[k], dev_total[k], R) * scale);
              if (mean) mean[idx] = scalar_t(double(centre[idx]) + dev_total[k] / double(R));
            }
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
