// CUDA kernel of the fused multistep step: grid-stride loop, 16-byte vector loads and
// stores when every operand is aligned, coefficients read from device memory (no sync).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "elementwise.cuh"

#include "../multistep_step.h"

namespace adjointdeis {
namespace {

using cuda::kThreads;
using cuda::load_pack;
using cuda::Pack;


template <typename scalar_t>
struct StepPointers {
  const scalar_t* x;
  const scalar_t* out;
  const scalar_t* m1;
  const scalar_t* m2;
  const scalar_t* noise;
  scalar_t* x_next;
  scalar_t* m0;
};

template <typename scalar_t, int NumHistory, bool HasNoise, int Width>
__global__ void multistep_step_kernel(StepPointers<scalar_t> ptr, const double* coeffs,
                                      int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto k = StepCoeffs<opmath_t>::load(coeffs);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / Width;

  for (int64_t i = start; i < packs; i += stride) {
    using P = Pack<scalar_t, Width>;
    const P x = load_pack<Width>(ptr.x, i);
    const P out = load_pack<Width>(ptr.out, i);
    P m1{}, m2{}, noise{};
    if constexpr (NumHistory >= 1) m1 = load_pack<Width>(ptr.m1, i);
    if constexpr (NumHistory >= 2) m2 = load_pack<Width>(ptr.m2, i);
    if constexpr (HasNoise) noise = load_pack<Width>(ptr.noise, i);
    P x_next, m0;
#pragma unroll
    for (int j = 0; j < Width; ++j) {
      opmath_t xn, mn;
      multistep_step_element<NumHistory, HasNoise, opmath_t>(
          k, opmath_t(x.v[j]), opmath_t(out.v[j]), opmath_t(m1.v[j]), opmath_t(m2.v[j]),
          opmath_t(noise.v[j]), xn, mn);
      x_next.v[j] = scalar_t(xn);
      m0.v[j] = scalar_t(mn);
    }
    reinterpret_cast<P*>(ptr.x_next)[i] = x_next;
    reinterpret_cast<P*>(ptr.m0)[i] = m0;
  }
  for (int64_t i = packs * Width + start; i < n; i += stride) {
    opmath_t xn, mn;
    multistep_step_element<NumHistory, HasNoise, opmath_t>(
        k, opmath_t(ptr.x[i]), opmath_t(ptr.out[i]),
        NumHistory >= 1 ? opmath_t(ptr.m1[i]) : opmath_t(0),
        NumHistory >= 2 ? opmath_t(ptr.m2[i]) : opmath_t(0),
        HasNoise ? opmath_t(ptr.noise[i]) : opmath_t(0), xn, mn);
    ptr.x_next[i] = scalar_t(xn);
    ptr.m0[i] = scalar_t(mn);
  }
}

template <typename scalar_t, int NumHistory, bool HasNoise>
void launch_step(const StepOperands& ops) {
  StepPointers<scalar_t> ptr{
      ops.x.const_data_ptr<scalar_t>(),
      ops.out.const_data_ptr<scalar_t>(),
      NumHistory >= 1 ? ops.m1.const_data_ptr<scalar_t>() : nullptr,
      NumHistory >= 2 ? ops.m2.const_data_ptr<scalar_t>() : nullptr,
      HasNoise ? ops.noise.const_data_ptr<scalar_t>() : nullptr,
      ops.x_next.mutable_data_ptr<scalar_t>(),
      ops.m0.mutable_data_ptr<scalar_t>()};
  const bool vectorisable = cuda::all_aligned_16(ptr.x, ptr.out, ptr.m1, ptr.m2, ptr.noise,
                                                 ptr.x_next, ptr.m0);
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const int64_t n = ops.x.numel();
  const int width = vectorisable ? kWidth : 1;
  const int64_t work = (n + width - 1) / width;
  const int blocks = cuda::grid_size(work, ops.x.device().index());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const double* coeffs = ops.coeffs.const_data_ptr<double>();
  if (vectorisable) {
    multistep_step_kernel<scalar_t, NumHistory, HasNoise, kWidth>
        <<<blocks, kThreads, 0, stream>>>(ptr, coeffs, n);
  } else {
    multistep_step_kernel<scalar_t, NumHistory, HasNoise, 1>
        <<<blocks, kThreads, 0, stream>>>(ptr, coeffs, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> multistep_step_cuda(
    const at::Tensor& x, const at::Tensor& out, at::TensorList history,
    const at::Tensor& coeffs, const std::optional<at::Tensor>& noise) {
  const c10::cuda::CUDAGuard guard(x.device());
  StepOperands ops =
      prepare_multistep_step(x, out, history, coeffs, noise, c10::DeviceType::CUDA);
  if (ops.x.numel() > 0) {
    ADJOINTDEIS_DISPATCH_FLOATING_TYPES(ops.x.scalar_type(), "multistep_step_cuda", [&] {
      dispatch_step_variant(ops.num_history, ops.has_noise, [&](auto nh, auto noisy) {
        launch_step<scalar_t, decltype(nh)::value, decltype(noisy)::value>(ops);
      });
    });
  }
  return {ops.x_next, ops.m0};
}

#define ADJOINTDEIS_STRINGIFY_(...) #__VA_ARGS__
#define ADJOINTDEIS_STRINGIFY(...) ADJOINTDEIS_STRINGIFY_(__VA_ARGS__)

const bool cuda_build_registered = [] {
#ifdef __CUDA_ARCH_LIST__
  register_cuda_build(CUDA_VERSION, ADJOINTDEIS_STRINGIFY(__CUDA_ARCH_LIST__));
#else
  register_cuda_build(CUDA_VERSION, "");
#endif
  return true;
}();

}  // namespace

TORCH_LIBRARY_IMPL(adjointdeis, CUDA, m) {
  m.impl("multistep_step", &multistep_step_cuda);
}

}  // namespace adjointdeis
