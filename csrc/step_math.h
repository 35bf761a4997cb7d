// Per-element math of the fused multistep step, shared by the CPU and CUDA kernels.
//
// One solver step of every supported sampler has the form (MATH.md section 4)
//
//   m0     = p * x + q * out                                   (model output converted)
//   x_next = a * x + b0 * m0 + b1 * m1 + b2 * m2 + c * noise
//
// with scalars precomputed on the host. The functions are templated on the value
// type so that the CPU kernel instantiates them with at::vec::Vectorized<float> and
// the CUDA kernel with plain float/double: the formula is written once.
#pragma once

#include <c10/macros/Macros.h>

namespace adjointdeis {

// Layout of one row of the coefficient table: [a, b0, b1, b2, c, p, q].
enum StepCoeff : int { kA = 0, kB0, kB1, kB2, kC, kP, kQ, kNumStepCoeffs };

// Maximum number of previous converted outputs a step reads (3M / DEIS-3).
constexpr int kMaxHistory = 2;

template <typename T>
struct StepCoeffs {
  T a, b0, b1, b2, c, p, q;

  template <typename Scalar>
  C10_HOST_DEVICE static StepCoeffs load(const Scalar* row) {
    return {T(row[kA]), T(row[kB0]), T(row[kB1]), T(row[kB2]),
            T(row[kC]), T(row[kP]),  T(row[kQ])};
  }
};

// One element of the step. `NumHistory` previous outputs and an optional noise term
// are compile-time switches so the inner loops carry no branches.
template <int NumHistory, bool HasNoise, typename T>
C10_HOST_DEVICE inline void multistep_step_element(
    const StepCoeffs<T>& k, T x, T out, T m1, T m2, T noise, T& x_next, T& m0) {
  m0 = k.p * x + k.q * out;
  T acc = k.a * x + k.b0 * m0;
  if constexpr (NumHistory >= 1) acc = acc + k.b1 * m1;
  if constexpr (NumHistory >= 2) acc = acc + k.b2 * m2;
  if constexpr (HasNoise) acc = acc + k.c * noise;
  x_next = acc;
}

}  // namespace adjointdeis
