// CUDA kernels of the DSNO temporal Fourier convolution: the temporal mix (projection onto the kept
// bins, expansion back to T with the fused activation and residual, the channel-wise circular
// convolution, and their transposes; one thread per (b, c, pixel) column, all outputs of the column)
// and the activation's backward. The GEMMs run in ATen (cuBLAS), see fourier_conv.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "elementwise.cuh"

#include "../fourier_conv.h"
#include "../operands.h"

namespace adjointdeis {
namespace {

using cuda::kThreads;

// A strided operand over the (B, T, C, P) index space.
struct Strides4 {
  int64_t b, t, c, p;
};

Strides4 strides_of(const at::Tensor& t) {
  if (!t.defined()) return {0, 0, 0, 0};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename src_t, typename y_t, typename acc_t>
struct MixArgs {
  const src_t* src;
  Strides4 src_strides;
  const bool* src_mask;  // contiguous (B, S, C, P) or null
  acc_t mask_slope;
  const acc_t* mix;
  int64_t mix_t, mix_s, mix_c;  // strides of mix (T, S, C)
  const y_t* addend;
  Strides4 addend_strides;
  y_t* y;
  Strides4 y_strides;
  bool* mask;  // contiguous (B, T, C, P) or null
  acc_t slope;
  int64_t batch, n_in, n_out, channels, pixels;
};

// One thread per column (b, c, p): reads the S inputs once, writes the T outputs.
template <typename src_t, typename y_t, typename acc_t, bool HasAddend, bool Activation, bool SaveMask>
__global__ void temporal_mix_kernel(MixArgs<src_t, y_t, acc_t> a) {
  const int64_t columns = a.batch * a.channels * a.pixels;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < columns;
       i += stride) {
    const int64_t p = i % a.pixels, bc = i / a.pixels;
    const int64_t c = bc % a.channels, b = bc / a.channels;
    acc_t column[kMaxTimes];
    for (int64_t s = 0; s < a.n_in; ++s) {
      acc_t v = acc_t(a.src[b * a.src_strides.b + s * a.src_strides.t + c * a.src_strides.c +
                            p * a.src_strides.p]);
      if (a.src_mask != nullptr && a.src_mask[((b * a.n_in + s) * a.channels + c) * a.pixels + p]) {
        v *= a.mask_slope;
      }
      column[s] = v;
    }
    for (int64_t t = 0; t < a.n_out; ++t) {
      acc_t acc = acc_t(0);
      for (int64_t s = 0; s < a.n_in; ++s) acc += a.mix[t * a.mix_t + s * a.mix_s + c * a.mix_c] * column[s];
      acc_t addend = acc_t(0);
      if constexpr (HasAddend) {
        addend = acc_t(a.addend[b * a.addend_strides.b + t * a.addend_strides.t +
                                c * a.addend_strides.c + p * a.addend_strides.p]);
      }
      bool negative;
      a.y[b * a.y_strides.b + t * a.y_strides.t + c * a.y_strides.c + p * a.y_strides.p] =
          y_t(temporal_epilogue_element<HasAddend, Activation, acc_t>(acc, addend, a.slope, negative));
      if constexpr (SaveMask) a.mask[((b * a.n_out + t) * a.channels + c) * a.pixels + p] = negative;
    }
  }
}

template <typename scalar_t, typename acc_t, bool Activation>
__global__ void epilogue_grad_kernel(const scalar_t* __restrict__ grad, Strides4 grad_strides,
                                     const bool* __restrict__ mask, acc_t* __restrict__ dz,
                                     Strides4 dz_strides, acc_t slope, int64_t n_times,
                                     int64_t channels, int64_t pixels, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t p = i % pixels, row = i / pixels;
    const int64_t c = row % channels, bt = row / channels;
    const int64_t b = bt / n_times, t = bt % n_times;
    const acc_t g = acc_t(grad[b * grad_strides.b + t * grad_strides.t + c * grad_strides.c +
                               p * grad_strides.p]);
    dz[b * dz_strides.b + t * dz_strides.t + c * dz_strides.c + p * dz_strides.p] =
        temporal_epilogue_grad<Activation, acc_t>(g, Activation && mask[i], slope);
  }
}

template <typename src_t, typename y_t, typename acc_t>
void launch_temporal_mix(const at::Tensor& src, const at::Tensor& src_mask, double mask_slope,
                         const at::Tensor& mix, const at::Tensor& addend, const at::Tensor& y,
                         const at::Tensor& mask, std::optional<double> negative_slope) {
  MixArgs<src_t, y_t, acc_t> a{src.const_data_ptr<src_t>(), strides_of(src),
                               src_mask.defined() ? src_mask.const_data_ptr<bool>() : nullptr,
                               acc_t(mask_slope), mix.const_data_ptr<acc_t>(), mix.stride(0),
                               mix.stride(1), mix.stride(2), data_or_null<y_t>(addend),
                               strides_of(addend), y.mutable_data_ptr<y_t>(), strides_of(y),
                               mask.defined() ? mask.mutable_data_ptr<bool>() : nullptr,
                               acc_t(negative_slope.value_or(1.0)), y.size(0), src.size(1), y.size(1),
                               y.size(2), y.size(3)};
  const int blocks = cuda::grid_size(a.batch * a.channels * a.pixels, y.device().index());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_output_stage(addend.defined(), negative_slope.has_value(), mask.defined(),
                        [&](auto add, auto act, auto save) {
    temporal_mix_kernel<src_t, y_t, acc_t, decltype(add)::value, decltype(act)::value,
                        decltype(save)::value><<<blocks, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void temporal_mix_cuda(const at::Tensor& src, const at::Tensor& src_mask, double mask_slope,
                       const at::Tensor& mix, const at::Tensor& addend, const at::Tensor& y,
                       const at::Tensor& mask, std::optional<double> negative_slope) {
  TORCH_CHECK(src.size(1) <= kMaxTimes, "fourier_temporal_mix_cuda: at most ", kMaxTimes, " inputs");
  dispatch_temporal_mix(src, mix, y, "fourier_temporal_mix_cuda", [&](auto src_tag, auto y_tag, auto acc_tag) {
    using src_t = typename decltype(src_tag)::type;
    using y_t = typename decltype(y_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    launch_temporal_mix<src_t, y_t, acc_t>(src, src_mask, mask_slope, mix, addend, y, mask, negative_slope);
  });
}

void epilogue_backward_cuda(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& dz,
                            std::optional<double> negative_slope) {
  const int64_t n = dz.numel();
  const int blocks = cuda::grid_size(n, dz.device().index());
  auto stream = c10::cuda::getCurrentCUDAStream();
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourier_epilogue_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t slope = acc_t(negative_slope.value_or(1.0));
    auto launch = [&](auto act) {
      epilogue_grad_kernel<scalar_t, acc_t, decltype(act)::value><<<blocks, kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), strides_of(grad),
          mask.defined() ? mask.const_data_ptr<bool>() : nullptr, dz.mutable_data_ptr<acc_t>(),
          strides_of(dz), slope, dz.size(1), dz.size(2), dz.size(3), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (negative_slope.has_value()) launch(std::true_type{});
    else launch(std::false_type{});
  });
}

const TemporalKernels kCudaKernels{&temporal_mix_cuda, &epilogue_backward_cuda, 0};

std::tuple<at::Tensor, at::Tensor> spectral_conv_cuda(const at::Tensor& x, const at::Tensor& mixing,
                                                      int64_t modes, bool residual,
                                                      std::optional<double> negative_slope,
                                                      bool save_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fourier_spectral_conv(x, mixing, modes, residual, negative_slope, save_mask,
                               c10::DeviceType::CUDA, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor> spectral_conv_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mixing, const at::Tensor& mask,
    int64_t modes, bool residual, std::optional<double> negative_slope,
    std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fourier_spectral_conv_backward(grad_y, x, mixing, mask, modes, residual, negative_slope,
                                        output_mask, c10::DeviceType::CUDA, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor> channel_conv_op_cuda(const at::Tensor& x, const at::Tensor& taps,
                                                        bool residual,
                                                        std::optional<double> negative_slope,
                                                        bool save_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fourier_channel_conv(x, taps, residual, negative_slope, save_mask, c10::DeviceType::CUDA,
                              kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor> channel_conv_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& taps, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fourier_channel_conv_backward(grad_y, x, taps, mask, residual, negative_slope, output_mask,
                                       c10::DeviceType::CUDA, kCudaKernels);
}

at::Tensor kernel_synthesis_cuda(const at::Tensor& weight, int64_t n_times, int64_t modes) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return fourier_kernel_synthesis(weight, n_times, modes);
}

at::Tensor kernel_synthesis_adjoint_cuda(const at::Tensor& grad, int64_t n_times, int64_t modes,
                                         int64_t num_weight_modes, int64_t in_channels) {
  const c10::cuda::CUDAGuard guard(grad.device());
  return fourier_kernel_synthesis_adjoint(grad, n_times, modes, num_weight_modes, in_channels);
}

at::Tensor mode_mixing_cuda(const at::Tensor& weight, int64_t n_times, int64_t modes) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return fourier_mode_mixing(weight, n_times, modes);
}

at::Tensor mode_mixing_adjoint_cuda(const at::Tensor& grad, int64_t n_times, int64_t modes,
                                    int64_t num_weight_modes) {
  const c10::cuda::CUDAGuard guard(grad.device());
  return fourier_mode_mixing_adjoint(grad, n_times, modes, num_weight_modes);
}

at::Tensor tap_synthesis_cuda(const at::Tensor& weight, int64_t n_times, int64_t modes) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return fourier_taps(weight, n_times, modes);
}

at::Tensor tap_synthesis_adjoint_cuda(const at::Tensor& grad, int64_t n_times, int64_t modes,
                                      int64_t num_weight_modes) {
  const c10::cuda::CUDAGuard guard(grad.device());
  return fourier_taps_adjoint(grad, n_times, modes, num_weight_modes);
}

}  // namespace

TORCH_LIBRARY_IMPL(adjointdeis, CUDA, m) {
  m.impl("fourier_kernel_synthesis", &kernel_synthesis_cuda);
  m.impl("fourier_kernel_synthesis_adjoint", &kernel_synthesis_adjoint_cuda);
  m.impl("fourier_tap_synthesis", &tap_synthesis_cuda);
  m.impl("fourier_tap_synthesis_adjoint", &tap_synthesis_adjoint_cuda);
  m.impl("fourier_mode_mixing", &mode_mixing_cuda);
  m.impl("fourier_mode_mixing_adjoint", &mode_mixing_adjoint_cuda);
  m.impl("fourier_spectral_conv", &spectral_conv_cuda);
  m.impl("fourier_spectral_conv_backward", &spectral_conv_backward_cuda);
  m.impl("fourier_channel_conv", &channel_conv_op_cuda);
  m.impl("fourier_channel_conv_backward", &channel_conv_backward_cuda);
}

}  // namespace adjointdeis
