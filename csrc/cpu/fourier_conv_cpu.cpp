// CPU kernels of the DSNO temporal Fourier convolution: the temporal mix (projection onto the kept
// bins, expansion back to T with the fused activation and residual, the channel-wise mix, and their
// transposes), the activation's backward and the spectral basis. With float32 accumulation and unit-stride
// pixels the temporal mix runs by (b, c) in AVX-512 or AVX2 (temporal_mix_simd.h), whichever the CPU has;
// otherwise (float64, strided pixels, older CPUs) rows of P = H * W pixels are processed in tiles by
// multiversioned vectorisable loops, parallel over (batch, channel). The environment variable
// ADJOINTDEIS_TEMPORAL_MIX (avx512, avx2 or tiles) forces one of these, for tests and benchmarks. The GEMMs run
// in ATen through the dispatcher (fourier_conv.cpp).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../fourier_conv.h"
#include "multiversion.h"
#include "temporal_mix_simd.h"

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
  if constexpr (std::is_same_v<y_t, BFloat16>) {
    const float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), BFloat16::from_bits());
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
inline int64_t row_offset(const View4& v, int64_t b, int64_t s, int64_t c) {
  return b * v.stride[0] + s * v.stride[1] + c * v.stride[2];
}

template <typename src_t, typename y_t, typename acc_t>
void run_temporal_mix(const TemporalMix& call) {
  using OutputTile = void (*)(acc_t*, const y_t*, int64_t, int64_t, y_t*, int64_t, int64_t, bool*, int64_t,
                              acc_t, int64_t, int64_t);
  OutputTile output = nullptr;
  dispatch_output_stage(call.addend.defined(), call.negative_slope.has_value(), call.mask != nullptr,
                        [&](auto add, auto act, auto save) {
    output = &output_tile<y_t, acc_t, decltype(add)::value, decltype(act)::value, decltype(save)::value>;
  });
  const auto accumulate = call.src_mask != nullptr ? &accumulate_tile<src_t, acc_t, true>
                                                   : &accumulate_tile<src_t, acc_t, false>;
  const int64_t batch = call.batch, n_out = call.n_out, channels = call.channels, pixels = call.pixels;
  const int64_t n_in = call.n_in;
  // Tiles of at most kTile elements: tile_p pixels of tile_c channels.
  const int64_t tile_p = std::min(pixels, kTile), tile_c = std::max<int64_t>(1, kTile / tile_p);
  const int64_t blocks_c = (channels + tile_c - 1) / tile_c, blocks_p = (pixels + tile_p - 1) / tile_p;
  const View4 &src = call.src, &addend = call.addend, &y = call.y;
  const View3& mix = call.mix;
  const src_t* sp = src.ptr<const src_t>();
  const bool* smp = call.src_mask;
  const acc_t* mp = mix.ptr<const acc_t>();
  const y_t* ap = addend.ptr<const y_t>();
  y_t* yp = y.ptr<y_t>();
  bool* op = call.mask;
  const acc_t slope = acc_t(call.negative_slope.value_or(1.0)), masked = acc_t(call.mask_slope);
  const int64_t add_c = addend.stride[2], add_p = addend.stride[3];
  const int64_t tasks = batch * n_out * blocks_c * blocks_p;
  torch::stable::parallel_for(0, tasks, grain_of(kTile * n_in), [&](int64_t begin, int64_t end) {
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
        accumulate(acc.data(), mp + t * mix.stride[0] + s * mix.stride[1] + c0 * mix.stride[2], mix.stride[2],
                   sp + row_offset(src, b, s, c0) + p0 * src.stride[3], src.stride[2], src.stride[3], tile_mask,
                   pixels, masked, nc, np);
      }
      output(acc.data(), ap == nullptr ? nullptr : ap + row_offset(addend, b, t, c0) + p0 * add_p, add_c, add_p,
             yp + row_offset(y, b, t, c0) + p0 * y.stride[3], y.stride[2], y.stride[3],
             op == nullptr ? nullptr : op + ((b * n_out + t) * channels + c0) * pixels + p0, pixels, slope, nc, np);
    }
  });
}

// The temporal mix's kernel: the SIMD loop of the widest ISA the CPU has (auto), or the one the environment
// variable ADJOINTDEIS_TEMPORAL_MIX names. Read at every call (a getenv, next to a kernel of at least
// microseconds), so that a test can switch it; a value that cannot be honoured raises, naming the variable.
enum class MixKernel { kAuto, kAvx512, kAvx2, kTiles };

