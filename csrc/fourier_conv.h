// Host side of the DSNO temporal Fourier convolution (docs/math.md section 7), shared by the CPU and
// CUDA backends.
//
// The layer is a real linear map along T: keeping `modes` bins of a length-T real signal leaves
// r = min(2 modes - 1, T) real coordinates (Re of every kept bin, Im of those other than DC and
// Nyquist). So the block-circulant kernel factors as
//
//   A = (E (x) I_Cout) M (P (x) I_Cin),   P (r, T): real DFT rows, E (T, r): real inverse DFT columns,
//
// with M (r C_out, r C_in) block-diagonal over bins, holding [[Re W^T, -Im W^T], [Im W^T, Re W^T]]
// per bin (ops.fourier_mode_mixing). fourier_spectral_conv takes M; fourier_mode_conv (the layer's path) takes
// the weight and builds the blocks the GEMMs read in one pass (ModeBlocks), their transposes, so that the weight
// is read in order, and its backward returns the weight's gradient from theirs (ModeGrad). The op runs as: project x onto the r coordinates (a temporal-mix
// kernel), multiply by M's diagonal blocks over all pixels of the batch (aten::bmm through the
// dispatcher: BLAS on the CPU, cuBLAS on CUDA; one batched GEMM for all complex bins), then expand
// back to T with the activation and residual fused (the same temporal-mix kernel). The GEMMs do about
// (4 modes - 3) C^2 multiply-adds per pixel instead of the dense kernel's T^2 C^2.
//
// The channel-wise layer is one temporal mix with a per-channel (T, T) kernel (the circulant matrix
// of the channel's taps, built by ops.fourier_tap_synthesis's caller).
//
// The kernels see activations (B, T, C, H, W) as (B, T, C, P), P = H * W, through strided views made
// by pointer arithmetic (no dispatcher call per view); coordinates are stored as (r, C, B, P) so that
// the GEMM reads and writes them as plain (r C, B P) matrices.
#pragma once

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "fourier_conv_math.h"
#include "stable.h"

namespace adjointdeis {

// A strided N-d operand of the temporal kernels: data, element type and strides in elements (any
// sign); its sizes are those of the call.
template <int N>
struct Strided {
  char* data = nullptr;  // null: absent
  ScalarType dtype = ScalarType::Float;
  int64_t itemsize = 4;
  std::array<int64_t, N> stride{};

  bool defined() const { return data != nullptr; }
  template <typename T>
  T* ptr() const {
    return reinterpret_cast<T*>(data);
  }
  // The operand shifted by `offset` elements.
  Strided shifted(int64_t offset) const {
    Strided s = *this;
    if (data != nullptr) s.data += offset * itemsize;
    return s;
  }
};
using View4 = Strided<4>;  // (B, T, C, P)
using View3 = Strided<3>;  // (T, S, C)

// One temporal mix: y[b, t, c, p] = addend[b, t, c, p] + act(sum_s mix[t, s, c] * src'[b, s, c, p]),
// src' = src scaled by mask_slope where src_mask is set (no mask: src' = src). src is y's dtype or
// the accumulation type (mix's dtype), y is the data type or the accumulation type; mask (if any)
// receives the pre-activation <= 0.
struct TemporalMix {
  int64_t batch, n_out, n_in, channels, pixels;
  View4 src;                 // (B, S, C, P)
  const bool* src_mask;      // contiguous (B, S, C, P), or null
  double mask_slope;
  View3 mix;                 // (T, S, C), the accumulation type
  View4 addend;              // (B, T, C, P) of y's dtype, or absent
  View4 y;                   // (B, T, C, P), written
  bool* mask;                // contiguous (B, T, C, P), or null
  std::optional<double> negative_slope;  // the activation (none when unset)
};

// dz = grad * act'(mask): grad (B, T, C, P) the data type; mask contiguous, null without an
// activation; dz (B, T, C, P) the accumulation type, written.
struct EpilogueBackward {
  int64_t batch, n_times, channels, pixels;
  View4 grad;
  const bool* mask;
  View4 dz;
  std::optional<double> negative_slope;
};

// The GEMM blocks of one group of equally sized bins from the layer's weight (fourier_mode_conv): bins
// first_bin .. first_bin + count - 1 of `size` coordinates each; blocks (count, size C_in, size C_out), contiguous in
// the GEMMs' type, receive the transposes of M's diagonal blocks (mode_block_source).
struct ModeBlocks {
  int64_t first_bin, count, size, c_in, c_out;
  View4 weight;  // (K, C_in, C_out, 2) of the accumulation type: real and imaginary parts last
  Tensor blocks;
};

// The weight's gradient in the bins of one group from dL/d(blocks) (ModeBlocks' layout, the accumulation type,
// contiguous): rows first_bin .. first_bin + count - 1 of grad_weight (K, C_in, C_out, 2), contiguous, written.
struct ModeGrad {
  int64_t first_bin, count, size, c_in, c_out;
  Tensor grad_blocks;
  Tensor grad_weight;
};

// The kernels one backend provides.
struct TemporalKernels {
  void (*temporal_mix)(const TemporalMix& call);
  void (*epilogue_backward)(const EpilogueBackward& call);
  // basis (2, r, T) contiguous of the accumulation type: P, then the expansion weights W (E = W^T).
  void (*spectral_basis)(const Tensor& basis, int64_t n_times, int64_t modes);
  // Elements of the bin coordinates per pipeline chunk (0: the whole batch at once). The CPU runs
  // the pipeline over chunks of the batch so that the coordinates stay in cache between the
  // projection, the GEMM and the expansion; CUDA runs one GEMM over the whole batch.
  int64_t chunk_elements;
  // Whether the spectral layer's GEMMs take activations of this dtype as they are (the bin coordinates and
  // the mixing matrix rounded to it, products accumulated in float32 by the BLAS): bfloat16 on a CPU with
  // AVX-512-BF16 or AMX, float16 and bfloat16 on CUDA (tensor cores). Otherwise they run in the accumulation
  // type.
  bool (*native_gemm)(ScalarType dtype);
  void (*mode_blocks)(const ModeBlocks& call);
  void (*mode_grad)(const ModeGrad& call);
};

// Calls run(TypeTag<src_t>{}, TypeTag<y_t>{}, TypeTag<acc_t>{}) with the temporal mix's element types:
// the data type is whichever of src and y is not the accumulation type (mix's dtype); the other one is
// the data type too or the accumulation type. Shared by both backends' temporal_mix.
template <typename Run>
void dispatch_temporal_mix(const TemporalMix& call, Run&& run) {
  const ScalarType src = call.src.dtype, y = call.y.dtype, mix = call.mix.dtype;
  const ScalarType data = y == mix ? src : y;
  dispatch_step_types(data, "fourier_temporal_mix", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = opmath_t<scalar_t>;
    ADJOINTDEIS_CHECK(mix == scalar_type_of<acc_t>(), "fourier_temporal_mix: mix has dtype ", mix);
    if (src == data && y == data) {
      run(TypeTag<scalar_t>{}, TypeTag<scalar_t>{}, TypeTag<acc_t>{});
    } else if (src == data) {
      run(TypeTag<scalar_t>{}, TypeTag<acc_t>{}, TypeTag<acc_t>{});
    } else {
      run(TypeTag<acc_t>{}, TypeTag<scalar_t>{}, TypeTag<acc_t>{});
    }
  });
}

