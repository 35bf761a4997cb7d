// Host-side contract of the multi-tensor scaled accumulation accumulators[k] += scale * updates[k],
// shared by the CPU and CUDA backends.
#pragma once

#include <vector>

#include "operands.h"
#include "step_math.h"

namespace adjointdeis {

// Operands of one call after validation. accumulators are the caller's tensors (updated in
// place); updates are contiguous (copies where the caller's were not).
struct AxpyOperands {
  std::vector<Tensor> accumulators;
  std::vector<Tensor> updates;
  Tensor scale;  // one float64 element on the accumulators' device
  ScalarType accumulator_dtype = ScalarType::Float;
  ScalarType update_dtype = ScalarType::Float;
};

AxpyOperands prepare_multi_tensor_axpy(const std::vector<Tensor>& accumulators, const std::vector<Tensor>& updates,
                                       const Tensor& scale, DeviceType device_type);

}  // namespace adjointdeis
