// Per-element math of the DSNO temporal Fourier convolution (MATH.md section 7), shared by
// the CPU and CUDA kernels. The layer's pre-activation z (the expansion of the mixed bin
// coordinates, or the channel-wise circular convolution) is finished by the epilogue
//
//   y = x + LeakyReLU_s(z)   (residual)      y = LeakyReLU_s(z)   (no residual)
//
// and its backward scales the incoming gradient by LeakyReLU's slope at z. "Negative" follows
// torch.nn.functional.leaky_relu: the slope s applies where z <= 0, the identity where z > 0.
#pragma once

#include <c10/macros/Macros.h>

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

}  // namespace adjointdeis
