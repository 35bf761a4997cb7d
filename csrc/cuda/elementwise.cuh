// The shared skeleton of the CUDA kernels: 16-byte packs, alignment checks, grid sizing, the device
// guard and current stream of the stable ABI, and one elementwise kernel that every pointwise op
// (multistep step, discrete adjoint) instantiates with its per-element function from step_math.h:
// NumIn input and NumOut output arrays of one element type, a grid-stride loop over packs of
// 16 / sizeof(scalar_t) elements when every pointer is 16-byte aligned, one element at a time otherwise,
// arithmetic in the accumulation type.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../stable.h"

namespace adjointdeis {
namespace cuda {

constexpr int kThreads = 256;

// N consecutive elements moved as one aligned (16-byte when N = 16 / sizeof) load or store.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// True when every pointer is 16-byte aligned (a null pointer, an absent operand, is).
template <typename... Pointers>
bool all_aligned_16(const Pointers*... pointers) {
  return ((reinterpret_cast<uintptr_t>(pointers) % 16 == 0) && ...);
}

// Blocks a grid-stride kernel is launched with: enough for `work` items, at most 8 per SM.
inline int max_blocks(int device) {
  int sm_count = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return sm_count * 8;
}

inline int grid_size(int64_t work, int device) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks(device))));
}

inline int current_device() { return torch::stable::accelerator::getCurrentDeviceIndex(); }

inline cudaStream_t current_stream() {
#if TORCH_TARGET_VERSION >= 0x020d000000000000
  return static_cast<cudaStream_t>(torch::stable::accelerator::getCurrentStream(current_device()).nativeHandle());
#else  // torch 2.11 and 2.12 (ADJOINTDEIS_TORCH_TARGET): their stable Stream has no native handle; the C shim does
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(current_device(), &stream));
  return static_cast<cudaStream_t>(stream);
#endif
}

// A guard on t's device when t is a CUDA tensor; none otherwise, so that the op's checks name t.
inline std::optional<torch::stable::accelerator::DeviceGuard> guard_device_of(const Tensor& t) {
  if (!t.is_cuda()) return std::nullopt;
  return std::optional<torch::stable::accelerator::DeviceGuard>(std::in_place, t.get_device_index());
}

template <typename scalar_t, int NumIn, int NumOut>
struct Arrays {
  const scalar_t* in[NumIn];
  scalar_t* out[NumOut];
};

// Op: a small struct of device pointers with `__device__ F bind() const`, where F (typically the
// op's coefficients, read once per thread from device memory) has
// `__device__ void operator()(const acc_t (&in)[NumIn], acc_t (&out)[NumOut]) const`.
template <typename scalar_t, int NumIn, int NumOut, int Width, typename Op>
__global__ void elementwise_kernel(Arrays<scalar_t, NumIn, NumOut> a, Op op, int64_t n) {
  using acc_t = opmath_t<scalar_t>;
  using P = Pack<scalar_t, Width>;
  const auto f = op.bind();
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / Width;
  for (int64_t i = start; i < packs; i += stride) {
    P in[NumIn], out[NumOut];
#pragma unroll
    for (int k = 0; k < NumIn; ++k) in[k] = reinterpret_cast<const P*>(a.in[k])[i];
#pragma unroll
    for (int j = 0; j < Width; ++j) {
      acc_t x[NumIn], y[NumOut];
#pragma unroll
      for (int k = 0; k < NumIn; ++k) x[k] = acc_t(in[k].v[j]);
      f(x, y);
#pragma unroll
      for (int k = 0; k < NumOut; ++k) out[k].v[j] = scalar_t(y[k]);
    }
#pragma unroll
    for (int k = 0; k < NumOut; ++k) reinterpret_cast<P*>(a.out[k])[i] = out[k];
  }
  for (int64_t i = packs * Width + start; i < n; i += stride) {
    acc_t x[NumIn], y[NumOut];
#pragma unroll
    for (int k = 0; k < NumIn; ++k) x[k] = acc_t(a.in[k][i]);
    f(x, y);
#pragma unroll
    for (int k = 0; k < NumOut; ++k) a.out[k][i] = scalar_t(y[k]);
  }
}

// Runs op over n elements of the arrays on the current device and stream.
template <typename scalar_t, int NumIn, int NumOut, typename Op>
void launch_elementwise(const Arrays<scalar_t, NumIn, NumOut>& a, const Op& op, int64_t n) {
  bool aligned = true;
  for (int k = 0; k < NumIn; ++k) aligned = aligned && all_aligned_16(a.in[k]);
  for (int k = 0; k < NumOut; ++k) aligned = aligned && all_aligned_16(a.out[k]);
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const int width = aligned ? kWidth : 1;
  const int blocks = grid_size((n + width - 1) / width, current_device());
  if (aligned) {
    elementwise_kernel<scalar_t, NumIn, NumOut, kWidth><<<blocks, kThreads, 0, current_stream()>>>(a, op, n);
  } else {
    elementwise_kernel<scalar_t, NumIn, NumOut, 1><<<blocks, kThreads, 0, current_stream()>>>(a, op, n);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace adjointdeis
