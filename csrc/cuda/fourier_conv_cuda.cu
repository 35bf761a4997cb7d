// CUDA kernels of the DSNO temporal Fourier convolution: the epilogue of the block-circulant GEMM
// (activation + residual in one pass over the GEMM's output), its backward, and the direct
// channel-wise circular convolution (one thread per (b, c, pixel) column, all T outputs). The GEMMs
// run in ATen (cuBLAS), see fourier_conv.cpp.
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

// Sizes of the index space, with the offset of element (row, p), row = (b * T + t) * C + c.
struct Space {
  int64_t times, channels, pixels;

  __device__ int64_t offset(int64_t row, int64_t p, const Strides4& s) const {
    const int64_t c = row % channels, bt = row / channels;
    return (bt / times) * s.b + (bt % times) * s.t + c * s.c + p * s.p;
  }
};

Space space_of(const at::Tensor& t) { return {t.size(1), t.size(2), t.size(3)}; }

template <typename scalar_t, typename z_t, bool HasAddend, bool Activation, bool SaveMask>
__global__ void epilogue_kernel(const z_t* __restrict__ z, const scalar_t* __restrict__ addend,
                                Strides4 addend_strides, scalar_t* __restrict__ y,
                                bool* __restrict__ mask, z_t slope, Space space, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    z_t a = z_t(0);
    if constexpr (HasAddend) {
      a = z_t(addend[space.offset(i / space.pixels, i % space.pixels, addend_strides)]);
    }
    bool negative;
    y[i] = scalar_t(temporal_epilogue_element<HasAddend, Activation, z_t>(z[i], a, slope, negative));
    if constexpr (SaveMask) mask[i] = negative;
  }
}

template <typename scalar_t, typename z_t, bool Activation>
__global__ void epilogue_grad_kernel(const scalar_t* __restrict__ grad, Strides4 grad_strides,
                                     const bool* __restrict__ mask, z_t* __restrict__ dz,
                                     Strides4 dz_strides, z_t slope, Space space, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / space.pixels, p = i % space.pixels;
    const z_t g = z_t(grad[space.offset(row, p, grad_strides)]);
    dz[space.offset(row, p, dz_strides)] =
        temporal_epilogue_grad<Activation, z_t>(g, Activation && mask[i], slope);
  }
}

