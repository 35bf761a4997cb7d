// CPU kernel of the fused multistep step: one pass over memory, a multiversioned (AVX-512 /
// AVX2 / baseline) vectorised loop, parallel over chunks of the flattened operands, the same loop whether an
// output is written in place of an input or not; in blocks through L1 when x_next's finiteness is asked for.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../multistep_step.h"
#include "multiversion.h"

namespace adjointdeis {
namespace {

constexpr int64_t kGrainSize = 32768;

// x_next and m0 may each be one of the inputs itself (the same elements: operands.cpp checks that an output is an
// input or shares no memory with any), so the pointers are not __restrict; iteration i reads element i of every
// input before it writes element i of the outputs, and no iteration touches another's elements.
template <typename scalar_t, int NumHistory, bool HasNoise, bool SaveM0>
ADJOINTDEIS_CPU_LOOP void step_range(const StepCoeffs<opmath_t<scalar_t>> k, const scalar_t* x, const scalar_t* out,
                                     const scalar_t* m1, const scalar_t* m2, const scalar_t* m3,
                                     const scalar_t* noise, scalar_t* x_next, scalar_t* m0, int64_t begin,
                                     int64_t end) {
  using acc_t = opmath_t<scalar_t>;
  ADJOINTDEIS_NO_CARRIED
  for (int64_t i = begin; i < end; ++i) {
    const acc_t m[3] = {NumHistory >= 1 ? acc_t(m1[i]) : acc_t(0), NumHistory >= 2 ? acc_t(m2[i]) : acc_t(0),
                        NumHistory >= 3 ? acc_t(m3[i]) : acc_t(0)};
    acc_t xn, mn;
    multistep_step_element<NumHistory, HasNoise, acc_t>(k, acc_t(x[i]), acc_t(out[i]), m,
                                                        HasNoise ? acc_t(noise[i]) : acc_t(0), xn, mn);
    x_next[i] = scalar_t(xn);
    if constexpr (SaveM0) m0[i] = scalar_t(mn);
  }
}

// The bits of a step dtype and its exponent field: a value is NaN or infinite exactly when that field is all ones.
template <typename scalar_t>
struct FloatBits;
template <>
struct FloatBits<double> {
  using type = uint64_t;
  static constexpr type exponent = 0x7ff0000000000000ull;
};
template <>
struct FloatBits<float> {
  using type = uint32_t;
  static constexpr type exponent = 0x7f800000u;
};
template <>
struct FloatBits<Half> {
  using type = uint16_t;
  static constexpr type exponent = 0x7c00u;
};
template <>
struct FloatBits<BFloat16> {
  using type = uint16_t;
  static constexpr type exponent = 0x7f80u;
};

// Whether p[0, n) holds neither NaN nor infinity: the largest magnitude's bits (sign cleared) against the
// exponent field's, an integer max that vectorises. A separate pass over a block in L1 rather than a test inside
// step_range: another instantiation of that loop may contract its multiply-adds differently, and the flag must not
// change a bit of x_next.
template <typename scalar_t>
ADJOINTDEIS_CPU_LOOP bool finite_range(const scalar_t* __restrict p, int64_t n) {
  using bits_t = typename FloatBits<scalar_t>::type;
  constexpr bits_t exponent = FloatBits<scalar_t>::exponent;
  constexpr bits_t magnitude = std::numeric_limits<bits_t>::max() >> 1;  // every bit but the sign
  static_assert(sizeof(bits_t) == sizeof(scalar_t));
  bits_t largest = 0;
  for (int64_t i = 0; i < n; ++i) {
    bits_t bits;
    std::memcpy(&bits, p + i, sizeof bits);
    largest = std::max<bits_t>(largest, bits & magnitude);
  }
  return largest < exponent;
}

template <typename T>
T* shifted(T* p, int64_t by) {
  return p ? p + by : p;
}

template <typename scalar_t, int NumHistory, bool HasNoise, bool SaveM0>
void run_step(const StepOperands& ops) {
  const auto k = StepCoeffs<opmath_t<scalar_t>>::template load<NumHistory>(ops.coeffs.const_data_ptr<double>());
  const scalar_t* m[kMaxHistory] = {};
  for (int j = 0; j < NumHistory; ++j) m[j] = ops.history[j].template const_data_ptr<scalar_t>();
  const scalar_t* x = ops.x.const_data_ptr<scalar_t>();
  const scalar_t* out = ops.out.const_data_ptr<scalar_t>();
  const scalar_t* noise = HasNoise ? ops.noise.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* x_next = ops.x_next.mutable_data_ptr<scalar_t>();
  scalar_t* m0 = SaveM0 ? ops.m0.mutable_data_ptr<scalar_t>() : nullptr;
  if (!ops.check_finite) {
    torch::stable::parallel_for(0, ops.x.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      step_range<scalar_t, NumHistory, HasNoise, SaveM0>(k, x, out, m[0], m[1], m[2], noise, x_next, m0, begin,
                                                         end);
    });
    return;
  }
  // In blocks that fit L1: the finiteness test reads each block of x_next while it is there, instead of a pass over
  // memory after the step.
  constexpr int64_t kBlock = 4096 / sizeof(scalar_t);
  std::atomic<bool> finite{true};
  torch::stable::parallel_for(0, ops.x.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    bool finite_here = true;
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = std::min(kBlock, end - b);
      step_range<scalar_t, NumHistory, HasNoise, SaveM0>(k, x + b, out + b, shifted(m[0], b), shifted(m[1], b),
                                                         shifted(m[2], b), shifted(noise, b), x_next + b,
                                                         shifted(m0, b), 0, n);
      if (finite_here) finite_here = finite_range(x_next + b, n);
    }
    if (!finite_here) finite.store(false, std::memory_order_relaxed);
  });
  if (!finite.load(std::memory_order_relaxed)) *static_cast<bool*>(ops.finite.mutable_data_ptr()) = false;
}

// The kernel for the operands' dtype and variant.
void step(const StepOperands& ops) {
  if (ops.x.numel() == 0) return;
  dispatch_step_types(ops.x.scalar_type(), "multistep_step", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    dispatch_step_variant(ops.history.size(), ops.has_noise, ops.save_m0, [&](auto nh, auto noisy, auto save) {
      run_step<scalar_t, decltype(nh)::value, decltype(noisy)::value, decltype(save)::value>(ops);
    });
  });
}

std::tuple<Tensor, Tensor> multistep_step_cpu(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                                              const Tensor& coeffs, const std::optional<Tensor>& noise,
                                              bool save_m0) {
  const StepOperands ops = prepare_multistep_step(x, out, history, coeffs, noise, save_m0, DeviceType::CPU);
  step(ops);
  return {ops.x_next, ops.m0};
}

void multistep_step_out_cpu(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                            const Tensor& coeffs, const std::optional<Tensor>& noise, const Tensor& x_next,
                            const std::optional<Tensor>& m0, const std::optional<Tensor>& finite) {
  step(prepare_multistep_step_out(x, out, history, coeffs, noise, x_next, m0, finite, DeviceType::CPU));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CPU, m) {
  m.impl("multistep_step", TORCH_BOX(&multistep_step_cpu));
  m.impl("multistep_step_out", TORCH_BOX(&multistep_step_out_cpu));
}

}  // namespace adjointdeis
