// CUDA kernel of the fused discrete-adjoint update: grid-stride loop, 16-byte vector loads
// and stores when every operand is aligned, coefficients read from device memory (no sync).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "elementwise.cuh"

#include <optional>

#include "../discrete_adjoint_step.h"

namespace adjointdeis {
namespace {

using cuda::kThreads;
using cuda::load_pack;
using cuda::Pack;


template <typename scalar_t>
struct AdjointPointers {
  const scalar_t* xbar;
  const scalar_t* vjp;
  const scalar_t* gfull;
  const scalar_t* pend1;
  const scalar_t* pend2;
  scalar_t* xbar_prev;
  scalar_t* gfull_prev;
  scalar_t* cot_prev;
  scalar_t* pend_prev;
};

template <typename scalar_t, bool HasPend1, bool HasPend2, int Width>
__global__ void discrete_adjoint_kernel(AdjointPointers<scalar_t> ptr, const double* coeffs,
                                        int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto k = AdjointCoeffs<opmath_t>::load(coeffs);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / Width;

  for (int64_t i = start; i < packs; i += stride) {
    using P = Pack<scalar_t, Width>;
    const P xbar = load_pack<Width>(ptr.xbar, i);
    const P vjp = load_pack<Width>(ptr.vjp, i);
    const P gfull = load_pack<Width>(ptr.gfull, i);
    P pend1{}, pend2{};
    if constexpr (HasPend1) pend1 = load_pack<Width>(ptr.pend1, i);
    if constexpr (HasPend2) pend2 = load_pack<Width>(ptr.pend2, i);
    P xbar_prev, gfull_prev, cot_prev, pend_prev;
#pragma unroll
    for (int j = 0; j < Width; ++j) {
      opmath_t xp, gp, cp, pp;
      discrete_adjoint_element<HasPend1, HasPend2, opmath_t>(
          k, opmath_t(xbar.v[j]), opmath_t(vjp.v[j]), opmath_t(gfull.v[j]),
          opmath_t(pend1.v[j]), opmath_t(pend2.v[j]), xp, gp, cp, pp);
      xbar_prev.v[j] = scalar_t(xp);
      gfull_prev.v[j] = scalar_t(gp);
      cot_prev.v[j] = scalar_t(cp);
      pend_prev.v[j] = scalar_t(pp);
    }
    reinterpret_cast<P*>(ptr.xbar_prev)[i] = xbar_prev;
    reinterpret_cast<P*>(ptr.gfull_prev)[i] = gfull_prev;
    reinterpret_cast<P*>(ptr.cot_prev)[i] = cot_prev;
    reinterpret_cast<P*>(ptr.pend_prev)[i] = pend_prev;
  }
  for (int64_t i = packs * Width + start; i < n; i += stride) {
    opmath_t xp, gp, cp, pp;
    discrete_adjoint_element<HasPend1, HasPend2, opmath_t>(
        k, opmath_t(ptr.xbar[i]), opmath_t(ptr.vjp[i]), opmath_t(ptr.gfull[i]),
        HasPend1 ? opmath_t(ptr.pend1[i]) : opmath_t(0),
        HasPend2 ? opmath_t(ptr.pend2[i]) : opmath_t(0), xp, gp, cp, pp);
    ptr.xbar_prev[i] = scalar_t(xp);
    ptr.gfull_prev[i] = scalar_t(gp);
    ptr.cot_prev[i] = scalar_t(cp);
    ptr.pend_prev[i] = scalar_t(pp);
  }
}

template <typename scalar_t, bool HasPend1, bool HasPend2>
void launch_adjoint(const AdjointOperands& ops) {
  AdjointPointers<scalar_t> ptr{
      ops.xbar.const_data_ptr<scalar_t>(),
      ops.vjp.const_data_ptr<scalar_t>(),
      ops.gfull.const_data_ptr<scalar_t>(),
      HasPend1 ? ops.pend1.const_data_ptr<scalar_t>() : nullptr,
      HasPend2 ? ops.pend2.const_data_ptr<scalar_t>() : nullptr,
      ops.xbar_prev.mutable_data_ptr<scalar_t>(),
      ops.gfull_prev.mutable_data_ptr<scalar_t>(),
      ops.cot_prev.mutable_data_ptr<scalar_t>(),
      ops.pend_prev.mutable_data_ptr<scalar_t>()};
  const bool vectorisable =
      cuda::all_aligned_16(ptr.xbar, ptr.vjp, ptr.gfull, ptr.pend1, ptr.pend2, ptr.xbar_prev,
                           ptr.gfull_prev, ptr.cot_prev, ptr.pend_prev);
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const int64_t n = ops.xbar.numel();
  const int width = vectorisable ? kWidth : 1;
  const int64_t work = (n + width - 1) / width;
  const int blocks = cuda::grid_size(work, ops.xbar.device().index());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const double* coeffs = ops.coeffs.const_data_ptr<double>();
  if (vectorisable) {
    discrete_adjoint_kernel<scalar_t, HasPend1, HasPend2, kWidth>
        <<<blocks, kThreads, 0, stream>>>(ptr, coeffs, n);
  } else {
    discrete_adjoint_kernel<scalar_t, HasPend1, HasPend2, 1>
        <<<blocks, kThreads, 0, stream>>>(ptr, coeffs, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> discrete_adjoint_step_cuda(
    const at::Tensor& xbar, const at::Tensor& vjp, const at::Tensor& gfull,
    const std::optional<at::Tensor>& pend1, const std::optional<at::Tensor>& pend2,
    const at::Tensor& coeffs) {
  // Optional so that a CPU xbar reaches the check that names it.
  const c10::cuda::OptionalCUDAGuard guard(
      xbar.is_cuda() ? std::make_optional(xbar.device()) : std::nullopt);
  AdjointOperands ops = prepare_discrete_adjoint_step(xbar, vjp, gfull, pend1, pend2, coeffs,
                                                      c10::DeviceType::CUDA);
  if (ops.xbar.numel() > 0) {
    ADJOINTDEIS_DISPATCH_FLOATING_TYPES(ops.xbar.scalar_type(), "discrete_adjoint_step_cuda", [&] {
      dispatch_adjoint_variant(ops.has_pend1, ops.has_pend2, [&](auto p1, auto p2) {
        launch_adjoint<scalar_t, decltype(p1)::value, decltype(p2)::value>(ops);
      });
    });
  }
  return {ops.xbar_prev, ops.gfull_prev, ops.cot_prev, ops.pend_prev};
}

}  // namespace

TORCH_LIBRARY_IMPL(adjointdeis, CUDA, m) {
  m.impl("discrete_adjoint_step", &discrete_adjoint_step_cuda);
}

}  // namespace adjointdeis
