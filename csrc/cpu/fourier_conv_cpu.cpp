// CPU kernels of the DSNO temporal Fourier convolution: the epilogue of the block-circulant GEMM
// (activation + residual, one pass), its backward, and the direct channel-wise circular
// convolution. Rows of P = H * W pixels are processed by multiversioned vectorisable loops,
// parallel over rows; the GEMMs themselves run in ATen (fourier_conv.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../fourier_conv.h"
#include "../operands.h"
#include "multiversion.h"

namespace adjointdeis {
namespace {

constexpr int64_t kGrainElements = 32768;
constexpr int64_t kChunk = 256;  // pixels per accumulator chunk of the channel-wise convolution

// The (B, T, C, P) index space and one operand's strides over it.
struct Rows {
  int64_t times, channels, pixels;

  int64_t count(const at::Tensor& y) const { return y.numel() / pixels; }
  // Offset of row (b, t, c) = `row` in a tensor with these strides.
  int64_t offset(int64_t row, const at::Tensor& t) const {
    if (!t.defined()) return 0;
    const int64_t c = row % channels, bt = row / channels;
    return (bt / times) * t.stride(0) + (bt % times) * t.stride(1) + c * t.stride(2);
  }
};

Rows rows_of(const at::Tensor& y) { return {y.size(1), y.size(2), y.size(3)}; }

int64_t grain_rows(int64_t pixels) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, pixels)); }

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t, typename z_t, bool HasAddend, bool Activation, bool SaveMask>
ADJOINTDEIS_CPU_LOOP void epilogue_row(const z_t* __restrict z, const scalar_t* __restrict addend,
                                       int64_t addend_stride, scalar_t* __restrict y,
                                       bool* __restrict mask, z_t slope, int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    bool negative;
    const z_t a = HasAddend ? z_t(addend[p * addend_stride]) : z_t(0);
    y[p] = scalar_t(temporal_epilogue_element<HasAddend, Activation, z_t>(z[p], a, slope, negative));
    if constexpr (SaveMask) mask[p] = negative;
  }
}

template <typename scalar_t, typename z_t, bool Activation>
ADJOINTDEIS_CPU_LOOP void epilogue_grad_row(const scalar_t* __restrict grad, int64_t grad_stride,
                                            const bool* __restrict mask, z_t* __restrict dz,
                                            int64_t dz_stride, z_t slope, int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    dz[p * dz_stride] =
        temporal_epilogue_grad<Activation, z_t>(z_t(grad[p * grad_stride]), Activation && mask[p], slope);
  }
}

template <typename src_t, typename acc_t>
ADJOINTDEIS_CPU_LOOP void axpy_row(acc_t* __restrict acc, const src_t* __restrict src,
                                   int64_t src_stride, acc_t w, int64_t n) {
  for (int64_t p = 0; p < n; ++p) acc[p] += w * acc_t(src[p * src_stride]);
}

// Calls f(has_addend, activation, save_mask) with compile-time booleans.
template <typename F>
void dispatch_epilogue(bool has_addend, bool activation, bool save_mask, F&& f) {
  auto with_act = [&](auto add) {
    if (!activation) f(add, std::false_type{}, std::false_type{});
    else if (save_mask) f(add, std::true_type{}, std::true_type{});
    else f(add, std::true_type{}, std::false_type{});
  };
  if (has_addend) with_act(std::true_type{});
  else with_act(std::false_type{});
}

void epilogue_cpu(const at::Tensor& z, const at::Tensor& addend, const at::Tensor& y,
                  const at::Tensor& mask, std::optional<double> negative_slope) {
  const Rows rows = rows_of(y);
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fourier_epilogue_cpu", [&] {
    using z_t = at::opmath_type<scalar_t>;
    const z_t* zp = z.const_data_ptr<z_t>();
    const scalar_t* ap = data_or_null<scalar_t>(addend);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    bool* mp = mask.defined() ? mask.mutable_data_ptr<bool>() : nullptr;
    const z_t slope = z_t(negative_slope.value_or(1.0));
    const int64_t astride = addend.defined() ? addend.stride(3) : 0;
    dispatch_epilogue(addend.defined(), negative_slope.has_value(), mask.defined(),
                      [&](auto add, auto act, auto save) {
      at::parallel_for(0, rows.count(y), grain_rows(rows.pixels), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t base = row * rows.pixels;
          epilogue_row<scalar_t, z_t, decltype(add)::value, decltype(act)::value, decltype(save)::value>(
              zp + base, ap + rows.offset(row, addend), astride, yp + base,
              mp == nullptr ? nullptr : mp + base, slope, rows.pixels);
        }
      });
    });
  });
}

void epilogue_backward_cpu(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& dz,
                           std::optional<double> negative_slope) {
  const Rows rows = rows_of(dz);
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourier_epilogue_backward_cpu", [&] {
    using z_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    z_t* dp = dz.mutable_data_ptr<z_t>();
    const z_t slope = z_t(negative_slope.value_or(1.0));
    auto run = [&](auto act) {
      at::parallel_for(0, rows.count(dz), grain_rows(rows.pixels), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          epilogue_grad_row<scalar_t, z_t, decltype(act)::value>(
              gp + rows.offset(row, grad), grad.stride(3),
              mp == nullptr ? nullptr : mp + row * rows.pixels, dp + rows.offset(row, dz),
              dz.stride(3), slope, rows.pixels);
        }
      });
    };
    if (negative_slope.has_value()) run(std::true_type{});
    else run(std::false_type{});
  });
}

