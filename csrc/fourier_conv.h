// Host side of the DSNO temporal Fourier convolution (MATH.md section 7), shared by the CPU and
// CUDA backends: the synthesis of the real block-circulant kernel from the complex weight (and its
// adjoint), the GEMM pipelines (ATen matmul: BLAS on the CPU, cuBLAS on CUDA) and the calls into
// each backend's epilogue kernels.
//
// The kernels see the activations (B, T, C, H, W) as (B, T, C, P) with P = H * W; the GEMMs see
// them as (B, T * C, P).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "fourier_conv_math.h"

namespace adjointdeis {

// The elementwise and direct kernels one backend provides. Each works on the index space
// (B, T, C, P) of the activations; "any strides" operands are read through their strides.
struct TemporalKernels {
  // y = addend + act(z) (addend undefined: no addend). z: contiguous, float32 or float64;
  // addend: any strides, y's dtype; y: contiguous; mask: contiguous bool receiving z <= 0, or
  // undefined (not wanted).
  void (*epilogue)(const at::Tensor& z, const at::Tensor& addend, const at::Tensor& y,
                   const at::Tensor& mask, std::optional<double> negative_slope);
  // dz = grad * act'(mask). grad: any strides; mask: contiguous bool, undefined without an
  // activation; dz: any strides (written in place), float32 or float64.
  void (*epilogue_backward)(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& dz,
                            std::optional<double> negative_slope);
  // y[b, t, c, p] = addend[b, t, c, p] + act(sum_tau taps[(t - tau) mod T, c] src[b, tau, c, p]).
  // src: any strides, y's dtype or taps' dtype; taps: contiguous (T, C), float32 or float64;
  // addend: any strides, y's dtype, or undefined; y: contiguous; mask as in epilogue.
  void (*channel_conv)(const at::Tensor& src, const at::Tensor& taps, const at::Tensor& addend,
                       const at::Tensor& y, const at::Tensor& mask,
                       std::optional<double> negative_slope);
};

// Kt (n_times, N) = synthesis of the taps from the first `modes` bins of weight (K_w, N).
at::Tensor fourier_taps(const at::Tensor& weight, int64_t n_times, int64_t modes);
// The adjoint of fourier_taps: the complex (num_weight_modes, N) weight gradient of grad_taps.
at::Tensor fourier_taps_adjoint(const at::Tensor& grad_taps, int64_t n_times, int64_t modes,
                                int64_t num_weight_modes);

// A (T * C_out, T * C_in), A[(t, o), (tau, i)] = Kt[(t - tau) mod T][i, o], from weight
// (K_w, C_in, C_out) complex64/complex128; real dtype of the weight, on its device.
at::Tensor fourier_kernel_synthesis(const at::Tensor& weight, int64_t n_times, int64_t modes);
// The adjoint: grad_kernel (T * C_out, T * C_in) -> complex weight gradient (K_w, C_in, C_out).
at::Tensor fourier_kernel_synthesis_adjoint(const at::Tensor& grad_kernel, int64_t n_times,
                                            int64_t modes, int64_t num_weight_modes,
                                            int64_t in_channels);

std::tuple<at::Tensor, at::Tensor> fourier_block_conv(const at::Tensor& x, const at::Tensor& kernel,
                                                      bool residual,
                                                      std::optional<double> negative_slope,
                                                      bool save_mask, c10::DeviceType device_type,
                                                      const TemporalKernels& kernels);
std::tuple<at::Tensor, at::Tensor> fourier_block_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask,
    c10::DeviceType device_type, const TemporalKernels& kernels);

std::tuple<at::Tensor, at::Tensor> fourier_channel_conv(const at::Tensor& x, const at::Tensor& taps,
                                                        bool residual,
                                                        std::optional<double> negative_slope,
                                                        bool save_mask, c10::DeviceType device_type,
                                                        const TemporalKernels& kernels);
std::tuple<at::Tensor, at::Tensor> fourier_channel_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& taps, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask,
    c10::DeviceType device_type, const TemporalKernels& kernels);

}  // namespace adjointdeis
