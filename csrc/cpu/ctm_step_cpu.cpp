// CPU kernel of the fused consistency-trajectory step: one pass over memory, a multiversioned
// (AVX-512 / AVX2 / baseline) vectorised loop, parallel over chunks of the flattened operands.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ctm_step.h"
#include "multiversion.h"

namespace adjointdeis {
namespace {

constexpr int64_t kGrainSize = 32768;

template <typename scalar_t, bool HasNoise>
ADJOINTDEIS_CPU_LOOP void ctm_range(const CtmCoeffs<at::opmath_type<scalar_t>> k,
                                    const scalar_t* __restrict x, const scalar_t* __restrict g,
                                    const scalar_t* __restrict noise, scalar_t* __restrict x_next,
                                    int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    x_next[i] = scalar_t(ctm_step_element<HasNoise, opmath_t>(
        k, opmath_t(x[i]), opmath_t(g[i]), HasNoise ? opmath_t(noise[i]) : opmath_t(0)));
  }
}

template <typename scalar_t, bool HasNoise>
void run_ctm(const CtmOperands& ops) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto k = CtmCoeffs<opmath_t>::load(ops.coeffs.data_ptr<double>());
  const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
  const scalar_t* g = ops.g.const_data_ptr<scalar_t>();
  const scalar_t* noise = HasNoise ? ops.noise.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* x_next = ops.x_next.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, ops.x.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    ctm_range<scalar_t, HasNoise>(k, x, g, noise, x_next, begin, end);
  });
}

at::Tensor ctm_step_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& coeffs,
                        const std::optional<at::Tensor>& noise) {
  CtmOperands ops = prepare_ctm_step(x, g, coeffs, noise, c10::DeviceType::CPU);
  if (ops.x.numel() > 0) {
    ADJOINTDEIS_DISPATCH_FLOATING_TYPES(ops.x.scalar_type(), "ctm_step_cpu", [&] {
      dispatch_noise_variant(ops.has_noise, [&](auto noisy) {
        run_ctm<scalar_t, decltype(noisy)::value>(ops);
      });
    });
  }
  return ops.x_next;
}

}  // namespace

TORCH_LIBRARY_IMPL(adjointdeis, CPU, m) {
  m.impl("ctm_step", &ctm_step_cpu);
}

}  // namespace adjointdeis
