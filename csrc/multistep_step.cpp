#include "multistep_step.h"

#include <ATen/ExpandUtils.h>

#include <string>

namespace adjointdeis {
namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& x,
                   c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), "multistep_step: ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "multistep_step: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "multistep_step: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.device().type() == device_type, "multistep_step: ", name, " is on ",
              t.device(), ", expected a ", device_type, " tensor");
}

at::DimVector broadcast_into(const at::DimVector& shape, const at::Tensor& t) {
  return at::infer_size_dimvector(shape, t.sizes());
}

}  // namespace

StepOperands prepare_multistep_step(const at::Tensor& x, const at::Tensor& out,
                                    at::TensorList history, const at::Tensor& coeffs,
                                    const std::optional<at::Tensor>& noise,
                                    c10::DeviceType device_type) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) &&
                  (x.scalar_type() == at::kDouble || x.scalar_type() == at::kFloat ||
                   x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16),
              "multistep_step: x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.device().type() == device_type, "multistep_step: x is on ", x.device(),
              ", expected a ", device_type, " tensor");
  TORCH_CHECK(history.size() <= static_cast<size_t>(kMaxHistory),
              "multistep_step: history holds at most ", kMaxHistory, " tensors, got ",
              history.size());
  TORCH_CHECK(coeffs.scalar_type() == at::kDouble, "multistep_step: coeffs must be float64, got ",
              coeffs.scalar_type());
  TORCH_CHECK(coeffs.device() == x.device(), "multistep_step: coeffs is on ", coeffs.device(),
              " but x is on ", x.device());
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == kNumStepCoeffs,
              "multistep_step: coeffs must have shape [", int(kNumStepCoeffs),
              "] ([a, b0, b1, b2, c, p, q]), got ", coeffs.sizes());

  check_operand(out, "out", x, device_type);
  const char* history_names[kMaxHistory] = {"history[0]", "history[1]"};
  for (size_t k = 0; k < history.size(); ++k) {
    check_operand(history[k], history_names[k], x, device_type);
  }
  if (noise.has_value()) check_operand(*noise, "noise", x, device_type);

  at::DimVector shape(x.sizes().begin(), x.sizes().end());
  auto merge = [&](const at::Tensor& t, const char* name) {
    try {
      shape = broadcast_into(shape, t);
    } catch (const c10::Error&) {
      TORCH_CHECK(false, "multistep_step: ", name, " with shape ", t.sizes(),
                  " does not broadcast with x's shape ", x.sizes());
    }
  };
  merge(out, "out");
  for (size_t k = 0; k < history.size(); ++k) merge(history[k], history_names[k]);
  if (noise.has_value()) merge(*noise, "noise");

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
