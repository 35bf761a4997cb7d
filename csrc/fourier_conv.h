// Host side of the DSNO temporal Fourier convolution (MATH.md section 7), shared by the CPU and
// CUDA backends.
//
// The layer is a real linear map along T: keeping `modes` bins of a length-T real signal leaves
// r = min(2 modes - 1, T) real coordinates (Re of every kept bin, Im of those other than DC and
// Nyquist). So the block-circulant kernel factors as
//
//   A = (E (x) I_Cout) M (P (x) I_Cin),   P (r, T): real DFT rows, E (T, r): real inverse DFT columns,
//
// with M (r C_out, r C_in) block-diagonal over bins, holding [[Re W^T, -Im W^T], [Im W^T, Re W^T]]
// per bin (fourier_mode_mixing). The op runs as: project x onto the r coordinates (a temporal-mix
// kernel), multiply by M's diagonal blocks over all pixels of the batch (ATen GEMMs: BLAS on the
// CPU, cuBLAS on CUDA; one batched GEMM for all complex bins), then expand back to T with the
// activation and residual fused (the same temporal-mix kernel). The GEMMs do about
// (4 modes - 3) C^2 multiply-adds per pixel instead of the dense kernel's T^2 C^2; the dense A remains
// available (fourier_kernel_synthesis) and equals the product above.
//
// The kernels see activations (B, T, C, H, W) as (B, T, C, P), P = H * W; coordinates are stored
// as (r, C, B, P) so that the GEMM reads and writes them as plain (r C, B P) matrices.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "fourier_conv_math.h"
#include "operands.h"

namespace adjointdeis {

// The kernels one backend provides.
struct TemporalKernels {
  // y[b, t, c, p] = addend[b, t, c, p] + act(sum_s mix[t, s, c] * src'[b, s, c, p]), where
  // src' = src scaled by mask_slope where src_mask is set (src_mask undefined: src' = src).
  // src: (B, S, C, P) any strides, y's dtype or float32/64 (the op's accumulation type);
  // src_mask: contiguous bool (B, S, C, P) or undefined; mix: (T, S, C) any strides, the
  // accumulation type; addend: (B, T, C, P) any strides, y's dtype, or undefined; y: (B, T, C, P)
  // any strides, written; mask: contiguous bool (B, T, C, P) receiving the pre-activation <= 0, or
  // undefined; negative_slope: the activation (none when unset).
  void (*temporal_mix)(const at::Tensor& src, const at::Tensor& src_mask, double mask_slope,
                       const at::Tensor& mix, const at::Tensor& addend, const at::Tensor& y,
                       const at::Tensor& mask, std::optional<double> negative_slope);
  // dz = grad * act'(mask): grad (B, T, C, P) any strides; mask contiguous bool, undefined without
  // an activation; dz (B, T, C, P) any strides, float32/64, written.
  void (*epilogue_backward)(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& dz,
                            std::optional<double> negative_slope);
  // Elements of the bin coordinates per pipeline chunk (0: the whole batch at once). The CPU runs
  // the pipeline over chunks of the batch so that the coordinates stay in cache between the
  // projection, the GEMM and the expansion; CUDA runs one GEMM over the whole batch.
  int64_t chunk_elements;
};

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls run(TypeTag<src_t>{}, TypeTag<y_t>{}, TypeTag<acc_t>{}) with the temporal mix's element types:
// the data type is whichever of src and y is not the accumulation type (mix's dtype); the other one is
// the data type too or the accumulation type. Shared by both backends' temporal_mix.
template <typename Run>
void dispatch_temporal_mix(const at::Tensor& src, const at::Tensor& mix, const at::Tensor& y, const char* name,
                           Run&& run) {
  const bool y_is_acc = y.scalar_type() == mix.scalar_type();
  const at::ScalarType data = y_is_acc ? src.scalar_type() : y.scalar_type();
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(data, "fourier_temporal_mix", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(mix.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, name, ": mix has dtype ",
                mix.scalar_type());
    if (src.scalar_type() == data && y.scalar_type() == data) {
      run(TypeTag<scalar_t>{}, TypeTag<scalar_t>{}, TypeTag<acc_t>{});
    } else if (src.scalar_type() == data) {
      run(TypeTag<scalar_t>{}, TypeTag<acc_t>{}, TypeTag<acc_t>{});
    } else {
      run(TypeTag<acc_t>{}, TypeTag<scalar_t>{}, TypeTag<acc_t>{});
    }
  });
}

// Number of real coordinates of `modes` bins of a length-T real signal: min(2 modes - 1, T).
int64_t spectral_rank(int64_t n_times, int64_t modes);

// Kt (n_times, N) = synthesis of the taps from the first `modes` bins of weight (K_w, N).
at::Tensor fourier_taps(const at::Tensor& weight, int64_t n_times, int64_t modes);
at::Tensor fourier_taps_adjoint(const at::Tensor& grad_taps, int64_t n_times, int64_t modes,
                                int64_t num_weight_modes);

// A (T * C_out, T * C_in), A[(t, o), (tau, i)] = Kt[(t - tau) mod T][i, o], from weight
// (K_w, C_in, C_out) complex64/complex128; real dtype of the weight, on its device.
at::Tensor fourier_kernel_synthesis(const at::Tensor& weight, int64_t n_times, int64_t modes);
at::Tensor fourier_kernel_synthesis_adjoint(const at::Tensor& grad_kernel, int64_t n_times,
                                            int64_t modes, int64_t num_weight_modes,
                                            int64_t in_channels);

// M (r C_out, r C_in) from weight (K_w, C_in, C_out) (see above), and its adjoint.
at::Tensor fourier_mode_mixing(const at::Tensor& weight, int64_t n_times, int64_t modes);
at::Tensor fourier_mode_mixing_adjoint(const at::Tensor& grad_mixing, int64_t n_times,
                                       int64_t modes, int64_t num_weight_modes);

std::tuple<at::Tensor, at::Tensor> fourier_spectral_conv(const at::Tensor& x, const at::Tensor& mixing,
                                                         int64_t modes, bool residual,
                                                         std::optional<double> negative_slope,
                                                         bool save_mask, c10::DeviceType device_type,
                                                         const TemporalKernels& kernels);
std::tuple<at::Tensor, at::Tensor> fourier_spectral_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mixing, const at::Tensor& mask,
    int64_t modes, bool residual, std::optional<double> negative_slope,
    std::array<bool, 2> output_mask, c10::DeviceType device_type, const TemporalKernels& kernels);

std::tuple<at::Tensor, at::Tensor> fourier_channel_conv(const at::Tensor& x, const at::Tensor& taps,
                                                        bool residual,
                                                        std::optional<double> negative_slope,
                                                        bool save_mask, c10::DeviceType device_type,
                                                        const TemporalKernels& kernels);
std::tuple<at::Tensor, at::Tensor> fourier_channel_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& taps, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask,
    c10::DeviceType device_type, const TemporalKernels& kernels);

// Calls f(has_addend, activation, save_mask) with std::bool_constant arguments (save_mask only
// with an activation): the compile-time variants of the kernels' output stage.
template <typename F>
void dispatch_output_stage(bool has_addend, bool activation, bool save_mask, F&& f) {
  auto with_act = [&](auto add) {
    if (!activation) f(add, std::false_type{}, std::false_type{});
    else if (save_mask) f(add, std::true_type{}, std::true_type{});
    else f(add, std::true_type{}, std::false_type{});
  };
  if (has_addend) with_act(std::true_type{});
  else with_act(std::false_type{});
}

}  // namespace adjointdeis
