// CPU kernel of profile_ce_losses (see profiles_common.h). Rows are split among threads in blocks of
// kRows; each thread repacks its block of z0 and of the used zd[u] transposed (H x kRows), so that for every point
// the rectified activations, the logits W h and the log-sum-exp are all kRows-wide operations along
// contiguous memory, which the compiler vectorises (compiled for FMA and for the baseline ISA, chosen
// at load time; exp by a vectorisable polynomial in float32).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../profiles.h"
#include "../profiles_common.h"
#include "simd.h"

namespace landscape_kernels {
namespace cpu {
namespace {

constexpr int64_t kRows = 16;

// exp for x <= 0 in a form the compiler vectorises (Cephes' expf: 2^k p(r), |r| <= ln2 / 2, about 1 ulp);
// arguments below -87 (whose exp is below float's normal range) give exp(-87), negligible next to the
// max term's 1 in a log-sum-exp.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  // round to nearest by the 1.5 * 2^23 trick: branch-free, no libm call, so the loop vectorises
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
__attribute__((always_inline)) inline double exp_nonpositive(double x) { return std::exp(x); }

// Below this, a float32 row's sum of non-max terms may be made of exp(-87) floors: such a row (a loss
// under about 1e-37) is summed again exactly (a rare, scalar path).
constexpr double kClampedTail = 1.7e-38;

// sum_c exp(logit_c - mx) - 1 in float64 for one row (logits strided by kRows), leaving out one max term.
template <typename scalar_t>
double exact_tail(const scalar_t* logits, scalar_t mx, int64_t C) {
  double tail = 0;
  bool skipped = false;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t v = logits[c * kRows];
    if (v == mx && !skipped) {
      skipped = true;
      continue;
    }
    tail += std::exp(double(v) - double(mx));
  }
  return tail;
}

// Summed cross-entropy over the rows [0, n) (n <= kRows) of a block for one point, added to *loss. z0 and
// zd hold the block transposed, (H, kRows), zero-padded beyond n rows, so forming the activations is
// kRows-wide vector work too.
template <typename scalar_t>
__attribute__((always_inline)) inline void block_losses(const scalar_t* __restrict z0, const scalar_t* __restrict zd,
                                                        scalar_t delta, const scalar_t* __restrict W,
                                                        const scalar_t* __restrict b, const int64_t* __restrict y,
                                                        int64_t n, int64_t H, int64_t C, scalar_t* __restrict hT,
                                                        scalar_t* __restrict logits, double* loss) {
  for (int64_t j = 0; j < H; ++j) {  // hT[j][r] = relu(z0[j][r] + delta zd[j][r])
#pragma omp simd
    for (int64_t r = 0; r < kRows; ++r) hT[j * kRows + r] = std::max(z0[j * kRows + r] + delta * zd[j * kRows + r], scalar_t(0));
  }
  for (int64_t c = 0; c < C; ++c) {  // logits[c][r] = b[c] + sum_j W[c][j] hT[j][r], in a register block
    scalar_t acc[kRows];
    const scalar_t bc = b ? b[c] : scalar_t(0);
#pragma omp simd
    for (int64_t r = 0; r < kRows; ++r) acc[r] = bc;
    const scalar_t* w = W + c * H;
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t wj = w[j];
      const scalar_t* h = hT + j * kRows;
#pragma omp simd
      for (int64_t r = 0; r < kRows; ++r) acc[r] += wj * h[r];
    }
    scalar_t* out = logits + c * kRows;
#pragma omp simd
    for (int64_t r = 0; r < kRows; ++r) out[r] = acc[r];
  }
  scalar_t mx[kRows], rest[kRows], ties[kRows];
#pragma omp simd
  for (int64_t r = 0; r < kRows; ++r) mx[r] = logits[r];
  for (int64_t c = 1; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < kRows; ++r) mx[r] = std::max(mx[r], logits[c * kRows + r]);
  }
#pragma omp simd
  for (int64_t r = 0; r < kRows; ++r) rest[r] = ties[r] = 0;
  // sum_c exp(logit_c - mx) = ties + rest: the terms equal to the max (exactly 1 each) apart, so that a
  // confidently right row keeps its small loss log1p(rest) instead of rounding 1 + rest to 1
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < kRows; ++r) {
      const scalar_t v = logits[c * kRows + r];
      const bool top = v == mx[r];
      rest[r] += top ? scalar_t(0) : exp_nonpositive(v - mx[r]);
      ties[r] += top ? scalar_t(1) : scalar_t(0);
    }
  }
  // sum over rows of mx - logit[target] + log1p(ties - 1 + rest)
  double linear = 0, logs = 0;
  for (int64_t r = 0; r < n; ++r) {
    linear += double(mx[r]) - double(logits[y[r] * kRows + r]);
    double tail = double(rest[r]) + double(ties[r] - 1);
    if (tail < kClampedTail * double(C)) tail = exact_tail(logits + r, mx[r], C);
    logs += std::log1p(tail);
  }
  *loss += linear + logs;
}

