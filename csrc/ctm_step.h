// Host-side contract of the fused consistency-trajectory step x_next = a x + b g + c noise,
// shared by the CPU and CUDA backends.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "operands.h"
#include "step_math.h"

namespace adjointdeis {

// Operands of one step after validation: every input expanded to the common shape and
// contiguous, the output allocated. Without noise, `noise` is undefined.
struct CtmOperands {
  at::Tensor x, g, noise, coeffs;
  at::Tensor x_next;
  bool has_noise = false;
};

CtmOperands prepare_ctm_step(const at::Tensor& x, const at::Tensor& g, const at::Tensor& coeffs,
                             const std::optional<at::Tensor>& noise, c10::DeviceType device_type);

// Calls f(std::bool_constant<HasNoise>) so each backend instantiates branch-free loops.
template <typename F>
void dispatch_noise_variant(bool has_noise, F&& f) {
  if (has_noise) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace adjointdeis
