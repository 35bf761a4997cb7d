// CPU kernel of the fused discrete-adjoint update: one pass over memory, vectorised inner
// loop, parallel over chunks of the flattened operands.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../discrete_adjoint_step.h"

namespace adjointdeis {
namespace {

constexpr int64_t kGrainSize = 32768;

template <typename scalar_t, bool HasPend1, bool HasPend2>
void run_adjoint(const AdjointOperands& ops) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto k = AdjointCoeffs<opmath_t>::load(ops.coeffs.data_ptr<double>());
  const scalar_t* xbar = ops.xbar.const_data_ptr<scalar_t>();
  const scalar_t* vjp = ops.vjp.const_data_ptr<scalar_t>();
  const scalar_t* gfull = ops.gfull.const_data_ptr<scalar_t>();
  const scalar_t* pend1 = HasPend1 ? ops.pend1.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* pend2 = HasPend2 ? ops.pend2.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* xbar_prev = ops.xbar_prev.mutable_data_ptr<scalar_t>();
  scalar_t* gfull_prev = ops.gfull_prev.mutable_data_ptr<scalar_t>();
  scalar_t* cot_prev = ops.cot_prev.mutable_data_ptr<scalar_t>();
  scalar_t* pend_prev = ops.pend_prev.mutable_data_ptr<scalar_t>();

  auto scalar_range = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      opmath_t xp, gp, cp, pp;
      discrete_adjoint_element<HasPend1, HasPend2, opmath_t>(
          k, opmath_t(xbar[i]), opmath_t(vjp[i]), opmath_t(gfull[i]),
          HasPend1 ? opmath_t(pend1[i]) : opmath_t(0),
          HasPend2 ? opmath_t(pend2[i]) : opmath_t(0), xp, gp, cp, pp);
      xbar_prev[i] = scalar_t(xp);
      gfull_prev[i] = scalar_t(gp);
      cot_prev[i] = scalar_t(cp);
      pend_prev[i] = scalar_t(pp);
    }
  };

  at::parallel_for(0, ops.xbar.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      using Vec = at::vec::Vectorized<scalar_t>;
      constexpr int64_t kWidth = Vec::size();
      const AdjointCoeffs<Vec> kv{Vec(k.a),  Vec(k.p),       Vec(k.b1),
                                  Vec(k.b2), Vec(k.b0_prev), Vec(k.q_prev)};
      const Vec zero(scalar_t(0));
      int64_t i = begin;
      for (; i + kWidth <= end; i += kWidth) {
        Vec xp, gp, cp, pp;
        discrete_adjoint_element<HasPend1, HasPend2, Vec>(
            kv, Vec::loadu(xbar + i), Vec::loadu(vjp + i), Vec::loadu(gfull + i),
            HasPend1 ? Vec::loadu(pend1 + i) : zero, HasPend2 ? Vec::loadu(pend2 + i) : zero,
            xp, gp, cp, pp);
        xp.store(xbar_prev + i);
        gp.store(gfull_prev + i);
        cp.store(cot_prev + i);
        pp.store(pend_prev + i);
      }
      scalar_range(i, end);
    } else {
      scalar_range(begin, end);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> discrete_adjoint_step_cpu(
    const at::Tensor& xbar, const at::Tensor& vjp, const at::Tensor& gfull,
    const std::optional<at::Tensor>& pend1, const std::optional<at::Tensor>& pend2,
    const at::Tensor& coeffs) {
  AdjointOperands ops = prepare_discrete_adjoint_step(xbar, vjp, gfull, pend1, pend2, coeffs,
                                                      c10::DeviceType::CPU);
  if (ops.xbar.numel() > 0) {
    ADJOINTDEIS_DISPATCH_FLOATING_TYPES(ops.xbar.scalar_type(), "discrete_adjoint_step_cpu", [&] {
      dispatch_adjoint_variant(ops.has_pend1, ops.has_pend2, [&](auto p1, auto p2) {
        run_adjoint<scalar_t, decltype(p1)::value, decltype(p2)::value>(ops);
      });
    });
  }
  return {ops.xbar_prev, ops.gfull_prev, ops.cot_prev, ops.pend_prev};
}

}  // namespace

TORCH_LIBRARY_IMPL(adjointdeis, CPU, m) {
  m.impl("discrete_adjoint_step", &discrete_adjoint_step_cpu);
}

}  // namespace adjointdeis