LK_CPU_CLONES void block_losses_f(const float* z0, const float* zd, float delta, const float* W, const float* b,
                                  const int64_t* y, int64_t n, int64_t H, int64_t C, float* hT, float* logits,
                                  double* loss) {
  block_losses(z0, zd, delta, W, b, y, n, H, C, hT, logits, loss);
}
LK_CPU_CLONES void block_losses_d(const double* z0, const double* zd, double delta, const double* W, const double* b,
                                  const int64_t* y, int64_t n, int64_t H, int64_t C, double* hT, double* logits,
                                  double* loss) {
  block_losses(z0, zd, delta, W, b, y, n, H, C, hT, logits, loss);
}
inline void block_losses_any(const float* z0, const float* zd, float delta, const float* W, const float* b,
                             const int64_t* y, int64_t n, int64_t H, int64_t C, float* hT, float* logits, double* loss) {
  block_losses_f(z0, zd, delta, W, b, y, n, H, C, hT, logits, loss);
}
inline void block_losses_any(const double* z0, const double* zd, double delta, const double* W, const double* b,
                             const int64_t* y, int64_t n, int64_t H, int64_t C, double* hT, double* logits,
                             double* loss) {
  block_losses_d(z0, zd, delta, W, b, y, n, H, C, hT, logits, loss);
}

}  // namespace

at::Tensor profile_ce_losses(const at::Tensor& z0_, const at::Tensor& zd_, const at::Tensor& direction_,
                             const at::Tensor& offset_, const at::Tensor& weight_,
                             const c10::optional<at::Tensor>& bias_, const at::Tensor& target_) {
  detail::check_profile_inputs(z0_, zd_, direction_, offset_, weight_, bias_, target_);
  const at::Tensor z0 = z0_.contiguous(), zd = zd_.contiguous(), direction = direction_.contiguous();
  const at::Tensor offset = offset_.contiguous(), weight = weight_.contiguous(), target = target_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const int64_t R = z0.size(0), H = z0.size(1), U = zd.size(0), M = direction.size(0), C = weight.size(0);
  const char* op = "profile_ce_losses";
  const int64_t* dir = direction.data_ptr<int64_t>();
  const int64_t* y = target.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK_VALUE(dir[m] >= 0 && dir[m] < U, op, ": direction[", m, "] = ", dir[m], " is not in [0, U = ", U, ")");
  }
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK_VALUE(y[r] >= 0 && y[r] < C, op, ": target[", r, "] = ", y[r], " is not a class in [0, C = ", C, ")");
  }
  at::Tensor out = at::zeros({M}, z0.options().dtype(at::kDouble));
  if (M == 0 || R == 0) return out;
  const int64_t blocks = (R + kRows - 1) / kRows;
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * M, 0.0);
  // the directions this call uses, each given a slot in the per-block packed buffer
  std::vector<int64_t> slot(static_cast<size_t>(U), -1), used;
  for (int64_t m = 0; m < M; ++m) {
    if (slot[dir[m]] < 0) {
      slot[dir[m]] = static_cast<int64_t>(used.size()) + 1;  // slot 0 is z0
      used.push_back(dir[m]);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "profile_ce_losses", [&] {
    const scalar_t* poff = offset.data_ptr<scalar_t>();
    const scalar_t* pW = weight.data_ptr<scalar_t>();
    const scalar_t* pb = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pz0 = z0.data_ptr<scalar_t>();
    const scalar_t* pzd = zd.data_ptr<scalar_t>();
    const int64_t block_size = H * kRows, slots = static_cast<int64_t>(used.size()) + 1;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      // per thread: the block's z0 and used zd[u], each transposed (H, kRows) and zero-padded, so the
      // repacking stays in cache and costs (used + 1) H kRows moves per block against M H kRows (C + 1)
      std::vector<scalar_t> packed(static_cast<size_t>(slots * block_size), scalar_t(0));
      std::vector<scalar_t> hT(block_size), logits(C * kRows);
      double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * M;
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * kRows, n = std::min(kRows, R - r0);
        if (n < kRows) std::fill(packed.begin(), packed.end(), scalar_t(0));
        for (int64_t sl = 0; sl < slots; ++sl) {
          const scalar_t* src = sl == 0 ? pz0 + r0 * H : pzd + (used[sl - 1] * R + r0) * H;
          scalar_t* dst = packed.data() + sl * block_size;
          for (int64_t r = 0; r < n; ++r)
            for (int64_t j = 0; j < H; ++j) dst[j * kRows + r] = src[r * H + j];
        }
        for (int64_t m = 0; m < M; ++m) {
          block_losses_any(packed.data(), packed.data() + slot[dir[m]] * block_size, poff[m], pW, pb, y + r0, n, H, C,
                           hT.data(), logits.data(), acc + m);
        }
      }
    });
  });
  double* po = out.data_ptr<double>();
  for (int t = 0; t < threads; ++t)
    for (int64_t m = 0; m < M; ++m) po[m] += partial[static_cast<size_t>(t) * M + m];
  return out;
}

}  // namespace cpu
}  // namespace landscape_kernels
