// Per-element math of the DSNO temporal Fourier convolution (docs/math.md section 7), shared by
// the CPU and CUDA kernels. The layer's pre-activation z (the expansion of the mixed bin
// coordinates, or the channel-wise circular convolution) is finished by the epilogue
//
//   y = x + LeakyReLU_s(z)   (residual)      y = LeakyReLU_s(z)   (no residual)
//
// and its backward scales the incoming gradient by LeakyReLU's slope at z. "Negative" follows
// torch.nn.functional.leaky_relu: the slope s applies where z <= 0, the identity where z > 0.
#pragma once

#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace adjointdeis {

// One element of the forward epilogue; `negative` receives z <= 0 (the mask the backward reads).
template <bool Residual, bool Activation, typename T>
C10_HOST_DEVICE inline T temporal_epilogue_element(T z, T x, T slope, bool& negative) {
  negative = !(z > T(0));
  T v = z;
  if constexpr (Activation) v = negative ? slope * z : z;
  if constexpr (Residual) v = x + v;
  return v;
}

// One element of the backward epilogue: d loss / d z from d loss / d y and the saved mask.
template <bool Activation, typename T>
C10_HOST_DEVICE inline T temporal_epilogue_grad(T grad_y, bool negative, T slope) {
  if constexpr (Activation) return negative ? slope * grad_y : grad_y;
  return grad_y;
}

// Largest number of trajectory points the kernels support (per-column arrays of this size).
constexpr int kMaxTimes = 32;

// Number of real coordinates of `modes` bins of a length-T real signal: min(2 modes - 1, T).
C10_HOST_DEVICE inline int64_t spectral_rank(int64_t n_times, int64_t modes) {
  return 2 * modes - 1 < n_times ? 2 * modes - 1 : n_times;
}

// Entry (j, t) of the projection P (r, T) onto the kept bins' coordinates and of the expansion
// weights W (r, T), E = W^T: coordinate j is the real part (j = 0 or odd) or the imaginary part (even
// j > 0) of bin k = (j + 1) / 2, P[j, t] = cos(2 pi k t / T) or -sin(2 pi k t / T), and
// W[j, t] = c_k P[j, t] / T with c_k = 1 for the DC and Nyquist bins, 2 otherwise. Computed in
// double, the angle reduced modulo T.
template <typename T>
C10_HOST_DEVICE inline void spectral_basis_entry(int64_t j, int64_t t, int64_t n_times, T& proj, T& weight) {
  const int64_t k = (j + 1) / 2;
  const double theta = 6.283185307179586476925 * static_cast<double>((k * t) % n_times) / static_cast<double>(n_times);
  const double p = (j > 0 && j % 2 == 0) ? -sin(theta) : cos(theta);
  const double c = (k == 0 || 2 * k == n_times ? 1.0 : 2.0) / static_cast<double>(n_times);
  proj = T(p);
  weight = T(c * p);
}

// The layer's GEMM operands from its weight W (K, C_in, C_out) complex, without forming M: bin k's block of M is
// [[Re W_k^T, -Im W_k^T], [Im W_k^T, Re W_k^T]] (Re W_k^T alone for DC and Nyquist), and the kernels write its
// transpose, whose entry (b C_in + i, a C_out + o) (a, b < the bin's coordinates) is W_k[i, o]'s real part
// (part 0) or imaginary part (part 1) times sign: read along o, W's rows are read in order.
C10_HOST_DEVICE inline void mode_block_source(int64_t a, int64_t b, int64_t& part, int& sign) {
  part = a == b ? 0 : 1;
  sign = a == 0 && b == 1 ? -1 : 1;
}

// dL/d Re W_k[i, o] and dL/d Im W_k[i, o] from g = dL/d(bin k's transposed block), row i of which starts at g
// (rows `cols` = size C_out apart; size = 1 or 2 coordinates of the bin): the sums of mode_block_source's entries.
template <typename T>
C10_HOST_DEVICE inline void mode_weight_grad(const T* g, int64_t cols, int64_t c_in, int64_t c_out, int64_t size,
                                             int64_t o, T& re, T& im) {
  if (size == 1) {
    re = g[o];
    im = T(0);
    return;
  }
  const T* lower = g + c_in * cols;  // row C_in + i
  re = g[o] + lower[c_out + o];
  im = g[c_out + o] - lower[o];
}

}  // namespace adjointdeis
