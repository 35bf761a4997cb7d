// CUDA kernel of multi_tensor_axpy_: one launch for all tensors of a call. The host writes a
// small table (pointers, sizes, chunk offsets) into pinned memory and copies it to the device
// asynchronously; every block walks chunks of kChunk elements, each chunk inside one tensor.
#include <algorithm>

#include "elementwise.cuh"

#include "../multi_tensor_axpy.h"

namespace adjointdeis {
namespace {

using cuda::kThreads;
using cuda::Pack;

constexpr int64_t kChunk = 16384;  // elements per chunk; a multiple of every pack width

// Device view of the metadata table: per tensor k, the accumulator and update addresses,
// its size, and chunk_offsets[k] = index of its first chunk (chunk_offsets[count] = total).
struct AxpyTable {
  const int64_t* accumulators;
  const int64_t* updates;
  const int64_t* numels;
  const int64_t* chunk_offsets;
  int64_t count;
};

// The tensor holding chunk c: the first k with chunk_offsets[k + 1] > c.
__device__ __forceinline__ int64_t tensor_of_chunk(const AxpyTable& table, int64_t c) {
  int64_t lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (table.chunk_offsets[mid + 1] <= c) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

template <typename acc_t, typename update_t>
__global__ void multi_tensor_axpy_kernel(AxpyTable table, const double* scale_ptr,
                                         int64_t total_chunks) {
  constexpr int kWidth = 16 / sizeof(acc_t);
  using AccPack = Pack<acc_t, kWidth>;
  using UpdatePack = Pack<update_t, kWidth>;
  const acc_t scale = acc_t(*scale_ptr);
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int64_t k = tensor_of_chunk(table, c);
    const int64_t begin = (c - table.chunk_offsets[k]) * kChunk;
    const int64_t left = table.numels[k] - begin;
    const int64_t n = left < kChunk ? left : kChunk;
    acc_t* acc = reinterpret_cast<acc_t*>(table.accumulators[k]) + begin;
    const update_t* update = reinterpret_cast<const update_t*>(table.updates[k]) + begin;
    int64_t tail = 0;
    if (reinterpret_cast<uintptr_t>(acc) % sizeof(AccPack) == 0 &&
        reinterpret_cast<uintptr_t>(update) % sizeof(UpdatePack) == 0) {
      const int64_t packs = n / kWidth;
      for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
        AccPack a = reinterpret_cast<const AccPack*>(acc)[i];
        const UpdatePack u = reinterpret_cast<const UpdatePack*>(update)[i];
#pragma unroll
        for (int j = 0; j < kWidth; ++j) a.v[j] = axpy_element<acc_t>(a.v[j], scale, acc_t(u.v[j]));
        reinterpret_cast<AccPack*>(acc)[i] = a;
      }
      tail = packs * kWidth;
    }
    for (int64_t i = tail + threadIdx.x; i < n; i += blockDim.x) {
      acc[i] = axpy_element<acc_t>(acc[i], scale, acc_t(update[i]));
    }
  }
}

template <typename acc_t, typename update_t>
void launch_axpy(const AxpyOperands& ops) {
  const int64_t count = static_cast<int64_t>(ops.accumulators.size());
  const Tensor table_host = torch::stable::empty({4 * count + 1}, ScalarType::Long, std::nullopt,
                                                 Device(DeviceType::CPU), /*pin_memory=*/true);
  int64_t* host = table_host.mutable_data_ptr<int64_t>();
  int64_t* chunk_offsets = host + 3 * count;
  chunk_offsets[0] = 0;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t numel = ops.accumulators[k].numel();
    host[k] = reinterpret_cast<int64_t>(ops.accumulators[k].template mutable_data_ptr<acc_t>());
    host[count + k] = reinterpret_cast<int64_t>(ops.updates[k].template const_data_ptr<update_t>());
    host[2 * count + k] = numel;
    chunk_offsets[k + 1] = chunk_offsets[k] + (numel + kChunk - 1) / kChunk;
  }
  const int64_t total_chunks = chunk_offsets[count];
  if (total_chunks == 0) return;
  // The caching host allocator keeps the pinned block alive until the copy has run.
  const Tensor table_device = torch::stable::to(table_host, ops.scale.device(), /*non_blocking=*/true);
  const int64_t* device = table_device.const_data_ptr<int64_t>();
  const AxpyTable table{device, device + count, device + 2 * count, device + 3 * count, count};

  const int blocks = static_cast<int>(std::min<int64_t>(total_chunks, cuda::max_blocks(cuda::current_device())));
  multi_tensor_axpy_kernel<acc_t, update_t>
      <<<blocks, kThreads, 0, cuda::current_stream()>>>(table, ops.scale.const_data_ptr<double>(), total_chunks);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void multi_tensor_axpy_cuda(const std::vector<Tensor>& accumulators, const std::vector<Tensor>& updates,
                            const Tensor& scale) {
  const auto guard = cuda::guard_device_of(scale);
  AxpyOperands ops = prepare_multi_tensor_axpy(accumulators, updates, scale, DeviceType::CUDA);
  if (ops.accumulators.empty()) return;
  dispatch_opmath_types(ops.accumulator_dtype, "multi_tensor_axpy_", [&](auto acc_tag) {
    dispatch_step_types(ops.update_dtype, "multi_tensor_axpy_", [&](auto update_tag) {
      launch_axpy<typename decltype(acc_tag)::type, typename decltype(update_tag)::type>(ops);
    });
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CUDA, m) {
  m.impl("multi_tensor_axpy_", TORCH_BOX(&multi_tensor_axpy_cuda));
}

}  // namespace adjointdeis
