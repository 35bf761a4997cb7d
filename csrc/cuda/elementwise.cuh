// Shared pieces of the elementwise CUDA kernels: 16-byte packs, alignment checks, grid sizing.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace adjointdeis {
namespace cuda {

constexpr int kThreads = 256;

// N consecutive elements moved as one aligned (16-byte when N = 16 / sizeof) load or store.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

template <int N, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, N> load_pack(const scalar_t* p, int64_t i) {
  return reinterpret_cast<const Pack<scalar_t, N>*>(p)[i];
}

// True when every pointer is 16-byte aligned (a null pointer, an absent operand, is).
template <typename... Pointers>
bool all_aligned_16(const Pointers*... pointers) {
  return ((reinterpret_cast<uintptr_t>(pointers) % 16 == 0) && ...);
}

// Blocks a grid-stride kernel is launched with: enough for `work` items, at most 8 per SM.
inline int max_blocks(int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return sm_count * 8;
}

inline int grid_size(int64_t work, int device) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks(device))));
}

}  // namespace cuda
}  // namespace adjointdeis
