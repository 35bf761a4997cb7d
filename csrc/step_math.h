// Per-element math of the fused ops (multistep step, discrete adjoint step, scaled accumulation),
// shared by the CPU and CUDA kernels.
//
// One solver step of every supported sampler has the form (docs/math.md section 4)
//
//   m0     = p * x + q * out                                   (model output converted)
//   x_next = a * x + b0 * m0 + b1 * m1 + b2 * m2 + b3 * m3 + c * noise
//
// A consistency-trajectory (gamma) step (docs/math.md section 8), x_next = a x + b g + c noise, is the
// row [a, b, 0, 0, c, 0, 1] with out = g and no history.
//
// with scalars precomputed on the host. The functions take the accumulation type (float,
// or double for float64 data) and are called per element by the CPU loops (which the
// compiler vectorises, see cpu/multiversion.h) and the CUDA kernels alike: each formula
// is written once.
#pragma once

#include <torch/headeronly/macros/Macros.h>

namespace adjointdeis {

// Layout of one row of the coefficient table: [a, b0, b1, b2, c, p, q], then b3 for a step that
// reads three previous outputs (rows of 7 entries serve every step with at most two).
enum StepCoeff : int { kA = 0, kB0, kB1, kB2, kC, kP, kQ, kB3, kNumStepCoeffs };

// Maximum number of previous converted outputs a step reads (LMS / iPNDM of order 4).
constexpr int kMaxHistory = 3;

// Entries of a row for a step reading num_history previous outputs.
constexpr int step_coeff_count(int num_history) { return num_history >= 3 ? kNumStepCoeffs : kB3; }

template <typename T>
struct StepCoeffs {
  T a, b0, b1, b2, b3, c, p, q;

  template <int NumHistory, typename Scalar>
  C10_HOST_DEVICE static StepCoeffs load(const Scalar* row) {
    return {T(row[kA]), T(row[kB0]), T(row[kB1]), T(row[kB2]), NumHistory >= 3 ? T(row[kB3]) : T(0),
            T(row[kC]), T(row[kP]),  T(row[kQ])};
  }
};

// One element of the step; m holds the NumHistory previous outputs m1, m2, m3. The number of
// history terms and the noise term are compile-time switches so the inner loops carry no branches.
template <int NumHistory, bool HasNoise, typename T>
C10_HOST_DEVICE inline void multistep_step_element(const StepCoeffs<T>& k, T x, T out, const T* m, T noise,
                                                   T& x_next, T& m0) {
  m0 = k.p * x + k.q * out;
  T acc = k.a * x + k.b0 * m0;
  if constexpr (NumHistory >= 1) acc = acc + k.b1 * m[0];
  if constexpr (NumHistory >= 2) acc = acc + k.b2 * m[1];
  if constexpr (NumHistory >= 3) acc = acc + k.b3 * m[2];
  if constexpr (HasNoise) acc = acc + k.c * noise;
  x_next = acc;
}

// Layout of the coefficients of row j of the exact discrete adjoint (docs/math.md section 5.1):
// [a_j, p_j, b1_j, b2_j, b0_{j-1}, q_{j-1}].
enum AdjointCoeff : int { kAdjA = 0, kAdjP, kAdjB1, kAdjB2, kAdjB0Prev, kAdjQPrev, kNumAdjointCoeffs };

template <typename T>
struct AdjointCoeffs {
  T a, p, b1, b2, b0_prev, q_prev;

  template <typename Scalar>
  C10_HOST_DEVICE static AdjointCoeffs load(const Scalar* row) {
    return {T(row[kAdjA]),  T(row[kAdjP]),      T(row[kAdjB1]),
            T(row[kAdjB2]), T(row[kAdjB0Prev]), T(row[kAdjQPrev])};
  }
};

// One element of the reverse pass at row j, after the model's VJP at x_j produced
// vjp = (d out_j / d x_j)^T (q_j gfull):
//
//   xbar_prev  = a xbar + p gfull + vjp                  (dL/dx_j)
//   gfull_prev = pend1 + b1 xbar + b0_prev xbar_prev     (full adjoint of m_{j-1})
//   cot_prev   = q_prev gfull_prev                       (cotangent of the next VJP)
//   pend_prev  = pend2 + b2 xbar                         (partial adjoint of m_{j-2})
//
// The presence of pend1 / pend2 is a compile-time switch (absent counts as zero).
template <bool HasPend1, bool HasPend2, typename T>
C10_HOST_DEVICE inline void discrete_adjoint_element(const AdjointCoeffs<T>& k, T xbar, T vjp,
                                                     T gfull, T pend1, T pend2, T& xbar_prev,
                                                     T& gfull_prev, T& cot_prev, T& pend_prev) {
  xbar_prev = k.a * xbar + k.p * gfull + vjp;
  T g = k.b1 * xbar;
  if constexpr (HasPend1) g = pend1 + g;
  gfull_prev = g + k.b0_prev * xbar_prev;
  cot_prev = k.q_prev * gfull_prev;
  T pend = k.b2 * xbar;
  if constexpr (HasPend2) pend = pend2 + pend;
  pend_prev = pend;
}

// One element of the scaled accumulation of multi_tensor_axpy_: acc + scale * update.
template <typename T>
C10_HOST_DEVICE inline T axpy_element(T acc, T scale, T update) {
  return acc + scale * update;
}

}  // namespace adjointdeis
