// CUDA kernel of the fused discrete-adjoint update: the shared elementwise kernel (elementwise.cuh)
// with the row of step_math.h; coefficients read from device memory (no sync).
#include "elementwise.cuh"

#include "../discrete_adjoint_step.h"

namespace adjointdeis {
namespace {

// Inputs xbar, vjp, gfull[, pend1][, pend2]; outputs xbar_prev, gfull_prev, cot_prev, pend_prev.
template <typename acc_t, bool HasPend1, bool HasPend2>
struct AdjointFunction {
  static constexpr int kIn = 3 + (HasPend1 ? 1 : 0) + (HasPend2 ? 1 : 0), kOut = 4;
  const double* coeffs;

  struct Bound {
    AdjointCoeffs<acc_t> k;
    __device__ void operator()(const acc_t (&in)[kIn], acc_t (&out)[kOut]) const {
      acc_t pend1 = acc_t(0), pend2 = acc_t(0);
      if constexpr (HasPend1) pend1 = in[3];
      if constexpr (HasPend2) pend2 = in[kIn - 1];
      discrete_adjoint_element<HasPend1, HasPend2, acc_t>(k, in[0], in[1], in[2], pend1, pend2, out[0], out[1],
                                                          out[2], out[3]);
    }
  };
  __device__ Bound bind() const { return {AdjointCoeffs<acc_t>::load(coeffs)}; }
};

template <typename scalar_t, bool HasPend1, bool HasPend2>
void launch_adjoint(const AdjointOperands& ops) {
  using F = AdjointFunction<opmath_t<scalar_t>, HasPend1, HasPend2>;
  cuda::Arrays<scalar_t, F::kIn, F::kOut> a{};
  a.in[0] = ops.xbar.const_data_ptr<scalar_t>();
  a.in[1] = ops.vjp.const_data_ptr<scalar_t>();
  a.in[2] = ops.gfull.const_data_ptr<scalar_t>();
  if constexpr (HasPend1) a.in[3] = ops.pend1.const_data_ptr<scalar_t>();
  if constexpr (HasPend2) a.in[F::kIn - 1] = ops.pend2.const_data_ptr<scalar_t>();
  a.out[0] = ops.xbar_prev.mutable_data_ptr<scalar_t>();
  a.out[1] = ops.gfull_prev.mutable_data_ptr<scalar_t>();
  a.out[2] = ops.cot_prev.mutable_data_ptr<scalar_t>();
  a.out[3] = ops.pend_prev.mutable_data_ptr<scalar_t>();
  cuda::launch_elementwise(a, F{ops.coeffs.const_data_ptr<double>()}, ops.xbar.numel());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> discrete_adjoint_step_cuda(const Tensor& xbar, const Tensor& vjp,
                                                                      const Tensor& gfull,
                                                                      const std::optional<Tensor>& pend1,
                                                                      const std::optional<Tensor>& pend2,
                                                                      const Tensor& coeffs) {
  const auto guard = cuda::guard_device_of(xbar);
  AdjointOperands ops = prepare_discrete_adjoint_step(xbar, vjp, gfull, pend1, pend2, coeffs, DeviceType::CUDA);
  if (ops.xbar.numel() > 0) {
    dispatch_step_types(ops.xbar.scalar_type(), "discrete_adjoint_step", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      dispatch_adjoint_variant(ops.has_pend1, ops.has_pend2, [&](auto p1, auto p2) {
        launch_adjoint<scalar_t, decltype(p1)::value, decltype(p2)::value>(ops);
      });
    });
  }
  return {ops.xbar_prev, ops.gfull_prev, ops.cot_prev, ops.pend_prev};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CUDA, m) {
  m.impl("discrete_adjoint_step", TORCH_BOX(&discrete_adjoint_step_cuda));
}

}  // namespace adjointdeis
