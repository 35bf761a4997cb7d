#include "operands.h"

#include <ATen/ExpandUtils.h>

namespace adjointdeis {

void OperandCheck::check_reference() const {
  TORCH_CHECK(is_step_dtype(ref.scalar_type()), op, ": ", ref_name,
              " must be float64, float32, float16 or bfloat16, got ", ref.scalar_type());
  TORCH_CHECK(ref.device().type() == device_type, op, ": ", ref_name, " is on ", ref.device(),
              ", expected a ", device_type, " tensor");
}

void OperandCheck::check_coeffs(const at::Tensor& coeffs, int64_t count,
                                const char* layout) const {
  TORCH_CHECK(coeffs.scalar_type() == at::kDouble, op, ": coeffs must be float64, got ",
              coeffs.scalar_type());
  TORCH_CHECK(coeffs.device() == ref.device(), op, ": coeffs is on ", coeffs.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == count, op, ": coeffs must have shape [",
              count, "] (", layout, "), got ", coeffs.sizes());
}

void OperandCheck::check(const char* name, const at::Tensor& t) const {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " is on ", t.device(),
              ", expected a ", device_type, " tensor");
}

void OperandCheck::merge_shape(at::DimVector& shape, const char* name,
                               const at::Tensor& t) const {
  try {
    shape = at::infer_size_dimvector(shape, t.sizes());
  } catch (const c10::Error&) {
    TORCH_CHECK(false, op, ": ", name, " with shape ", t.sizes(), " does not broadcast with ",
                ref_name, "'s shape ", ref.sizes());
  }
}

}  // namespace adjointdeis
