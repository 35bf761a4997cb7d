// CPU kernel of the fused multistep step: one pass over memory, a multiversioned (AVX-512 /
// AVX2 / baseline) vectorised loop, parallel over chunks of the flattened operands.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../multistep_step.h"
#include "multiversion.h"

namespace adjointdeis {
namespace {

constexpr int64_t kGrainSize = 32768;

template <typename scalar_t, int NumHistory, bool HasNoise>
ADJOINTDEIS_CPU_LOOP void step_range(const StepCoeffs<at::opmath_type<scalar_t>> k,
                                     const scalar_t* __restrict x, const scalar_t* __restrict out,
                                     const scalar_t* __restrict m1, const scalar_t* __restrict m2,
                                     const scalar_t* __restrict noise, scalar_t* __restrict x_next,
                                     scalar_t* __restrict m0, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    opmath_t xn, mn;
    multistep_step_element<NumHistory, HasNoise, opmath_t>(
        k, opmath_t(x[i]), opmath_t(out[i]), NumHistory >= 1 ? opmath_t(m1[i]) : opmath_t(0),
        NumHistory >= 2 ? opmath_t(m2[i]) : opmath_t(0), HasNoise ? opmath_t(noise[i]) : opmath_t(0),
        xn, mn);
    x_next[i] = scalar_t(xn);
    m0[i] = scalar_t(mn);
  }
}

template <typename scalar_t, int NumHistory, bool HasNoise>
void run_step(const StepOperands& ops) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto k = StepCoeffs<opmath_t>::load(ops.coeffs.data_ptr<double>());
  const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
  const scalar_t* out = ops.out.const_data_ptr<scalar_t>();
  const scalar_t* m1 = NumHistory >= 1 ? ops.m1.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* m2 = NumHistory >= 2 ? ops.m2.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* noise = HasNoise ? ops.noise.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* x_next = ops.x_next.mutable_data_ptr<scalar_t>();
  scalar_t* m0 = ops.m0.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, ops.x.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    step_range<scalar_t, NumHistory, HasNoise>(k, x, out, m1, m2, noise, x_next, m0, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> multistep_step_cpu(
    const at::Tensor& x, const at::Tensor& out, at::TensorList history,
    const at::Tensor& coeffs, const std::optional<at::Tensor>& noise) {
  StepOperands ops =
      prepare_multistep_step(x, out, history, coeffs, noise, c10::DeviceType::CPU);
  if (ops.x.numel() > 0) {
    ADJOINTDEIS_DISPATCH_FLOATING_TYPES(ops.x.scalar_type(), "multistep_step_cpu", [&] {
      dispatch_step_variant(ops.num_history, ops.has_noise, [&](auto nh, auto noisy) {
        run_step<scalar_t, decltype(nh)::value, decltype(noisy)::value>(ops);
      });
    });
  }
  return {ops.x_next, ops.m0};
}

}  // namespace

TORCH_LIBRARY_IMPL(adjointdeis, CPU, m) {
  m.impl("multistep_step", &multistep_step_cpu);
}

}  // namespace adjointdeis
