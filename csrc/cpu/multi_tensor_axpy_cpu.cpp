// CPU kernel of multi_tensor_axpy_: parallel over the concatenated elements of all tensors,
// with a multiversioned (AVX-512 / AVX2 / baseline) vectorised loop.
#include <algorithm>
#include <vector>

#include "../multi_tensor_axpy.h"
#include "multiversion.h"

namespace adjointdeis {
namespace {

constexpr int64_t kGrainSize = 32768;

template <typename acc_t, typename update_t>
ADJOINTDEIS_CPU_LOOP void axpy_range(acc_t* __restrict acc, const update_t* __restrict update, int64_t n,
                                     acc_t scale) {
  for (int64_t i = 0; i < n; ++i) acc[i] = axpy_element<acc_t>(acc[i], scale, acc_t(update[i]));
}

template <typename acc_t, typename update_t>
void run_axpy(const AxpyOperands& ops) {
  const size_t count = ops.accumulators.size();
  std::vector<acc_t*> acc(count);
  std::vector<const update_t*> update(count);
  std::vector<int64_t> offsets(count + 1, 0);  // offsets[k]: first element of tensor k
  for (size_t k = 0; k < count; ++k) {
    acc[k] = ops.accumulators[k].template mutable_data_ptr<acc_t>();
    update[k] = ops.updates[k].template const_data_ptr<update_t>();
    offsets[k + 1] = offsets[k] + ops.accumulators[k].numel();
  }
  const acc_t scale = acc_t(ops.scale.const_data_ptr<double>()[0]);

  torch::stable::parallel_for(0, offsets[count], kGrainSize, [&](int64_t begin, int64_t end) {
    size_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; begin < end; ++k) {
      const int64_t stop = std::min(end, offsets[k + 1]);
      if (stop > begin) {
        const int64_t local = begin - offsets[k];
        axpy_range<acc_t, update_t>(acc[k] + local, update[k] + local, stop - begin, scale);
        begin = stop;
      }
    }
  });
}

void multi_tensor_axpy_cpu(const std::vector<Tensor>& accumulators, const std::vector<Tensor>& updates,
                           const Tensor& scale) {
  AxpyOperands ops = prepare_multi_tensor_axpy(accumulators, updates, scale, DeviceType::CPU);
  if (ops.accumulators.empty()) return;
  dispatch_opmath_types(ops.accumulator_dtype, "multi_tensor_axpy_", [&](auto acc_tag) {
    dispatch_step_types(ops.update_dtype, "multi_tensor_axpy_", [&](auto update_tag) {
      run_axpy<typename decltype(acc_tag)::type, typename decltype(update_tag)::type>(ops);
    });
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CPU, m) {
  m.impl("multi_tensor_axpy_", TORCH_BOX(&multi_tensor_axpy_cpu));
}

}  // namespace adjointdeis
