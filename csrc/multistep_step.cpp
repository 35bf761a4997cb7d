#include "multistep_step.h"

namespace adjointdeis {

StepOperands prepare_multistep_step(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                                    const Tensor& coeffs, const std::optional<Tensor>& noise, bool save_m0,
                                    DeviceType device_type) {
  const OperandCheck check{"multistep_step", "x", x, device_type};
  check.check_reference();
  ADJOINTDEIS_CHECK(history.size() <= static_cast<size_t>(kMaxHistory), "multistep_step: history holds at most ",
                    kMaxHistory, " tensors, got ", history.size());
  const bool wide = history.size() == kMaxHistory || (coeffs.dim() == 1 && coeffs.size(0) == kNumStepCoeffs);
  if (wide) {
    check.check_coeffs(coeffs, kNumStepCoeffs, "[a, b0, b1, b2, c, p, q, b3]");
  } else {
    check.check_coeffs(coeffs, step_coeff_count(0), "[a, b0, b1, b2, c, p, q]");
  }

  const char* history_names[kMaxHistory] = {"history[0]", "history[1]", "history[2]"};
  check.check("out", out);
  for (size_t k = 0; k < history.size(); ++k) check.check(history_names[k], history[k]);
  if (noise.has_value()) check.check("noise", *noise);

  Shape shape = shape_of(x);
  check.merge_shape(shape, "out", out);
  for (size_t k = 0; k < history.size(); ++k) check.merge_shape(shape, history_names[k], history[k]);
  if (noise.has_value()) check.merge_shape(shape, "noise", *noise);

  StepOperands ops;
  ops.x = dense(x, shape);
  ops.out = dense(out, shape);
  for (const Tensor& h : history) ops.history.push_back(dense(h, shape));
  ops.has_noise = noise.has_value();
  if (ops.has_noise) ops.noise = dense(*noise, shape);
  ops.coeffs = coeffs.is_contiguous() ? coeffs : torch::stable::contiguous(coeffs);
  ops.save_m0 = save_m0;
  ops.x_next = empty(shape, x.scalar_type(), x.device());
  ops.m0 = empty(save_m0 ? shape : Shape{0}, x.scalar_type(), x.device());
  return ops;
}

}  // namespace adjointdeis
