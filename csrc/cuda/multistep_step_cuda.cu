// CUDA kernel of the fused multistep step: the shared elementwise kernel (elementwise.cuh) with the
// step of step_math.h; coefficients read from device memory (no sync).
#include <cuda.h>

#include "elementwise.cuh"

#include "../build.h"
#include "../multistep_step.h"

namespace adjointdeis {
namespace {

// Inputs x, out, m1..m_NumHistory[, noise]; outputs x_next[, m0]. finite: null, or a flag set to false when an
// element of x_next (as stored, in scalar_t) is NaN or infinite.
template <typename scalar_t, int NumHistory, bool HasNoise, bool SaveM0>
struct StepFunction {
  using acc_t = opmath_t<scalar_t>;
  static constexpr int kIn = 2 + NumHistory + (HasNoise ? 1 : 0), kOut = SaveM0 ? 2 : 1;
  const double* coeffs;
  bool* finite;

  struct Bound {
    StepCoeffs<acc_t> k;
    bool* finite;
    __device__ void operator()(const acc_t (&in)[kIn], acc_t (&out)[kOut]) const {
      acc_t m[kMaxHistory] = {};
#pragma unroll
      for (int j = 0; j < NumHistory; ++j) m[j] = in[2 + j];
      acc_t noise = acc_t(0);
      if constexpr (HasNoise) noise = in[kIn - 1];
      acc_t m0;
      multistep_step_element<NumHistory, HasNoise, acc_t>(k, in[0], in[1], m, noise, out[0], m0);
      if constexpr (SaveM0) out[1] = m0;
      if (finite != nullptr && !isfinite(acc_t(scalar_t(out[0])))) *finite = false;
    }
  };
  __device__ Bound bind() const { return {StepCoeffs<acc_t>::template load<NumHistory>(coeffs), finite}; }
};

template <typename scalar_t, int NumHistory, bool HasNoise, bool SaveM0>
void launch_step(const StepOperands& ops) {
  using F = StepFunction<scalar_t, NumHistory, HasNoise, SaveM0>;
  cuda::Arrays<scalar_t, F::kIn, F::kOut> a{};
  a.in[0] = ops.x.const_data_ptr<scalar_t>();
  a.in[1] = ops.out.const_data_ptr<scalar_t>();
  for (int j = 0; j < NumHistory; ++j) a.in[2 + j] = ops.history[j].template const_data_ptr<scalar_t>();
  if constexpr (HasNoise) a.in[F::kIn - 1] = ops.noise.const_data_ptr<scalar_t>();
  a.out[0] = ops.x_next.mutable_data_ptr<scalar_t>();
  if constexpr (SaveM0) a.out[1] = ops.m0.mutable_data_ptr<scalar_t>();
  bool* finite = ops.check_finite ? static_cast<bool*>(ops.finite.mutable_data_ptr()) : nullptr;
  cuda::launch_elementwise(a, F{ops.coeffs.const_data_ptr<double>(), finite}, ops.x.numel());
}

// The kernel for the operands' dtype and variant.
void step(const StepOperands& ops) {
  if (ops.x.numel() == 0) return;
  dispatch_step_types(ops.x.scalar_type(), "multistep_step", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    dispatch_step_variant(ops.history.size(), ops.has_noise, ops.save_m0, [&](auto nh, auto noisy, auto save) {
      launch_step<scalar_t, decltype(nh)::value, decltype(noisy)::value, decltype(save)::value>(ops);
    });
  });
}

std::tuple<Tensor, Tensor> multistep_step_cuda(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                                               const Tensor& coeffs, const std::optional<Tensor>& noise,
                                               bool save_m0) {
  const auto guard = cuda::guard_device_of(x);
  const StepOperands ops = prepare_multistep_step(x, out, history, coeffs, noise, save_m0, DeviceType::CUDA);
  step(ops);
  return {ops.x_next, ops.m0};
}

void multistep_step_out_cuda(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                             const Tensor& coeffs, const std::optional<Tensor>& noise, const Tensor& x_next,
                             const std::optional<Tensor>& m0, const std::optional<Tensor>& finite) {
  const auto guard = cuda::guard_device_of(x);
  step(prepare_multistep_step_out(x, out, history, coeffs, noise, x_next, m0, finite, DeviceType::CUDA));
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

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CUDA, m) {
  m.impl("multistep_step", TORCH_BOX(&multistep_step_cuda));
  m.impl("multistep_step_out", TORCH_BOX(&multistep_step_out_cuda));
}

}  // namespace adjointdeis
