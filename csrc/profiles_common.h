// Device-independent part of the loss-profile kernel (Feng & Tu 2021).
//
// profile_ce_losses(z0, zd, direction, offset, weight, bias, target) -> (M,) float64
//   For every point m and row r: h = relu(z0[r] + offset[m] * zd[direction[m], r])   (H values)
//                                logits = weight h + bias                            (C values)
//                                loss[m] += logsumexp(logits) - logits[target[r]]
//   i.e. the summed cross-entropy of a network whose layer before a ReLU and a last Linear layer moves
//   along directions, its output z0 + delta zd (one matrix product per direction, done by the caller).
//   The M x R x H activations are never formed: each row's h and logits live in registers or L1,
//   which is what makes thousands of profile points per pass over 60k images cheap.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace landscape_kernels {
namespace detail {

inline void check_profile_inputs(const at::Tensor& z0, const at::Tensor& zd, const at::Tensor& direction,
                                 const at::Tensor& offset, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& target) {
  const char* op = "profile_ce_losses";
  TORCH_CHECK_VALUE(z0.dim() == 2, op, ": z0 must have shape (R, H), got shape ", z0.sizes());
  TORCH_CHECK_TYPE(z0.scalar_type() == at::kFloat || z0.scalar_type() == at::kDouble, op,
              ": z0 must be float32 or float64, got ", z0.scalar_type());
  const int64_t R = z0.size(0), H = z0.size(1);
  TORCH_CHECK_VALUE(zd.dim() == 3 && zd.size(1) == R && zd.size(2) == H && zd.size(0) > 0, op,
              ": zd must have shape (U, R, H) = (U, ", R, ", ", H, ") with U >= 1, got shape ", zd.sizes());
  TORCH_CHECK_VALUE(direction.dim() == 1 && direction.scalar_type() == at::kLong, op,
              ": direction must be a 1-D int64 tensor, got ", direction.scalar_type(), " of shape ", direction.sizes());
  const int64_t M = direction.size(0);
  TORCH_CHECK_VALUE(offset.dim() == 1 && offset.size(0) == M, op, ": offset must have shape (M,) = (", M, ",), got shape ",
              offset.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == H && weight.size(0) > 0, op,
              ": weight must have shape (C, H) with H = ", H, ", got shape ", weight.sizes());
  const int64_t C = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape (C,) = (", C, ",), got shape ",
                bias->sizes());
  }
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == R && target.scalar_type() == at::kLong, op,
              ": target must be int64 of shape (R,) = (", R, ",), got ", target.scalar_type(), " of shape ",
              target.sizes());
  for (const at::Tensor* t : {&zd, &offset, &weight}) {
    TORCH_CHECK_TYPE(t->scalar_type() == z0.scalar_type(), op, ": zd, offset, weight and bias must have z0's dtype ",
                z0.scalar_type(), ", got ", t->scalar_type());
  }
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == z0.scalar_type(), op, ": bias must have z0's dtype ", z0.scalar_type(),
                ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == z0.device(), op, ": bias must be on z0's device ", z0.device(), ", got ",
                bias->device());
  }
  for (const at::Tensor* t : {&zd, &direction, &offset, &weight, &target}) {
    TORCH_CHECK_VALUE(t->device() == z0.device(), op, ": every tensor must be on z0's device ", z0.device(), ", got ",
                t->device());
  }
}

}  // namespace detail
}  // namespace landscape_kernels
