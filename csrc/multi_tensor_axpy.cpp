#include "multi_tensor_axpy.h"

namespace adjointdeis {

AxpyOperands prepare_multi_tensor_axpy(const std::vector<Tensor>& accumulators, const std::vector<Tensor>& updates,
                                       const Tensor& scale, DeviceType device_type) {
  constexpr const char* op = "multi_tensor_axpy_";
  ADJOINTDEIS_CHECK(accumulators.size() == updates.size(), op, ": got ", accumulators.size(),
                    " accumulators but ", updates.size(), " updates");
  ADJOINTDEIS_CHECK(scale.scalar_type() == ScalarType::Double, op, ": scale must be float64, got ",
                    scale.scalar_type());
  ADJOINTDEIS_CHECK(scale.numel() == 1, op, ": scale must hold one element, got shape ", shape_name(scale.sizes()));
  ADJOINTDEIS_CHECK(scale.device().type() == device_type, op, ": scale is on ", device_name(scale.device()),
                    ", expected a ", device_type_name(device_type), " tensor");

  AxpyOperands ops;
  ops.scale = scale;
  if (!accumulators.empty()) {
    ops.accumulator_dtype = accumulators[0].scalar_type();
    ops.update_dtype = updates[0].scalar_type();
  }
  ops.accumulators.reserve(accumulators.size());
  ops.updates.reserve(updates.size());
  for (size_t k = 0; k < accumulators.size(); ++k) {
    const Tensor& acc = accumulators[k];
    const Tensor& upd = updates[k];
    const ScalarType acc_dtype = acc.scalar_type(), upd_dtype = upd.scalar_type();
    ADJOINTDEIS_CHECK(acc_dtype == ScalarType::Float || acc_dtype == ScalarType::Double, op, ": accumulators[", k,
                      "] must be float32 or float64, got ", acc_dtype);
    ADJOINTDEIS_CHECK(acc_dtype == ops.accumulator_dtype, op, ": accumulators[", k, "] has dtype ", acc_dtype,
                      " but accumulators[0] has dtype ", ops.accumulator_dtype);
    ADJOINTDEIS_CHECK(is_step_dtype(upd_dtype), op, ": updates[", k,
                      "] must be float64, float32, float16 or bfloat16, got ", upd_dtype);
    ADJOINTDEIS_CHECK(upd_dtype == ops.update_dtype, op, ": updates[", k, "] has dtype ", upd_dtype,
                      " but updates[0] has dtype ", ops.update_dtype);
    ADJOINTDEIS_CHECK(acc.device() == scale.device(), op, ": accumulators[", k, "] is on ",
                      device_name(acc.device()), " but scale is on ", device_name(scale.device()));
    ADJOINTDEIS_CHECK(upd.device() == scale.device(), op, ": updates[", k, "] is on ", device_name(upd.device()),
                      " but scale is on ", device_name(scale.device()));
    ADJOINTDEIS_CHECK(same_shape(upd.sizes(), acc.sizes()), op, ": updates[", k, "] has shape ",
                      shape_name(upd.sizes()), " but accumulators[", k, "] has shape ", shape_name(acc.sizes()));
    ADJOINTDEIS_CHECK(acc.is_contiguous(), op, ": accumulators[", k, "] must be contiguous");
    ops.accumulators.push_back(acc);
    ops.updates.push_back(upd.is_contiguous() ? upd : torch::stable::contiguous(upd));
  }
  return ops;
}

}  // namespace adjointdeis
