// Host-side checks and broadcasting shared by the elementwise ops: every message names the
// op and the offending argument, and compares it with the op's reference operand.
#pragma once

#include <ATen/ATen.h>

namespace adjointdeis {

// The contract of one call: the op's name, the operand the others are compared with
// (x for multistep_step, xbar for discrete_adjoint_step) and the backend's device type.
struct OperandCheck {
  const char* op;
  const char* ref_name;
  const at::Tensor& ref;
  c10::DeviceType device_type;

  // The reference operand is float64/32/16/bf16 and on a device of the backend's type.
  void check_reference() const;
  // coeffs is a float64 tensor of shape [count] on the reference's device; `layout`
  // spells its entries, e.g. "[a, b0, b1, b2, c, p, q]".
  void check_coeffs(const at::Tensor& coeffs, int64_t count, const char* layout) const;
  // t is defined, has the reference's dtype and lives on its device.
  void check(const char* name, const at::Tensor& t) const;
  // Broadcasts `shape` with t's shape, or fails naming t.
  void merge_shape(at::DimVector& shape, const char* name, const at::Tensor& t) const;
};

// True for the value types the elementwise kernels support.
inline bool is_step_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace adjointdeis

#define ADJOINTDEIS_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
