#include "operands.h"

namespace adjointdeis {

void OperandCheck::check_reference() const {
  ADJOINTDEIS_CHECK(is_step_dtype(ref.scalar_type()), op, ": ", ref_name,
                    " must be float64, float32, float16 or bfloat16, got ", ref.scalar_type());
  ADJOINTDEIS_CHECK(ref.device().type() == device_type, op, ": ", ref_name, " is on ",
                    device_name(ref.device()), ", expected a ", device_type_name(device_type), " tensor");
}

void OperandCheck::check_coeffs(const Tensor& coeffs, int64_t count, const char* layout) const {
  ADJOINTDEIS_CHECK(coeffs.scalar_type() == ScalarType::Double, op, ": coeffs must be float64, got ",
                    coeffs.scalar_type());
  ADJOINTDEIS_CHECK(coeffs.device() == ref.device(), op, ": coeffs is on ", device_name(coeffs.device()),
                    " but ", ref_name, " is on ", device_name(ref.device()));
  ADJOINTDEIS_CHECK(coeffs.dim() == 1 && coeffs.size(0) == count, op, ": coeffs must have shape [", count,
                    "] (", layout, "), got ", shape_name(coeffs.sizes()));
}

void OperandCheck::check(const char* name, const Tensor& t) const {
  ADJOINTDEIS_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                    " but ", ref_name, " has dtype ", ref.scalar_type());
  ADJOINTDEIS_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", device_name(t.device()), " but ",
                    ref_name, " is on ", device_name(ref.device()));
}

void OperandCheck::merge_shape(Shape& shape, const char* name, const Tensor& t) const {
  const std::optional<Shape> merged = broadcast_shapes(shape, t.sizes());
  ADJOINTDEIS_CHECK(merged.has_value(), op, ": ", name, " with shape ", shape_name(t.sizes()),
                    " does not broadcast with ", ref_name, "'s shape ", shape_name(ref.sizes()));
  shape = *merged;
}

}  // namespace adjointdeis