MixKernel temporal_mix_kernel() {
  const char* env = std::getenv("ADJOINTDEIS_TEMPORAL_MIX");
  const std::string_view choice = env == nullptr ? "" : env;
  if (choice.empty()) return MixKernel::kAuto;
  if (choice == "tiles") return MixKernel::kTiles;
#ifdef ADJOINTDEIS_HAVE_SIMD_MIX
  if (choice == "avx512") {
    ADJOINTDEIS_CHECK(simd_mix::avx512::supported(),
                      "ADJOINTDEIS_TEMPORAL_MIX=avx512, but this CPU lacks AVX-512F/BW/VL");
    return MixKernel::kAvx512;
  }
  if (choice == "avx2") {
    ADJOINTDEIS_CHECK(simd_mix::avx2::supported(), "ADJOINTDEIS_TEMPORAL_MIX=avx2, but this CPU lacks AVX2/FMA/F16C");
    return MixKernel::kAvx2;
  }
#else
  ADJOINTDEIS_CHECK(choice != "avx512" && choice != "avx2", "ADJOINTDEIS_TEMPORAL_MIX=", choice,
                    ", but this build has no SIMD temporal mix (it needs GCC on x86-64)");
#endif
  ADJOINTDEIS_CHECK(false, "ADJOINTDEIS_TEMPORAL_MIX must be avx512, avx2, tiles or unset, got '", choice, "'");
  return MixKernel::kTiles;
}

#ifdef ADJOINTDEIS_HAVE_SIMD_MIX
// The SIMD loop of this call's variant for `kernel`; null for the tile path.
template <typename src_t, typename y_t>
simd_mix::MixRows simd_rows(const TemporalMix& call, MixKernel kernel) {
  const bool masked = call.src_mask != nullptr, add = call.addend.defined(), act = call.negative_slope.has_value(),
             save = call.mask != nullptr;
  if (kernel == MixKernel::kTiles) return nullptr;
  if (kernel != MixKernel::kAvx2 && simd_mix::avx512::supported()) {
    return simd_mix::avx512::select<src_t, y_t>(masked, add, act, save, call.n_in, call.n_out);
  }
  if (simd_mix::avx2::supported()) return simd_mix::avx2::select<src_t, y_t>(masked, add, act, save, call.n_in, call.n_out);
  return nullptr;
}

// The temporal mix by (b, c) with one of the SIMD loops, for float32 accumulation and operands of unit pixel
// stride.
template <typename src_t, typename y_t>
void run_temporal_mix_simd(const TemporalMix& call, simd_mix::MixRows rows) {
  const int64_t channels = call.channels, pixels = call.pixels, n_in = call.n_in, n_out = call.n_out;
  const View4 &src = call.src, &addend = call.addend, &y = call.y;
  const View3& mix = call.mix;
  simd_mix::RowsOfOneChannel base{n_out, n_in, pixels, nullptr, src.stride[1], src.stride[2], nullptr,
                                  channels * pixels, static_cast<float>(call.mask_slope), nullptr, mix.stride[0],
                                  mix.stride[1], nullptr, addend.stride[1], nullptr, y.stride[1], nullptr,
                                  channels * pixels, static_cast<float>(call.negative_slope.value_or(1.0))};
  torch::stable::parallel_for(0, call.batch * channels, grain_of((n_in + n_out) * pixels), [&](int64_t begin,
                                                                                               int64_t end) {
    simd_mix::RowsOfOneChannel a = base;
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / channels, c = bc % channels;
      a.src = src.ptr<const src_t>() + row_offset(src, b, 0, c);
      a.src_mask = call.src_mask == nullptr ? nullptr : call.src_mask + (b * n_in * channels + c) * pixels;
      a.mix = mix.ptr<const float>() + c * mix.stride[2];
      a.addend = addend.defined() ? addend.ptr<const y_t>() + row_offset(addend, b, 0, c) : nullptr;
      a.y = y.ptr<y_t>() + row_offset(y, b, 0, c);
      a.mask = call.mask == nullptr ? nullptr : call.mask + (b * n_out * channels + c) * pixels;
      rows(a);
    }
  });
}
#endif

