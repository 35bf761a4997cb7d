// Host-side contract of the fused discrete-adjoint update, shared by the CPU and CUDA backends.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <type_traits>

#include "operands.h"
#include "step_math.h"

namespace adjointdeis {

// Operands of one reverse row after validation: every input expanded to the common shape
// and contiguous, outputs allocated. Missing pend1 / pend2 slots hold undefined tensors.
struct AdjointOperands {
  at::Tensor xbar, vjp, gfull, pend1, pend2, coeffs;
  at::Tensor xbar_prev, gfull_prev, cot_prev, pend_prev;
  bool has_pend1 = false;
  bool has_pend2 = false;
};

AdjointOperands prepare_discrete_adjoint_step(const at::Tensor& xbar, const at::Tensor& vjp,
                                              const at::Tensor& gfull,
                                              const std::optional<at::Tensor>& pend1,
                                              const std::optional<at::Tensor>& pend2,
                                              const at::Tensor& coeffs,
                                              c10::DeviceType device_type);

// Calls f(std::bool_constant<HasPend1>, std::bool_constant<HasPend2>) for the runtime
// variant, so each backend instantiates branch-free loops.
template <typename F>
void dispatch_adjoint_variant(bool has_pend1, bool has_pend2, F&& f) {
  auto with_pend2 = [&](auto p1) {
    if (has_pend2) f(p1, std::true_type{});
    else f(p1, std::false_type{});
  };
  if (has_pend1) with_pend2(std::true_type{});
  else with_pend2(std::false_type{});
}

}  // namespace adjointdeis
