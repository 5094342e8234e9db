// CUDA kernels of the per-sample gradient statistics (docs/architecture.md): the two fused, memory-bound passes
// (coalesced over the contiguous feature dimension, on the current stream, every launch checked);
// the GEMM-shaped parts are shared with the CPU in persample_common.h and run through cuBLAS.
#include "../persample.h"
#include "../persample_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace landscape_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;     // output rows per thread (reuses each loaded X element kRows times)
constexpr int kFlush = 64;   // rows summed in the input precision before a float64 flush
constexpr int kRowsPerSplit = 256;

// S[o, j] += sum_{r in split} v^2 and S_dev[o, j] += sum_{r in split} v, v = d[r, o] * X[r, j] - M[o, j];
// d == nullptr means d == 1.
// grid: x over column blocks, y over row groups of kRows, z over splits of the R rows.
template <typename scalar_t>
__global__ void centred_sq_sum_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ d,
                                      const scalar_t* __restrict__ M, double* __restrict__ S,
                                      double* __restrict__ S_dev, int64_t R,
                                      int64_t n, int64_t m, int64_t rows_per_split) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t o0 = int64_t(blockIdx.y) * kRows;
  const int64_t r_begin = int64_t(blockIdx.z) * rows_per_split;
  const int64_t r_end = min(R, r_begin + rows_per_split);
  if (j >= n) return;
  const int no = m - o0 < kRows ? int(m - o0) : kRows;
  scalar_t mean[kRows], part[kRows], dev_part[kRows];
  double total[kRows], dev_total[kRows];
#pragma unroll
  for (int o = 0; o < kRows; ++o) {
    mean[o] = o < no ? M[(o0 + o) * n + j] : scalar_t(0);
    part[o] = dev_part[o] = 0;
    total[o] = dev_total[o] = 0;
  }
  for (int64_t r = r_begin; r < r_end; ++r) {
    const scalar_t x = X[r * n + j];
#pragma unroll
    for (int o = 0; o < kRows; ++o) {
      if (o < no) {
        const scalar_t v = fma(d ? d[r * m + o0 + o] : scalar_t(1), x, -mean[o]);  // one rounding
        part[o] += v * v;
        dev_part[o] += v;
      }
    }
    if ((r - r_begin + 1) % kFlush == 0) {
#pragma unroll
      for (int o = 0; o < kRows; ++o) {
        total[o] += double(part[o]);
        dev_total[o] += double(dev_part[o]);
        part[o] = dev_part[o] = 0;
      }
    }
  }
#pragma unroll
  for (int o = 0; o < kRows; ++o)
    if (o < no) {
      atomicAdd(S + (o0 + o) * n + j, total[o] + double(part[o]));
      atomicAdd(S_dev + (o0 + o) * n + j, dev_total[o] + double(dev_part[o]));
    }
}

// out[b, k] = sum_{t < T} sum_j U[(b T + t), k, j] X[(b T + t), j]; one warp per (b, k).
template <typename scalar_t>
__global__ void batched_dot_kernel(const scalar_t* __restrict__ U, const scalar_t* __restrict__ X,
                                   scalar_t* __restrict__ out, int64_t Bn, int64_t K, int64_t J, int64_t T) {
  const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= Bn * K) return;
  const int64_t b = warp / K, k = warp % K;
  scalar_t s = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t r = b * T + t;
    const scalar_t* u = U + (r * K + k) * J;
    const scalar_t* x = X + r * J;
    for (int64_t j = lane; j < J; j += 32) s += u[j] * x[j];
  }
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
  if (lane == 0) out[b * K + k] = s;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct CudaKernels {
  static at::Tensor centred_sq_sum(const at::Tensor& X_, const at::Tensor& d_, const at::Tensor& M_, double scale,
                                   at::Tensor* mean_out = nullptr) {
    const at::Tensor X = X_.contiguous(), M = M_.contiguous();
    const at::Tensor d = d_.defined() ? d_.contiguous() : d_;
    const int64_t R = X.size(0), n = X.size(1), m = M.size(0);
    at::Tensor S = at::zeros({m, n}, X.options().dtype(at::kDouble));
    at::Tensor S_dev = at::zeros({m, n}, X.options().dtype(at::kDouble));
    const int64_t gx = ceil_div(n, kThreads), gy = ceil_div(m, kRows);
    TORCH_CHECK_VALUE(gy <= 65535, "per-sample kernels: too many output rows (", m, ") for one launch");
    // Split the rows over enough blocks to fill the device when the output is small.
    const int64_t want_blocks = 4 * 132;
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({ceil_div(R, kRowsPerSplit),
                                                                    ceil_div(want_blocks, gx * gy), 65535}));
    const int64_t rows_per_split = ceil_div(R, splits);
    const dim3 grid(unsigned(gx), unsigned(gy), unsigned(ceil_div(R, rows_per_split)));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "centred_sq_sum_cuda", [&] {
      centred_sq_sum_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          X.data_ptr<scalar_t>(), d.defined() ? d.data_ptr<scalar_t>() : nullptr, M.data_ptr<scalar_t>(),
          S.data_ptr<double>(), S_dev.data_ptr<double>(), R, n, m, rows_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // the mean of the rows about M, from the summed deviations, before they are squared below
    if (mean_out) *mean_out = S_dev.div(double(R)).add_(M).to(X.scalar_type());
    // the corrected two-pass sum (detail::corrected_sq_sum) over the whole of R, after every split is in
    return S.sub_(S_dev.square_().div_(double(R))).clamp_min_(0.0).mul_(scale).to(X.scalar_type());
  }

  static at::Tensor batched_dot(const at::Tensor& U_, const at::Tensor& X_, int64_t T) {
    const at::Tensor U = U_.contiguous(), X = X_.contiguous();
    const int64_t R = U.size(0), K = U.size(1), J = U.size(2), Bn = R / T;
    at::Tensor out = at::empty({Bn, K}, U.options());
    const int64_t blocks = ceil_div(Bn * K * 32, kThreads);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "batched_dot_cuda", [&] {
      batched_dot_kernel<scalar_t><<<unsigned(blocks), kThreads, 0, stream>>>(
          U.data_ptr<scalar_t>(), X.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), Bn, K, J, T);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
};

}  // namespace

LK_DEFINE_PERSAMPLE_OPS(cuda, CudaKernels, const c10::cuda::CUDAGuard guard(A.device()))


}  // namespace landscape_kernels