void temporal_mix_cpu(const TemporalMix& call) {
  [[maybe_unused]] const MixKernel kernel = temporal_mix_kernel();  // checked on every call, whichever path runs
  dispatch_temporal_mix(call, [&](auto src_tag, auto y_tag, auto acc_tag) {
    using src_t = typename decltype(src_tag)::type;
    using y_t = typename decltype(y_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
#ifdef ADJOINTDEIS_HAVE_SIMD_MIX
    if constexpr (std::is_same_v<acc_t, float>) {
      const bool unit = call.src.stride[3] == 1 && call.y.stride[3] == 1 &&
                        (!call.addend.defined() || call.addend.stride[3] == 1);
      if (unit) {
        const simd_mix::MixRows rows = simd_rows<src_t, y_t>(call, kernel);
        if (rows != nullptr) return run_temporal_mix_simd<src_t, y_t>(call, rows);
      }
    }
#endif
    run_temporal_mix<src_t, y_t, acc_t>(call);
  });
}

void epilogue_backward_cpu(const EpilogueBackward& call) {
  const int64_t n_times = call.n_times, channels = call.channels, pixels = call.pixels;
  dispatch_step_types(call.grad.dtype, "fourier_epilogue_backward", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* gp = call.grad.ptr<const scalar_t>();
    acc_t* dp = call.dz.ptr<acc_t>();
    const acc_t slope = acc_t(call.negative_slope.value_or(1.0));
    const auto row_fn = call.negative_slope.has_value() ? &epilogue_grad_row<scalar_t, acc_t, true>
                                                        : &epilogue_grad_row<scalar_t, acc_t, false>;
    torch::stable::parallel_for(0, call.batch * n_times * channels, grain_of(pixels), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % channels, bt = row / channels;
        const int64_t b = bt / n_times, t = bt % n_times;
        row_fn(gp + row_offset(call.grad, b, t, c), call.grad.stride[3],
               call.mask == nullptr ? nullptr : call.mask + row * pixels, dp + row_offset(call.dz, b, t, c),
               call.dz.stride[3], slope, pixels);
      }
    });
  });
}

void spectral_basis_cpu(const Tensor& basis, int64_t n_times, int64_t modes) {
  dispatch_opmath_types(basis.scalar_type(), "fourier_spectral_basis", [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    const int64_t rank = spectral_rank(n_times, modes);
    acc_t* proj = basis.mutable_data_ptr<acc_t>();
    acc_t* weight = proj + rank * n_times;
    for (int64_t i = 0; i < rank * n_times; ++i) {
      spectral_basis_entry(i / n_times, i % n_times, n_times, proj[i], weight[i]);
    }
  });
}

// One row (a, b) of a bin's transposed GEMM block: dst[o] = sign * W[i, o, part] (mode_block_source), W's row i at
// w (o `w_o` apart, the imaginary part `w_part` after the real one).
template <typename gemm_t, typename acc_t>
ADJOINTDEIS_CPU_LOOP void mode_block_row(gemm_t* __restrict dst, const acc_t* __restrict w, int64_t w_o,
                                         int64_t w_part, int64_t a, int64_t b, int64_t c_out) {
  int64_t part = 0;
  int sign = 1;
  mode_block_source(a, b, part, sign);
  const acc_t* __restrict src = w + part * w_part;
  const acc_t scale = acc_t(sign);
  for (int64_t o = 0; o < c_out; ++o) dst[o] = to_storage<gemm_t>(scale * src[o * w_o]);
}

void mode_blocks_cpu(const ModeBlocks& call) {
  dispatch_step_types(call.blocks.scalar_type(), "fourier_mode_blocks", [&](auto tag) {
    using gemm_t = typename decltype(tag)::type;
    using acc_t = opmath_t<gemm_t>;
    const View4& w = call.weight;
    const int64_t s = call.size, c_in = call.c_in, c_out = call.c_out, cols = s * c_out;
    gemm_t* out = call.blocks.mutable_data_ptr<gemm_t>();
    for (int64_t q = 0; q < call.count; ++q) {
      for (int64_t b = 0; b < s; ++b) {
        for (int64_t i = 0; i < c_in; ++i) {
          const acc_t* row = w.ptr<const acc_t>() + (call.first_bin + q) * w.stride[0] + i * w.stride[1];
          gemm_t* dst = out + ((q * s + b) * c_in + i) * cols;
          for (int64_t a = 0; a < s; ++a) {
            mode_block_row<gemm_t, acc_t>(dst + a * c_out, row, w.stride[2], w.stride[3], a, b, c_out);
          }
        }
      }
    }
  });
}

// Row i of the weight's gradient in one bin (mode_weight_grad): real and imaginary parts interleaved.
template <typename acc_t>
ADJOINTDEIS_CPU_LOOP void mode_grad_row(acc_t* __restrict dst, const acc_t* __restrict g, int64_t cols, int64_t c_in,
                                        int64_t c_out, int64_t size) {
  for (int64_t o = 0; o < c_out; ++o) mode_weight_grad(g, cols, c_in, c_out, size, o, dst[2 * o], dst[2 * o + 1]);
}

