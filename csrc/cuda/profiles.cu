// CUDA kernel of profile_ce_losses (see profiles_common.h): one thread per (row, point); each thread
// forms its row's logits class by class from the rectified moved activations (recomputed per class:
// two flops per weight, cheaper than a per-thread array of H values) with an online log-sum-exp, and
// the block's losses are summed in shared memory and added to the point's total in float64.
#include "../profiles.h"
#include "../profiles_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace landscape_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void profile_ce_kernel(const scalar_t* __restrict__ z0, const scalar_t* __restrict__ zd,
                                  const int64_t* __restrict__ direction, const scalar_t* __restrict__ offset,
                                  const scalar_t* __restrict__ W, const scalar_t* __restrict__ b,
                                  const int64_t* __restrict__ y, double* __restrict__ out, int64_t R, int64_t H,
                                  int64_t U, int64_t C) {
  const int64_t m = blockIdx.y;
  const int64_t r = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  double loss = 0;
  const int64_t u = direction[m];
  const int64_t label = r < R ? y[r] : 0;
  if (r < R && u >= 0 && u < U && label >= 0 && label < C) {  // the wrapper checks the ranges
    const scalar_t delta = offset[m];
    const scalar_t* a = z0 + r * H;
    const scalar_t* d = zd + (u * R + r) * H;
    // sum_c exp(logit_c - mx) kept as ties + rest (the terms equal to the max apart), so that a confidently
    // right row keeps its small loss log1p(rest) instead of rounding 1 + rest to 1
    scalar_t mx = -INFINITY, rest = 0, ties = 0, picked = 0;
    for (int64_t c = 0; c < C; ++c) {
      scalar_t logit = b ? b[c] : scalar_t(0);
      const scalar_t* w = W + c * H;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t v = a[j] + delta * d[j];
        logit += w[j] * (v > 0 ? v : scalar_t(0));
      }
      if (logit > mx) {  // online log-sum-exp: the old terms become part of the rest
        rest = (ties + rest) * exp(mx - logit);
        ties = scalar_t(1);
        mx = logit;
      } else if (logit == mx) {
        ties += scalar_t(1);
      } else {
        rest += exp(logit - mx);
      }
      if (c == label) picked = logit;
    }
    loss = (double(mx) - double(picked)) + log1p(double(rest) + double(ties - scalar_t(1)));
  }
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = loss;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(out + m, partial[0]);
}

}  // namespace

at::Tensor profile_ce_losses(const at::Tensor& z0_, const at::Tensor& zd_, const at::Tensor& direction_,
                             const at::Tensor& offset_, const at::Tensor& weight_,
                             const c10::optional<at::Tensor>& bias_, const at::Tensor& target_) {
  detail::check_profile_inputs(z0_, zd_, direction_, offset_, weight_, bias_, target_);
  const c10::cuda::CUDAGuard guard(z0_.device());
  const at::Tensor z0 = z0_.contiguous(), zd = zd_.contiguous(), direction = direction_.contiguous();
  const at::Tensor offset = offset_.contiguous(), weight = weight_.contiguous(), target = target_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const int64_t R = z0.size(0), H = z0.size(1), U = zd.size(0), M = direction.size(0), C = weight.size(0);
  at::Tensor out = at::zeros({M}, z0.options().dtype(at::kDouble));
  if (M == 0 || R == 0) return out;
  TORCH_CHECK_VALUE(M <= 65535, "profile_ce_losses: at most 65535 points per call on CUDA, got ", M);
  const dim3 grid(unsigned((R + kThreads - 1) / kThreads), unsigned(M));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "profile_ce_losses", [&] {
    profile_ce_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        z0.data_ptr<scalar_t>(), zd.data_ptr<scalar_t>(), direction.data_ptr<int64_t>(), offset.data_ptr<scalar_t>(),
        weight.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
        target.data_ptr<int64_t>(), out.data_ptr<double>(), R, H, U, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace landscape_kernels
