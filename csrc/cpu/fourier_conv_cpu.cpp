// CPU kernels of the DSNO temporal Fourier convolution: the temporal mix (projection onto the kept
// bins, expansion back to T with the fused activation and residual, the channel-wise circular
// convolution, and their transposes) and the activation's backward. Rows of P = H * W pixels are
// processed in chunks by multiversioned vectorisable loops, parallel over (batch, channel); the GEMMs
// run in ATen (fourier_conv.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../fourier_conv.h"
#include "../operands.h"
#include "multiversion.h"

namespace adjointdeis {
namespace {

constexpr int64_t kGrainElements = 32768;
constexpr int64_t kTile = 4096;  // channels x pixels per accumulator tile

int64_t grain_of(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item));
}

// Rounds to the storage type. For bfloat16 a branch-free round-to-nearest-even (c10's conversion
// tests for NaN with a branch, which keeps the output loops scalar).
template <typename y_t, typename acc_t>
inline y_t to_storage(acc_t v) {
  if constexpr (std::is_same_v<y_t, c10::BFloat16>) {
    const float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return y_t(v);
  }
}

// A tile of channels x pixels of one (b, t): acc[c][p] += mix[c] * src'[c][p], src' = src scaled by
// mask_slope where src_mask is set (src_mask rows are `pixels` apart). acc rows are np apart.
template <typename src_t, typename acc_t, bool HasSrcMask>
ADJOINTDEIS_CPU_LOOP void accumulate_tile(acc_t* __restrict acc, const acc_t* __restrict mix, int64_t mix_c,
                                          const src_t* __restrict src, int64_t src_c, int64_t src_p,
                                          const bool* __restrict src_mask, int64_t pixels, acc_t mask_slope,
                                          int64_t nc, int64_t np) {
  for (int64_t c = 0; c < nc; ++c) {
    const acc_t w = mix[c * mix_c];
    const src_t* __restrict row = src + c * src_c;
    acc_t* __restrict out = acc + c * np;
    if constexpr (HasSrcMask) {
      // Arithmetic rather than a select on the mask: random signs would defeat branch prediction.
      const uint8_t* __restrict m = reinterpret_cast<const uint8_t*>(src_mask + c * pixels);
      const acc_t dw = w * mask_slope - w;
      for (int64_t p = 0; p < np; ++p) out[p] += (w + dw * acc_t(m[p])) * acc_t(row[p * src_p]);
    } else {
      for (int64_t p = 0; p < np; ++p) out[p] += w * acc_t(row[p * src_p]);
    }
  }
}

// The output stage of a tile: y = addend + act(acc), mask = acc <= 0 (mask rows `pixels` apart).
// Written as separate simple loops (mask, activation in place, addend, store): fused into one, the
// mixed float / bool / half-precision accesses kept GCC from vectorising it.
template <typename y_t, typename acc_t, bool HasAddend, bool Activation, bool SaveMask>
ADJOINTDEIS_CPU_LOOP void output_tile(acc_t* __restrict acc, const y_t* __restrict addend, int64_t addend_c,
                                      int64_t addend_p, y_t* __restrict y, int64_t y_c, int64_t y_p,
                                      bool* __restrict mask, int64_t pixels, acc_t slope, int64_t nc, int64_t np) {
  for (int64_t c = 0; c < nc; ++c) {
    acc_t* __restrict v = acc + c * np;
    if constexpr (SaveMask) {
      uint8_t* __restrict m = reinterpret_cast<uint8_t*>(mask + c * pixels);
      for (int64_t p = 0; p < np; ++p) m[p] = static_cast<uint8_t>(!(v[p] > acc_t(0)));
    }
    if constexpr (Activation) {
      for (int64_t p = 0; p < np; ++p) {
        bool negative;
        v[p] = temporal_epilogue_element<false, true, acc_t>(v[p], acc_t(0), slope, negative);
      }
    }
    if constexpr (HasAddend) {
      const y_t* __restrict a = addend + c * addend_c;
      for (int64_t p = 0; p < np; ++p) v[p] += acc_t(a[p * addend_p]);
    }
    y_t* __restrict out = y + c * y_c;
    for (int64_t p = 0; p < np; ++p) out[p * y_p] = to_storage<y_t>(v[p]);
  }
}

