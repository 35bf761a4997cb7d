// Host-side checks and broadcasting shared by the elementwise ops: every message names the
// op and the offending argument, and compares it with the op's reference operand.
#pragma once

#include "stable.h"

namespace adjointdeis {

// The contract of one call: the op's name, the operand the others are compared with
// (x for multistep_step, xbar for discrete_adjoint_step) and the backend's device type.
struct OperandCheck {
  const char* op;
  const char* ref_name;
  const Tensor& ref;
  DeviceType device_type;

  // The reference operand is float64/32/16/bf16 and on a device of the backend's type.
  void check_reference() const;
  // coeffs is a float64 tensor of shape [count] on the reference's device; `layout`
  // spells its entries, e.g. "[a, b0, b1, b2, c, p, q]".
  void check_coeffs(const Tensor& coeffs, int64_t count, const char* layout) const;
  // t has the reference's dtype and lives on its device.
  void check(const char* name, const Tensor& t) const;
  // Broadcasts `shape` with t's shape, or fails naming t.
  void merge_shape(Shape& shape, const char* name, const Tensor& t) const;
};

}  // namespace adjointdeis