void mode_grad_cpu(const ModeGrad& call) {
  dispatch_opmath_types(call.grad_weight.scalar_type(), "fourier_mode_grad", [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    const int64_t s = call.size, c_in = call.c_in, c_out = call.c_out, cols = s * c_out;
    const acc_t* g = call.grad_blocks.const_data_ptr<acc_t>();
    acc_t* gw = call.grad_weight.mutable_data_ptr<acc_t>();
    for (int64_t q = 0; q < call.count; ++q) {
      for (int64_t i = 0; i < c_in; ++i) {
        mode_grad_row<acc_t>(gw + ((call.first_bin + q) * c_in + i) * c_out * 2, g + (q * s * c_in + i) * cols, cols,
                             c_in, c_out, s);
      }
    }
  });
}

// 256 Ki bin coordinates per chunk (1 MiB in float32, half that in bfloat16), so that they stay in a 1 MiB L2
// between the pipeline's stages. Measured on a Zen 4 EPYC (bench/RESULTS.md): twice that (the earlier
// setting) was 0-36% slower in float32 and up to 20% in bfloat16; half of it slowed the bfloat16 GEMMs (fewer
// columns each) by up to 50%.
constexpr int64_t kChunkElements = int64_t{1} << 18;

// bfloat16 GEMMs where the CPU multiplies bfloat16 natively (oneDNN's AVX-512-BF16 and AMX kernels, 2-4x its
// float32 GEMM); float16 has no such path on x86 before AMX-FP16, so it keeps float32 GEMMs.
bool native_gemm_cpu(ScalarType dtype) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool bf16 = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return dtype == ScalarType::BFloat16 && bf16;
#else
  return false;
#endif
}

const TemporalKernels kCpuKernels{&temporal_mix_cpu, &epilogue_backward_cpu, &spectral_basis_cpu, kChunkElements,
                                  &native_gemm_cpu, &mode_blocks_cpu, &mode_grad_cpu};

std::tuple<Tensor, Tensor> spectral_conv_cpu(const Tensor& x, const Tensor& mixing, int64_t modes, bool residual,
                                             std::optional<double> negative_slope, bool save_mask) {
  return fourier_spectral_conv(x, mixing, modes, residual, negative_slope, save_mask, DeviceType::CPU, kCpuKernels);
}

std::tuple<Tensor, Tensor> spectral_conv_backward_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& mixing,
                                                      const Tensor& mask, int64_t modes, bool residual,
                                                      std::optional<double> negative_slope,
                                                      const std::vector<bool>& output_mask) {
  return fourier_spectral_conv_backward(grad_y, x, mixing, mask, modes, residual, negative_slope, output_mask,
                                        DeviceType::CPU, kCpuKernels);
}

std::tuple<Tensor, Tensor> mode_conv_cpu(const Tensor& x, const Tensor& weight, int64_t modes, bool residual,
                                         std::optional<double> negative_slope, bool save_mask) {
  return fourier_mode_conv(x, weight, modes, residual, negative_slope, save_mask, DeviceType::CPU, kCpuKernels);
}

std::tuple<Tensor, Tensor> mode_conv_backward_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                  const Tensor& mask, int64_t modes, bool residual,
                                                  std::optional<double> negative_slope,
                                                  const std::vector<bool>& output_mask) {
  return fourier_mode_conv_backward(grad_y, x, weight, mask, modes, residual, negative_slope, output_mask,
                                    DeviceType::CPU, kCpuKernels);
}

std::tuple<Tensor, Tensor> channel_conv_cpu(const Tensor& x, const Tensor& kernel, bool residual,
                                            std::optional<double> negative_slope, bool save_mask) {
  return fourier_channel_conv(x, kernel, residual, negative_slope, save_mask, DeviceType::CPU, kCpuKernels);
}

std::tuple<Tensor, Tensor> channel_conv_backward_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& kernel,
                                                     const Tensor& mask, bool residual,
                                                     std::optional<double> negative_slope,
                                                     const std::vector<bool>& output_mask) {
  return fourier_channel_conv_backward(grad_y, x, kernel, mask, residual, negative_slope, output_mask,
                                       DeviceType::CPU, kCpuKernels);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CPU, m) {
  m.impl("fourier_spectral_conv", TORCH_BOX(&spectral_conv_cpu));
  m.impl("fourier_spectral_conv_backward", TORCH_BOX(&spectral_conv_backward_cpu));
  m.impl("fourier_mode_conv", TORCH_BOX(&mode_conv_cpu));
  m.impl("fourier_mode_conv_backward", TORCH_BOX(&mode_conv_backward_cpu));
  m.impl("fourier_channel_conv", TORCH_BOX(&channel_conv_cpu));
  m.impl("fourier_channel_conv_backward", TORCH_BOX(&channel_conv_backward_cpu));
}

}  // namespace adjointdeis
