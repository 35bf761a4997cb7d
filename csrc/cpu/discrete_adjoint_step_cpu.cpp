// CPU kernel of the fused discrete-adjoint update: one pass over memory, a multiversioned
// (AVX-512 / AVX2 / baseline) vectorised loop, parallel over chunks of the flattened operands.
#include "../discrete_adjoint_step.h"
#include "multiversion.h"

namespace adjointdeis {
namespace {

constexpr int64_t kGrainSize = 32768;

template <typename scalar_t, bool HasPend1, bool HasPend2>
ADJOINTDEIS_CPU_LOOP void adjoint_range(const AdjointCoeffs<opmath_t<scalar_t>> k, const scalar_t* __restrict xbar,
                                        const scalar_t* __restrict vjp, const scalar_t* __restrict gfull,
                                        const scalar_t* __restrict pend1, const scalar_t* __restrict pend2,
                                        scalar_t* __restrict xbar_prev, scalar_t* __restrict gfull_prev,
                                        scalar_t* __restrict cot_prev, scalar_t* __restrict pend_prev, int64_t begin,
                                        int64_t end) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    acc_t xp, gp, cp, pp;
    discrete_adjoint_element<HasPend1, HasPend2, acc_t>(
        k, acc_t(xbar[i]), acc_t(vjp[i]), acc_t(gfull[i]), HasPend1 ? acc_t(pend1[i]) : acc_t(0),
        HasPend2 ? acc_t(pend2[i]) : acc_t(0), xp, gp, cp, pp);
    xbar_prev[i] = scalar_t(xp);
    gfull_prev[i] = scalar_t(gp);
    cot_prev[i] = scalar_t(cp);
    pend_prev[i] = scalar_t(pp);
  }
}

template <typename scalar_t, bool HasPend1, bool HasPend2>
void run_adjoint(const AdjointOperands& ops) {
  const auto k = AdjointCoeffs<opmath_t<scalar_t>>::load(ops.coeffs.const_data_ptr<double>());
  const scalar_t* xbar = ops.xbar.const_data_ptr<scalar_t>();
  const scalar_t* vjp = ops.vjp.const_data_ptr<scalar_t>();
  const scalar_t* gfull = ops.gfull.const_data_ptr<scalar_t>();
  const scalar_t* pend1 = HasPend1 ? ops.pend1.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* pend2 = HasPend2 ? ops.pend2.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* xbar_prev = ops.xbar_prev.mutable_data_ptr<scalar_t>();
  scalar_t* gfull_prev = ops.gfull_prev.mutable_data_ptr<scalar_t>();
  scalar_t* cot_prev = ops.cot_prev.mutable_data_ptr<scalar_t>();
  scalar_t* pend_prev = ops.pend_prev.mutable_data_ptr<scalar_t>();
  torch::stable::parallel_for(0, ops.xbar.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    adjoint_range<scalar_t, HasPend1, HasPend2>(k, xbar, vjp, gfull, pend1, pend2, xbar_prev, gfull_prev, cot_prev,
                                                pend_prev, begin, end);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> discrete_adjoint_step_cpu(const Tensor& xbar, const Tensor& vjp,
                                                                     const Tensor& gfull,
                                                                     const std::optional<Tensor>& pend1,
                                                                     const std::optional<Tensor>& pend2,
                                                                     const Tensor& coeffs) {
  AdjointOperands ops = prepare_discrete_adjoint_step(xbar, vjp, gfull, pend1, pend2, coeffs, DeviceType::CPU);
  if (ops.xbar.numel() > 0) {
    dispatch_step_types(ops.xbar.scalar_type(), "discrete_adjoint_step", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      dispatch_adjoint_variant(ops.has_pend1, ops.has_pend2, [&](auto p1, auto p2) {
        run_adjoint<scalar_t, decltype(p1)::value, decltype(p2)::value>(ops);
      });
    });
  }
  return {ops.xbar_prev, ops.gfull_prev, ops.cot_prev, ops.pend_prev};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CPU, m) {
  m.impl("discrete_adjoint_step", TORCH_BOX(&discrete_adjoint_step_cpu));
}

}  // namespace adjointdeis
