// Host-side contract of the fused discrete-adjoint update, shared by the CPU and CUDA backends.
#pragma once

#include <optional>
#include <type_traits>

#include "operands.h"
#include "step_math.h"

namespace adjointdeis {

// Operands of one reverse row after validation: every input broadcast to the common shape and
// contiguous, outputs allocated. Missing pend1 / pend2 are left unset.
struct AdjointOperands {
  Tensor xbar, vjp, gfull, pend1, pend2, coeffs;
  Tensor xbar_prev, gfull_prev, cot_prev, pend_prev;
  bool has_pend1 = false;
  bool has_pend2 = false;
};

AdjointOperands prepare_discrete_adjoint_step(const Tensor& xbar, const Tensor& vjp, const Tensor& gfull,
                                              const std::optional<Tensor>& pend1,
                                              const std::optional<Tensor>& pend2, const Tensor& coeffs,
                                              DeviceType device_type);

// Calls f(std::bool_constant<HasPend1>, std::bool_constant<HasPend2>) for the runtime
// variant, so each backend instantiates branch-free loops.
template <typename F>
void dispatch_adjoint_variant(bool has_pend1, bool has_pend2, F&& f) {
  dispatch_bool(has_pend1, [&](auto p1) { dispatch_bool(has_pend2, [&](auto p2) { f(p1, p2); }); });
}

}  // namespace adjointdeis
