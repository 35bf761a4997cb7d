#include "ctm_step.h"

namespace adjointdeis {

CtmOperands prepare_ctm_step(const at::Tensor& x, const at::Tensor& g, const at::Tensor& coeffs,
                             const std::optional<at::Tensor>& noise, c10::DeviceType device_type) {
  const OperandCheck check{"ctm_step", "x", x, device_type};
  check.check_reference();
  check.check_coeffs(coeffs, kNumCtmCoeffs, "[a, b, c]");
  check.check("g", g);
  if (noise.has_value()) check.check("noise", *noise);

  at::DimVector shape(x.sizes().begin(), x.sizes().end());
  check.merge_shape(shape, "g", g);
  if (noise.has_value()) check.merge_shape(shape, "noise", *noise);

  auto dense = [&](const at::Tensor& t) { return t.expand(shape).contiguous(); };
  CtmOperands ops;
  ops.x = dense(x);
  ops.g = dense(g);
  ops.has_noise = noise.has_value();
  if (ops.has_noise) ops.noise = dense(*noise);
  ops.coeffs = coeffs.contiguous();
  ops.x_next = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  return ops;
}

}  // namespace adjointdeis
