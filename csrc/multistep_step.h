// Host-side contract of the fused multistep step, shared by the CPU and CUDA backends.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include "operands.h"
#include "step_math.h"

namespace adjointdeis {

// Operands of one step after validation: every input broadcast to the common shape and
// contiguous, and the outputs (m0 unset or empty when it is not saved). in_place: an output is one of
// the inputs itself (the caller's buffers of multistep_step_out), so each element must be read before
// it is written. finite (when check_finite): a 0-d bool tensor the kernel sets to false when x_next holds a NaN
// or an infinity, and leaves as it is otherwise.
struct StepOperands {
  Tensor x, out, noise, coeffs;
  std::vector<Tensor> history;
  Tensor x_next, m0, finite;
  bool has_noise = false;
  bool save_m0 = true;
  bool in_place = false;
  bool check_finite = false;
};

StepOperands prepare_multistep_step(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                                    const Tensor& coeffs, const std::optional<Tensor>& noise, bool save_m0,
                                    DeviceType device_type);

// The same operands with the caller's outputs: x_next, and m0 unless it is not saved (both contiguous, with the
// broadcast shape, x's dtype and device, apart from each other, and each either one of the inputs itself,
// written in place, or sharing no memory with any), and the finiteness flag when one is given (a 0-d bool tensor
// on x's device).
StepOperands prepare_multistep_step_out(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                                        const Tensor& coeffs, const std::optional<Tensor>& noise,
                                        const Tensor& x_next, const std::optional<Tensor>& m0,
                                        const std::optional<Tensor>& finite, DeviceType device_type);

// Calls f(std::integral_constant<int, NumHistory>, std::bool_constant<HasNoise>,
// std::bool_constant<SaveM0>) for the runtime variant of the step, so each backend instantiates
// branch-free loops.
template <typename F>
void dispatch_step_variant(size_t num_history, bool has_noise, bool save_m0, F&& f) {
  auto with_flags = [&](auto nh) {
    dispatch_bool(has_noise, [&](auto noisy) { dispatch_bool(save_m0, [&](auto save) { f(nh, noisy, save); }); });
  };
  switch (num_history) {
    case 0: with_flags(std::integral_constant<int, 0>{}); break;
    case 1: with_flags(std::integral_constant<int, 1>{}); break;
    case 2: with_flags(std::integral_constant<int, 2>{}); break;
    default: with_flags(std::integral_constant<int, 3>{}); break;
  }
}

}  // namespace adjointdeis
