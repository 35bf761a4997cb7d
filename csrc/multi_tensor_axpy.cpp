#include "multi_tensor_axpy.h"

namespace adjointdeis {

AxpyOperands prepare_multi_tensor_axpy(at::TensorList accumulators, at::TensorList updates,
                                       const at::Tensor& scale, c10::DeviceType device_type) {
  constexpr const char* op = "multi_tensor_axpy_";
  TORCH_CHECK(accumulators.size() == updates.size(), op, ": got ", accumulators.size(),
              " accumulators but ", updates.size(), " updates");
  TORCH_CHECK(scale.scalar_type() == at::kDouble, op, ": scale must be float64, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must hold one element, got shape ",
              scale.sizes());
  TORCH_CHECK(scale.device().type() == device_type, op, ": scale is on ", scale.device(),
              ", expected a ", device_type, " tensor");

  AxpyOperands ops;
  ops.scale = scale;
  if (!accumulators.empty()) {
    ops.accumulator_dtype = accumulators[0].scalar_type();
    ops.update_dtype = updates[0].scalar_type();
  }
  ops.accumulators.reserve(accumulators.size());
  ops.updates.reserve(updates.size());
  for (size_t k = 0; k < accumulators.size(); ++k) {
    const at::Tensor& acc = accumulators[k];
    const at::Tensor& upd = updates[k];
    TORCH_CHECK(acc.defined(), op, ": accumulators[", k, "] is undefined");
    TORCH_CHECK(upd.defined(), op, ": updates[", k, "] is undefined");
    TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble, op,
                ": accumulators[", k, "] must be float32 or float64, got ", acc.scalar_type());
    TORCH_CHECK(acc.scalar_type() == ops.accumulator_dtype, op, ": accumulators[", k,
                "] has dtype ", acc.scalar_type(), " but accumulators[0] has dtype ",
                ops.accumulator_dtype);
    TORCH_CHECK(is_step_dtype(upd.scalar_type()), op, ": updates[", k,
                "] must be float64, float32, float16 or bfloat16, got ", upd.scalar_type());
    TORCH_CHECK(upd.scalar_type() == ops.update_dtype, op, ": updates[", k, "] has dtype ",
                upd.scalar_type(), " but updates[0] has dtype ", ops.update_dtype);
    TORCH_CHECK(acc.device() == scale.device(), op, ": accumulators[", k, "] is on ",
                acc.device(), " but scale is on ", scale.device());
    TORCH_CHECK(upd.device() == scale.device(), op, ": updates[", k, "] is on ", upd.device(),
                " but scale is on ", scale.device());
    TORCH_CHECK(upd.sizes() == acc.sizes(), op, ": updates[", k, "] has shape ", upd.sizes(),
                " but accumulators[", k, "] has shape ", acc.sizes());
    TORCH_CHECK(acc.is_contiguous(), op, ": accumulators[", k, "] must be contiguous");
    ops.accumulators.push_back(acc);
    ops.updates.push_back(upd.contiguous());
  }
  return ops;
}

}  // namespace adjointdeis
