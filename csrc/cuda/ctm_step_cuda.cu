// CUDA kernel of the fused consistency-trajectory step: grid-stride loop, 16-byte vector loads
// and stores when every operand is aligned, coefficients read from device memory (no sync).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "elementwise.cuh"

#include "../ctm_step.h"

namespace adjointdeis {
namespace {

using cuda::kThreads;
using cuda::load_pack;
using cuda::Pack;

template <typename scalar_t>
struct CtmPointers {
  const scalar_t* x;
  const scalar_t* g;
  const scalar_t* noise;
  scalar_t* x_next;
};

template <typename scalar_t, bool HasNoise, int Width>
__global__ void ctm_step_kernel(CtmPointers<scalar_t> ptr, const double* coeffs, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto k = CtmCoeffs<opmath_t>::load(coeffs);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / Width;

  for (int64_t i = start; i < packs; i += stride) {
    using P = Pack<scalar_t, Width>;
    const P x = load_pack<Width>(ptr.x, i);
    const P g = load_pack<Width>(ptr.g, i);
    P noise{};
    if constexpr (HasNoise) noise = load_pack<Width>(ptr.noise, i);
    P x_next;
#pragma unroll
    for (int j = 0; j < Width; ++j) {
      x_next.v[j] = scalar_t(ctm_step_element<HasNoise, opmath_t>(
          k, opmath_t(x.v[j]), opmath_t(g.v[j]), opmath_t(noise.v[j])));
    }
    reinterpret_cast<P*>(ptr.x_next)[i] = x_next;
  }
  for (int64_t i = packs * Width + start; i < n; i += stride) {
    ptr.x_next[i] = scalar_t(ctm_step_element<HasNoise, opmath_t>(
        k, opmath_t(ptr.x[i]), opmath_t(ptr.g[i]), HasNoise ? opmath_t(ptr.noise[i]) : opmath_t(0)));
  }
}

template <typename scalar_t, bool HasNoise>
void launch_ctm(const CtmOperands& ops) {
  CtmPointers<scalar_t> ptr{ops.x.const_data_ptr<scalar_t>(), ops.g.const_data_ptr<scalar_t>(),
                            HasNoise ? ops.noise.const_data_ptr<scalar_t>() : nullptr,
                            ops.x_next.mutable_data_ptr<scalar_t>()};
  const bool vectorisable = cuda::all_aligned_16(ptr.x, ptr.g, ptr.noise, ptr.x_next);
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const int64_t n = ops.x.numel();
  const int width = vectorisable ? kWidth : 1;
  const int blocks = cuda::grid_size((n + width - 1) / width, ops.x.device().index());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const double* coeffs = ops.coeffs.const_data_ptr<double>();
  if (vectorisable) {
    ctm_step_kernel<scalar_t, HasNoise, kWidth><<<blocks, kThreads, 0, stream>>>(ptr, coeffs, n);
  } else {
    ctm_step_kernel<scalar_t, HasNoise, 1><<<blocks, kThreads, 0, stream>>>(ptr, coeffs, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ctm_step_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& coeffs,
                         const std::optional<at::Tensor>& noise) {
  const c10::cuda::CUDAGuard guard(x.device());
  CtmOperands ops = prepare_ctm_step(x, g, coeffs, noise, c10::DeviceType::CUDA);
  if (ops.x.numel() > 0) {
    ADJOINTDEIS_DISPATCH_FLOATING_TYPES(ops.x.scalar_type(), "ctm_step_cuda", [&] {
      dispatch_noise_variant(ops.has_noise, [&](auto noisy) {
        launch_ctm<scalar_t, decltype(noisy)::value>(ops);
      });
    });
  }
  return ops.x_next;
}

}  // namespace

TORCH_LIBRARY_IMPL(adjointdeis, CUDA, m) {
  m.impl("ctm_step", &ctm_step_cuda);
}

}  // namespace adjointdeis
