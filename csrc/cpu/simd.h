// Small vectorised loops shared by the CPU kernels, each compiled for AVX+FMA and for the baseline ISA
// (chosen at load time by CPU feature).
#pragma once

#include <cstdint>

namespace landscape_kernels {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LK_CPU_CLONES __attribute__((target_clones("fma", "default")))
#else
#define LK_CPU_CLONES
#endif

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

// y[j] -= a * x[j]
template <typename scalar_t>
__attribute__((always_inline)) inline void sub_scaled(scalar_t* __restrict y, scalar_t a, const scalar_t* __restrict x,
                                                      int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] -= a * x[j];
}
LK_CPU_CLONES void sub_scaled_f(float* y, float a, const float* x, int64_t n) { sub_scaled(y, a, x, n); }
LK_CPU_CLONES void sub_scaled_d(double* y, double a, const double* x, int64_t n) { sub_scaled(y, a, x, n); }
inline void sub_scaled_any(float* y, float a, const float* x, int64_t n) { sub_scaled_f(y, a, x, n); }
inline void sub_scaled_any(double* y, double a, const double* x, int64_t n) { sub_scaled_d(y, a, x, n); }

}  // namespace
}  // namespace landscape_kernels
