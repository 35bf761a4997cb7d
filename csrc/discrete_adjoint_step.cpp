#include "discrete_adjoint_step.h"

namespace adjointdeis {

AdjointOperands prepare_discrete_adjoint_step(const Tensor& xbar, const Tensor& vjp, const Tensor& gfull,
                                              const std::optional<Tensor>& pend1,
                                              const std::optional<Tensor>& pend2, const Tensor& coeffs,
                                              DeviceType device_type) {
  const OperandCheck check{"discrete_adjoint_step", "xbar", xbar, device_type};
  check.check_reference();
  check.check_coeffs(coeffs, kNumAdjointCoeffs, "[a, p, b1, b2, b0_prev, q_prev]");
  check.check("vjp", vjp);
  check.check("gfull", gfull);
  if (pend1.has_value()) check.check("pend1", *pend1);
  if (pend2.has_value()) check.check("pend2", *pend2);

  Shape shape = shape_of(xbar);
  check.merge_shape(shape, "vjp", vjp);
  check.merge_shape(shape, "gfull", gfull);
  if (pend1.has_value()) check.merge_shape(shape, "pend1", *pend1);
  if (pend2.has_value()) check.merge_shape(shape, "pend2", *pend2);

  auto fresh = [&] { return empty(shape, xbar.scalar_type(), xbar.device()); };
  AdjointOperands ops;
  ops.xbar = dense(xbar, shape);
  ops.vjp = dense(vjp, shape);
  ops.gfull = dense(gfull, shape);
  ops.has_pend1 = pend1.has_value();
  if (ops.has_pend1) ops.pend1 = dense(*pend1, shape);
  ops.has_pend2 = pend2.has_value();
  if (ops.has_pend2) ops.pend2 = dense(*pend2, shape);
  ops.coeffs = coeffs.is_contiguous() ? coeffs : torch::stable::contiguous(coeffs);
  ops.xbar_prev = fresh();
  ops.gfull_prev = fresh();
  ops.cot_prev = fresh();
  ops.pend_prev = fresh();
  return ops;
}

}  // namespace adjointdeis
