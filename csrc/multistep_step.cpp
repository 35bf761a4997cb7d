#include "multistep_step.h"

namespace adjointdeis {

StepOperands prepare_multistep_step(const at::Tensor& x, const at::Tensor& out,
                                    at::TensorList history, const at::Tensor& coeffs,
                                    const std::optional<at::Tensor>& noise,
                                    c10::DeviceType device_type) {
  const OperandCheck check{"multistep_step", "x", x, device_type};
  check.check_reference();
  TORCH_CHECK(history.size() <= static_cast<size_t>(kMaxHistory),
              "multistep_step: history holds at most ", kMaxHistory, " tensors, got ",
              history.size());
  check.check_coeffs(coeffs, kNumStepCoeffs, "[a, b0, b1, b2, c, p, q]");

  check.check("out", out);
  const char* history_names[kMaxHistory] = {"history[0]", "history[1]"};
  for (size_t k = 0; k < history.size(); ++k) check.check(history_names[k], history[k]);
  if (noise.has_value()) check.check("noise", *noise);

  at::DimVector shape(x.sizes().begin(), x.sizes().end());
  check.merge_shape(shape, "out", out);
  for (size_t k = 0; k < history.size(); ++k) {
    check.merge_shape(shape, history_names[k], history[k]);
  }
  if (noise.has_value()) check.merge_shape(shape, "noise", *noise);

  auto dense = [&](const at::Tensor& t) { return t.expand(shape).contiguous(); };
  StepOperands ops;
  ops.x = dense(x);
  ops.out = dense(out);
  ops.num_history = static_cast<int>(history.size());
  if (ops.num_history >= 1) ops.m1 = dense(history[0]);
  if (ops.num_history >= 2) ops.m2 = dense(history[1]);
  ops.has_noise = noise.has_value();
  if (ops.has_noise) ops.noise = dense(*noise);
  ops.coeffs = coeffs.contiguous();
  ops.x_next = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  ops.m0 = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  return ops;
}

}  // namespace adjointdeis