template <typename scalar_t, typename src_t>
void run_channel_conv(const at::Tensor& src, const at::Tensor& taps, const at::Tensor& addend,
                      const at::Tensor& y, const at::Tensor& mask,
                      std::optional<double> negative_slope) {
  using z_t = at::opmath_type<scalar_t>;
  const Rows rows = rows_of(y);
  const int64_t batch = y.size(0), n_times = rows.times, channels = rows.channels;
  const src_t* sp = src.const_data_ptr<src_t>();
  const z_t* kp = taps.const_data_ptr<z_t>();
  const scalar_t* ap = data_or_null<scalar_t>(addend);
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  bool* mp = mask.defined() ? mask.mutable_data_ptr<bool>() : nullptr;
  const z_t slope = z_t(negative_slope.value_or(1.0));
  const int64_t astride = addend.defined() ? addend.stride(3) : 0;
  dispatch_epilogue(addend.defined(), negative_slope.has_value(), mask.defined(),
                    [&](auto add, auto act, auto save) {
    // One task per (b, c): all T output rows of that column block, chunk by chunk of pixels.
    const int64_t grain = std::max<int64_t>(1, grain_rows(rows.pixels * n_times * n_times));
    at::parallel_for(0, batch * channels, grain, [&](int64_t begin, int64_t end) {
      z_t acc[kChunk];
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / channels, c = bc % channels;
        for (int64_t p0 = 0; p0 < rows.pixels; p0 += kChunk) {
          const int64_t n = std::min<int64_t>(kChunk, rows.pixels - p0);
          for (int64_t t = 0; t < n_times; ++t) {
            std::fill(acc, acc + n, z_t(0));
            for (int64_t tau = 0; tau < n_times; ++tau) {
              const z_t w = kp[((t - tau + n_times) % n_times) * channels + c];
              const src_t* s = sp + b * src.stride(0) + tau * src.stride(1) + c * src.stride(2) +
                               p0 * src.stride(3);
              axpy_row<src_t, z_t>(acc, s, src.stride(3), w, n);
            }
            const int64_t row = (b * n_times + t) * channels + c;
            const int64_t base = row * rows.pixels + p0;
            epilogue_row<scalar_t, z_t, decltype(add)::value, decltype(act)::value,
                         decltype(save)::value>(
                acc, ap + rows.offset(row, addend) + p0 * astride, astride, yp + base,
                mp == nullptr ? nullptr : mp + base, slope, n);
          }
        }
      }
    });
  });
}

void channel_conv_cpu(const at::Tensor& src, const at::Tensor& taps, const at::Tensor& addend,
                      const at::Tensor& y, const at::Tensor& mask,
                      std::optional<double> negative_slope) {
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fourier_channel_conv_cpu", [&] {
    using z_t = at::opmath_type<scalar_t>;
    if (src.scalar_type() == y.scalar_type()) {
      run_channel_conv<scalar_t, scalar_t>(src, taps, addend, y, mask, negative_slope);
    } else {
      TORCH_CHECK(src.scalar_type() == taps.scalar_type(), "fourier_channel_conv_cpu: src dtype ",
                  src.scalar_type());
      run_channel_conv<scalar_t, z_t>(src, taps, addend, y, mask, negative_slope);
    }
  });
}

const TemporalKernels kCpuKernels{&epilogue_cpu, &epilogue_backward_cpu, &channel_conv_cpu};

std::tuple<at::Tensor, at::Tensor> block_conv_cpu(const at::Tensor& x, const at::Tensor& kernel,
                                                  bool residual, std::optional<double> negative_slope,
                                                  bool save_mask) {
  return fourier_block_conv(x, kernel, residual, negative_slope, save_mask, c10::DeviceType::CPU,
                            kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor> block_conv_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask) {
  return fourier_block_conv_backward(grad_y, x, kernel, mask, residual, negative_slope, output_mask,
                                     c10::DeviceType::CPU, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor> channel_conv_op_cpu(const at::Tensor& x, const at::Tensor& taps,
                                                       bool residual,
                                                       std::optional<double> negative_slope,
                                                       bool save_mask) {
  return fourier_channel_conv(x, taps, residual, negative_slope, save_mask, c10::DeviceType::CPU,
                              kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor> channel_conv_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& taps, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask) {
  return fourier_channel_conv_backward(grad_y, x, taps, mask, residual, negative_slope, output_mask,
                                       c10::DeviceType::CPU, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(adjointdeis, CPU, m) {
  m.impl("fourier_kernel_synthesis", &fourier_kernel_synthesis);
  m.impl("fourier_kernel_synthesis_adjoint", &fourier_kernel_synthesis_adjoint);
  m.impl("fourier_tap_synthesis", &fourier_taps);
  m.impl("fourier_tap_synthesis_adjoint", &fourier_taps_adjoint);
  m.impl("fourier_block_conv", &block_conv_cpu);
  m.impl("fourier_block_conv_backward", &block_conv_backward_cpu);
  m.impl("fourier_channel_conv", &channel_conv_op_cpu);
  m.impl("fourier_channel_conv_backward", &channel_conv_backward_cpu);
}

}  // namespace adjointdeis
