// Host-side contract of the multi-tensor scaled accumulation accumulators[k] += scale * updates[k],
// shared by the CPU and CUDA backends.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "operands.h"
#include "step_math.h"

namespace adjointdeis {

// Operands of one call after validation. accumulators are the caller's tensors (updated in
// place); updates are contiguous (copies where the caller's were not).
struct AxpyOperands {
  std::vector<at::Tensor> accumulators;
  std::vector<at::Tensor> updates;
  at::Tensor scale;  // one float64 element on the accumulators' device
  at::ScalarType accumulator_dtype = at::kFloat;
  at::ScalarType update_dtype = at::kFloat;
};

AxpyOperands prepare_multi_tensor_axpy(at::TensorList accumulators, at::TensorList updates,
                                       const at::Tensor& scale, c10::DeviceType device_type);

}  // namespace adjointdeis