// Calls f(has_addend, activation, save_mask) with std::bool_constant arguments (save_mask only
// with an activation): the compile-time variants of the kernels' output stage.
template <typename F>
void dispatch_output_stage(bool has_addend, bool activation, bool save_mask, F&& f) {
  dispatch_bool(has_addend, [&](auto add) {
    if (!activation) f(add, std::false_type{}, std::false_type{});
    else dispatch_bool(save_mask, [&](auto save) { f(add, std::true_type{}, save); });
  });
}

std::tuple<Tensor, Tensor> fourier_spectral_conv(const Tensor& x, const Tensor& mixing, int64_t modes,
                                                 bool residual, std::optional<double> negative_slope,
                                                 bool save_mask, DeviceType device_type,
                                                 const TemporalKernels& kernels);
std::tuple<Tensor, Tensor> fourier_spectral_conv_backward(const Tensor& grad_y, const Tensor& x,
                                                          const Tensor& mixing, const Tensor& mask, int64_t modes,
                                                          bool residual, std::optional<double> negative_slope,
                                                          const std::vector<bool>& output_mask,
                                                          DeviceType device_type, const TemporalKernels& kernels);

// The layer given its weight (K, C_in, C_out, 2) (real and imaginary parts last) instead of M: the GEMMs read
// blocks built from the weight directly (ModeBlocks), and the backward returns the weight's gradient.
std::tuple<Tensor, Tensor> fourier_mode_conv(const Tensor& x, const Tensor& weight, int64_t modes, bool residual,
                                             std::optional<double> negative_slope, bool save_mask,
                                             DeviceType device_type, const TemporalKernels& kernels);
std::tuple<Tensor, Tensor> fourier_mode_conv_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                      const Tensor& mask, int64_t modes, bool residual,
                                                      std::optional<double> negative_slope,
                                                      const std::vector<bool>& output_mask, DeviceType device_type,
                                                      const TemporalKernels& kernels);

std::tuple<Tensor, Tensor> fourier_channel_conv(const Tensor& x, const Tensor& kernel, bool residual,
                                                std::optional<double> negative_slope, bool save_mask,
                                                DeviceType device_type, const TemporalKernels& kernels);
std::tuple<Tensor, Tensor> fourier_channel_conv_backward(const Tensor& grad_y, const Tensor& x,
                                                         const Tensor& kernel, const Tensor& mask, bool residual,
                                                         std::optional<double> negative_slope,
                                                         const std::vector<bool>& output_mask,
                                                         DeviceType device_type, const TemporalKernels& kernels);

}  // namespace adjointdeis