// One thread per column (b, c, p): reads the T inputs once, writes the T outputs.
template <typename scalar_t, typename src_t, bool HasAddend, bool Activation, bool SaveMask>
__global__ void channel_conv_kernel(const src_t* __restrict__ src, Strides4 src_strides,
                                    const at::opmath_type<scalar_t>* __restrict__ taps,
                                    const scalar_t* __restrict__ addend, Strides4 addend_strides,
                                    scalar_t* __restrict__ y, bool* __restrict__ mask,
                                    at::opmath_type<scalar_t> slope, Space space, int64_t columns) {
  using z_t = at::opmath_type<scalar_t>;
  const int64_t times = space.times, channels = space.channels, pixels = space.pixels;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < columns;
       i += stride) {
    const int64_t p = i % pixels, bc = i / pixels;
    const int64_t c = bc % channels, b = bc / channels;
    z_t column[kMaxTimes];
    for (int64_t tau = 0; tau < times; ++tau) {
      column[tau] = z_t(src[b * src_strides.b + tau * src_strides.t + c * src_strides.c + p * src_strides.p]);
    }
    for (int64_t t = 0; t < times; ++t) {
      z_t acc = z_t(0);
      for (int64_t tau = 0; tau < times; ++tau) {
        const int64_t d = t >= tau ? t - tau : t - tau + times;
        acc += taps[d * channels + c] * column[tau];
      }
      z_t a = z_t(0);
      if constexpr (HasAddend) {
        a = z_t(addend[b * addend_strides.b + t * addend_strides.t + c * addend_strides.c +
                       p * addend_strides.p]);
      }
      const int64_t out = ((b * times + t) * channels + c) * pixels + p;
      bool negative;
      y[out] = scalar_t(temporal_epilogue_element<HasAddend, Activation, z_t>(acc, a, slope, negative));
      if constexpr (SaveMask) mask[out] = negative;
    }
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

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

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

void epilogue_cuda(const at::Tensor& z, const at::Tensor& addend, const at::Tensor& y,
                   const at::Tensor& mask, std::optional<double> negative_slope) {
  const int64_t n = y.numel();
  const int blocks = cuda::grid_size(n, y.device().index());
  auto stream = c10::cuda::getCurrentCUDAStream();
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fourier_epilogue_cuda", [&] {
    using z_t = at::opmath_type<scalar_t>;
    const z_t slope = z_t(negative_slope.value_or(1.0));
    dispatch_epilogue(addend.defined(), negative_slope.has_value(), mask.defined(),
                      [&](auto add, auto act, auto save) {
      epilogue_kernel<scalar_t, z_t, decltype(add)::value, decltype(act)::value, decltype(save)::value>
          <<<blocks, kThreads, 0, stream>>>(
              z.const_data_ptr<z_t>(), data_or_null<scalar_t>(addend), strides_of(addend),
              y.mutable_data_ptr<scalar_t>(), mask.defined() ? mask.mutable_data_ptr<bool>() : nullptr,
              slope, space_of(y), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void epilogue_backward_cuda(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& dz,
                            std::optional<double> negative_slope) {
  const int64_t n = dz.numel();
  const int blocks = cuda::grid_size(n, dz.device().index());
  auto stream = c10::cuda::getCurrentCUDAStream();
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fourier_epilogue_backward_cuda", [&] {
    using z_t = at::opmath_type<scalar_t>;
    const z_t slope = z_t(negative_slope.value_or(1.0));
    auto launch = [&](auto act) {
      epilogue_grad_kernel<scalar_t, z_t, decltype(act)::value><<<blocks, kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), strides_of(grad),
          mask.defined() ? mask.const_data_ptr<bool>() : nullptr, dz.mutable_data_ptr<z_t>(),
          strides_of(dz), slope, space_of(dz), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (negative_slope.has_value()) launch(std::true_type{});
    else launch(std::false_type{});
  });
}

void channel_conv_cuda(const at::Tensor& src, const at::Tensor& taps, const at::Tensor& addend,
                       const at::Tensor& y, const at::Tensor& mask,
                       std::optional<double> negative_slope) {
  const int64_t columns = y.size(0) * y.size(2) * y.size(3);
  const int blocks = cuda::grid_size(columns, y.device().index());
  auto stream = c10::cuda::getCurrentCUDAStream();
  ADJOINTDEIS_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fourier_channel_conv_cuda", [&] {
    using z_t = at::opmath_type<scalar_t>;
    const z_t slope = z_t(negative_slope.value_or(1.0));
    auto launch = [&](auto src_tag) {
      using src_t = typename decltype(src_tag)::type;
      dispatch_epilogue(addend.defined(), negative_slope.has_value(), mask.defined(),
                        [&](auto add, auto act, auto save) {
        channel_conv_kernel<scalar_t, src_t, decltype(add)::value, decltype(act)::value,
                            decltype(save)::value><<<blocks, kThreads, 0, stream>>>(
            src.const_data_ptr<src_t>(), strides_of(src), taps.const_data_ptr<z_t>(),
            data_or_null<scalar_t>(addend), strides_of(addend), y.mutable_data_ptr<scalar_t>(),
            mask.defined() ? mask.mutable_data_ptr<bool>() : nullptr, slope, space_of(y), columns);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (src.scalar_type() == y.scalar_type()) {
      launch(TypeTag<scalar_t>{});
    } else {
      TORCH_CHECK(src.scalar_type() == taps.scalar_type(), "fourier_channel_conv_cuda: src dtype ",
                  src.scalar_type());
      launch(TypeTag<z_t>{});
    }
  });
}

const TemporalKernels kCudaKernels{&epilogue_cuda, &epilogue_backward_cuda, &channel_conv_cuda};

std::tuple<at::Tensor, at::Tensor> block_conv_cuda(const at::Tensor& x, const at::Tensor& kernel,
                                                   bool residual,
                                                   std::optional<double> negative_slope,
                                                   bool save_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fourier_block_conv(x, kernel, residual, negative_slope, save_mask, c10::DeviceType::CUDA,
                            kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor> block_conv_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fourier_block_conv_backward(grad_y, x, kernel, mask, residual, negative_slope, output_mask,
                                     c10::DeviceType::CUDA, kCudaKernels);
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
  m.impl("fourier_block_conv", &block_conv_cuda);
  m.impl("fourier_block_conv_backward", &block_conv_backward_cuda);
  m.impl("fourier_channel_conv", &channel_conv_op_cuda);
  m.impl("fourier_channel_conv_backward", &channel_conv_backward_cuda);
}

}  // namespace adjointdeis