template <typename scalar_t, typename acc_t, bool Activation>
ADJOINTDEIS_CPU_LOOP void epilogue_grad_row(const scalar_t* __restrict grad, int64_t grad_stride,
                                            const bool* __restrict mask, acc_t* __restrict dz,
                                            int64_t dz_stride, acc_t slope, int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    dz[p * dz_stride] =
        temporal_epilogue_grad<Activation, acc_t>(acc_t(grad[p * grad_stride]), Activation && mask[p], slope);
  }
}

// Offset of element (b, t, c, 0) of a 4-d operand.
inline int64_t row_offset(const at::Tensor& t, int64_t b, int64_t s, int64_t c) {
  return b * t.stride(0) + s * t.stride(1) + c * t.stride(2);
}

template <typename src_t, typename y_t, typename acc_t>
void run_temporal_mix(const at::Tensor& src, const at::Tensor& src_mask, double mask_slope,
                      const at::Tensor& mix, const at::Tensor& addend, const at::Tensor& y,
                      const at::Tensor& mask, std::optional<double> negative_slope) {
  using OutputTile = void (*)(acc_t*, const y_t*, int64_t, int64_t, y_t*, int64_t, int64_t, bool*, int64_t,
                              acc_t, int64_t, int64_t);
  OutputTile output = nullptr;
  dispatch_output_stage(addend.defined(), negative_slope.has_value(), mask.defined(),
                        [&](auto add, auto act, auto save) {
    output = &output_tile<y_t, acc_t, decltype(add)::value, decltype(act)::value, decltype(save)::value>;
  });
  const auto accumulate = src_mask.defined() ? &accumulate_tile<src_t, acc_t, true>
                                             : &accumulate_tile<src_t, acc_t, false>;
  const int64_t batch = y.size(0), n_out = y.size(1), channels = y.size(2), pixels = y.size(3);
  const int64_t n_in = src.size(1);
  // Tiles of at most kTile elements: tile_p pixels of tile_c channels.
  const int64_t tile_p = std::min(pixels, kTile), tile_c = std::max<int64_t>(1, kTile / tile_p);
  const int64_t blocks_c = (channels + tile_c - 1) / tile_c, blocks_p = (pixels + tile_p - 1) / tile_p;
  const src_t* sp = src.const_data_ptr<src_t>();
  const bool* smp = src_mask.defined() ? src_mask.const_data_ptr<bool>() : nullptr;
  const acc_t* mp = mix.const_data_ptr<acc_t>();
  const y_t* ap = addend.defined() ? addend.const_data_ptr<y_t>() : nullptr;
  y_t* yp = y.mutable_data_ptr<y_t>();
  bool* op = mask.defined() ? mask.mutable_data_ptr<bool>() : nullptr;
  const acc_t slope = acc_t(negative_slope.value_or(1.0)), masked = acc_t(mask_slope);
  const int64_t add_c = addend.defined() ? addend.stride(2) : 0, add_p = addend.defined() ? addend.stride(3) : 0;
  const int64_t tasks = batch * n_out * blocks_c * blocks_p;
  at::parallel_for(0, tasks, grain_of(kTile * n_in), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(kTile));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pb = task % blocks_p, rest = task / blocks_p;
      const int64_t cb = rest % blocks_c, bt = rest / blocks_c;
      const int64_t b = bt / n_out, t = bt % n_out;
      const int64_t c0 = cb * tile_c, p0 = pb * tile_p;
      const int64_t nc = std::min(tile_c, channels - c0), np = std::min(tile_p, pixels - p0);
      std::fill(acc.begin(), acc.begin() + nc * np, acc_t(0));
      for (int64_t s = 0; s < n_in; ++s) {
        const bool* tile_mask = smp == nullptr ? nullptr : smp + ((b * n_in + s) * channels + c0) * pixels + p0;
        accumulate(acc.data(), mp + t * mix.stride(0) + s * mix.stride(1) + c0 * mix.stride(2), mix.stride(2),
                   sp + row_offset(src, b, s, c0) + p0 * src.stride(3), src.stride(2), src.stride(3), tile_mask,
                   pixels, masked, nc, np);
      }
      output(acc.data(), ap == nullptr ? nullptr : ap + row_offset(addend, b, t, c0) + p0 * add_p, add_c, add_p,
             yp + row_offset(y, b, t, c0) + p0 * y.stride(3), y.stride(2), y.stride(3),
             op == nullptr ? nullptr : op + ((b * n_out + t) * channels + c0) * pixels + p0, pixels, slope, nc, np);
    }
  });
}

