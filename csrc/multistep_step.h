// Host-side contract of the fused multistep step, shared by the CPU and CUDA backends.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "operands.h"
#include "step_math.h"

namespace adjointdeis {

// Operands of one step after validation: every input expanded to the common shape and
// contiguous, outputs allocated. Unused history / noise slots hold undefined tensors.
struct StepOperands {
  at::Tensor x, out, m1, m2, noise, coeffs;
  at::Tensor x_next, m0;
  int num_history = 0;
  bool has_noise = false;
};

StepOperands prepare_multistep_step(const at::Tensor& x, const at::Tensor& out,
                                    at::TensorList history, const at::Tensor& coeffs,
                                    const std::optional<at::Tensor>& noise,
                                    c10::DeviceType device_type);

// Calls f(std::integral_constant<int, NumHistory>, std::bool_constant<HasNoise>) for the
// runtime variant of the step, so each backend instantiates branch-free loops.
template <typename F>
void dispatch_step_variant(int num_history, bool has_noise, F&& f) {
  auto with_noise = [&](auto nh) {
    if (has_noise) f(nh, std::true_type{});
    else f(nh, std::false_type{});
  };
  switch (num_history) {
    case 0: with_noise(std::integral_constant<int, 0>{}); break;
    case 1: with_noise(std::integral_constant<int, 1>{}); break;
    default: with_noise(std::integral_constant<int, 2>{}); break;
  }
}

// Records what the CUDA part of the build was compiled with (called by the CUDA
// translation unit at load time; a CPU-only build never calls it).
void register_cuda_build(int64_t cuda_version, const char* arch_list);

}  // namespace adjointdeis
