#include "discrete_adjoint_step.h"

namespace adjointdeis {

AdjointOperands prepare_discrete_adjoint_step(const at::Tensor& xbar, const at::Tensor& vjp,
                                              const at::Tensor& gfull,
                                              const std::optional<at::Tensor>& pend1,
                                              const std::optional<at::Tensor>& pend2,
                                              const at::Tensor& coeffs,
                                              c10::DeviceType device_type) {
  const OperandCheck check{"discrete_adjoint_step", "xbar", xbar, device_type};
  check.check_reference();
  check.check_coeffs(coeffs, kNumAdjointCoeffs, "[a, p, b1, b2, b0_prev, q_prev]");
  check.check("vjp", vjp);
  check.check("gfull", gfull);
  if (pend1.has_value()) check.check("pend1", *pend1);
  if (pend2.has_value()) check.check("pend2", *pend2);

  at::DimVector shape(xbar.sizes().begin(), xbar.sizes().end());
  check.merge_shape(shape, "vjp", vjp);
  check.merge_shape(shape, "gfull", gfull);
  if (pend1.has_value()) check.merge_shape(shape, "pend1", *pend1);
  if (pend2.has_value()) check.merge_shape(shape, "pend2", *pend2);

  auto dense = [&](const at::Tensor& t) { return t.expand(shape).contiguous(); };
  auto fresh = [&] {
    return at::empty(shape, xbar.options().memory_format(at::MemoryFormat::Contiguous));
  };
  AdjointOperands ops;
  ops.xbar = dense(xbar);
  ops.vjp = dense(vjp);
  ops.gfull = dense(gfull);
  ops.has_pend1 = pend1.has_value();
  if (ops.has_pend1) ops.pend1 = dense(*pend1);
  ops.has_pend2 = pend2.has_value();
  if (ops.has_pend2) ops.pend2 = dense(*pend2);
  ops.coeffs = coeffs.contiguous();
  ops.xbar_prev = fresh();
  ops.gfull_prev = fresh();
  ops.cot_prev = fresh();
  ops.pend_prev = fresh();
  return ops;
}

}  // namespace adjointdeis