void temporal_mix_cpu(const at::Tensor& src, const at::Tensor& src_mask, double mask_slope,
                      const at::Tensor& mix, const at::Tensor& addend, const at::Tensor& y,
                      const at::Tensor& mask, std::optional<double> negative_slope) {
  dispatch_temporal_mix(src, mix, y, "fourier_temporal_mix_cpu", [&](auto src_tag, auto y_tag, auto acc_tag) {
    using src_t = typename decltype(src_tag)::type;
    using y_t = typename decltype(y_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    run_temporal_mix<src_t, y_t, acc_t>(src, src_mask, mask_slope, mix, addend, y, mask, negative_slope);
  });
}

void epilogue_backward_cpu(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& dz,
                           std::optional<double> negative_slope) {
  const int64_t n_times = dz.size(1), channels = dz.size(2), pixels = dz.size(3);
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourier_epilogue_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    acc_t* dp = dz.mutable_data_ptr<acc_t>();
    const acc_t slope = acc_t(negative_slope.value_or(1.0));
    const auto row_fn = negative_slope.has_value() ? &epilogue_grad_row<scalar_t, acc_t, true>
                                                   : &epilogue_grad_row<scalar_t, acc_t, false>;
    at::parallel_for(0, dz.numel() / pixels, grain_of(pixels), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % channels, bt = row / channels;
        const int64_t b = bt / n_times, t = bt % n_times;
        row_fn(gp + row_offset(grad, b, t, c), grad.stride(3),
               mp == nullptr ? nullptr : mp + row * pixels, dp + row_offset(dz, b, t, c), dz.stride(3),
               slope, pixels);
      }
    });
  });
}

// About 2 MiB of float32 coordinates per chunk: they stay in L2 between the pipeline's stages.
constexpr int64_t kChunkElements = int64_t{1} << 19;

const TemporalKernels kCpuKernels{&temporal_mix_cpu, &epilogue_backward_cpu, kChunkElements};

std::tuple<at::Tensor, at::Tensor> spectral_conv_cpu(const at::Tensor& x, const at::Tensor& mixing,
                                                     int64_t modes, bool residual,
                                                     std::optional<double> negative_slope,
                                                     bool save_mask) {
  return fourier_spectral_conv(x, mixing, modes, residual, negative_slope, save_mask,
                               c10::DeviceType::CPU, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor> spectral_conv_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mixing, const at::Tensor& mask,
    int64_t modes, bool residual, std::optional<double> negative_slope,
    std::array<bool, 2> output_mask) {
  return fourier_spectral_conv_backward(grad_y, x, mixing, mask, modes, residual, negative_slope,
                                        output_mask, c10::DeviceType::CPU, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor> channel_conv_cpu(const at::Tensor& x, const at::Tensor& taps,
                                                    bool residual, std::optional<double> negative_slope,
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
  m.impl("fourier_mode_mixing", &fourier_mode_mixing);
  m.impl("fourier_mode_mixing_adjoint", &fourier_mode_mixing_adjoint);
  m.impl("fourier_spectral_conv", &spectral_conv_cpu);
  m.impl("fourier_spectral_conv_backward", &spectral_conv_backward_cpu);
  m.impl("fourier_channel_conv", &channel_conv_cpu);
  m.impl("fourier_channel_conv_backward", &channel_conv_backward_cpu);
}

}  // namespace adjointdeis
