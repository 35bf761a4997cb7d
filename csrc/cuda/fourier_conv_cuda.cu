// CUDA kernels of the DSNO temporal Fourier convolution: the temporal mix (projection onto the kept
// bins, expansion back to T with the fused activation and residual, the channel-wise mix, and their
// transposes; one thread per (b, c, pixel) column, all outputs of the column), the activation's
// backward and the spectral basis. The GEMMs run in ATen (cuBLAS) through the dispatcher, see
// fourier_conv.cpp.
#include "elementwise.cuh"

#include "../fourier_conv.h"

namespace adjointdeis {
namespace {

using cuda::kThreads;

// The strides of a (B, T, C, P) operand, passed by value to the kernels.
struct Strides4 {
  int64_t b, t, c, p;
};

Strides4 strides_of(const View4& v) { return {v.stride[0], v.stride[1], v.stride[2], v.stride[3]}; }

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
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < columns; i += stride) {
    const int64_t p = i % a.pixels, bc = i / a.pixels;
    const int64_t c = bc % a.channels, b = bc / a.channels;
    acc_t column[kMaxTimes];
    for (int64_t s = 0; s < a.n_in; ++s) {
      acc_t v = acc_t(a.src[b * a.src_strides.b + s * a.src_strides.t + c * a.src_strides.c + p * a.src_strides.p]);
      if (a.src_mask != nullptr && a.src_mask[((b * a.n_in + s) * a.channels + c) * a.pixels + p]) v *= a.mask_slope;
      column[s] = v;
    }
    for (int64_t t = 0; t < a.n_out; ++t) {
      acc_t acc = acc_t(0);
      for (int64_t s = 0; s < a.n_in; ++s) acc += a.mix[t * a.mix_t + s * a.mix_s + c * a.mix_c] * column[s];
      acc_t addend = acc_t(0);
      if constexpr (HasAddend) {
        addend = acc_t(a.addend[b * a.addend_strides.b + t * a.addend_strides.t + c * a.addend_strides.c +
                                p * a.addend_strides.p]);
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
                                     const bool* __restrict__ mask, acc_t* __restrict__ dz, Strides4 dz_strides,
                                     acc_t slope, int64_t n_times, int64_t channels, int64_t pixels, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t p = i % pixels, row = i / pixels;
    const int64_t c = row % channels, bt = row / channels;
    const int64_t b = bt / n_times, t = bt % n_times;
    const acc_t g = acc_t(grad[b * grad_strides.b + t * grad_strides.t + c * grad_strides.c + p * grad_strides.p]);
    dz[b * dz_strides.b + t * dz_strides.t + c * dz_strides.c + p * dz_strides.p] =
        temporal_epilogue_grad<Activation, acc_t>(g, Activation && mask[i], slope);
  }
}

template <typename acc_t>
__global__ void spectral_basis_kernel(acc_t* proj, acc_t* weight, int64_t rank, int64_t n_times) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rank * n_times;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    spectral_basis_entry(i / n_times, i % n_times, n_times, proj[i], weight[i]);
  }
}

// One thread per entry (q, b C_in + i, a C_out + o) of a group's transposed GEMM blocks (ModeBlocks).
template <typename gemm_t, typename acc_t>
__global__ void mode_blocks_kernel(gemm_t* blocks, const acc_t* weight, Strides4 w, int64_t first_bin, int64_t size,
                                   int64_t c_in, int64_t c_out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t col = e % (size * c_out), rest = e / (size * c_out);
    const int64_t row = rest % (size * c_in), q = rest / (size * c_in);
    const int64_t a = col / c_out, o = col % c_out, b = row / c_in, i = row % c_in;
    int64_t part = 0;
    int sign = 1;
    mode_block_source(a, b, part, sign);
    blocks[e] = gemm_t(acc_t(sign) * weight[(first_bin + q) * w.b + i * w.t + o * w.c + part * w.p]);
  }
}

// One thread per (q, i, o) of a group's bins: the weight's gradient there (mode_weight_grad).
template <typename acc_t>
__global__ void mode_grad_kernel(acc_t* grad_weight, const acc_t* grad_blocks, int64_t first_bin, int64_t size,
                                 int64_t c_in, int64_t c_out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t cols = size * c_out;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t o = e % c_out, qi = e / c_out;
    const int64_t i = qi % c_in, q = qi / c_in;
    acc_t* dst = grad_weight + (((first_bin + q) * c_in + i) * c_out + o) * 2;
    mode_weight_grad(grad_blocks + (q * size * c_in + i) * cols, cols, c_in, c_out, size, o, dst[0], dst[1]);
  }
}

template <typename src_t, typename y_t, typename acc_t>
void launch_temporal_mix(const TemporalMix& call) {
  MixArgs<src_t, y_t, acc_t> a{call.src.ptr<const src_t>(), strides_of(call.src), call.src_mask,
                               acc_t(call.mask_slope), call.mix.ptr<const acc_t>(), call.mix.stride[0],
                               call.mix.stride[1], call.mix.stride[2], call.addend.ptr<const y_t>(),
                               strides_of(call.addend), call.y.ptr<y_t>(), strides_of(call.y), call.mask,
                               acc_t(call.negative_slope.value_or(1.0)), call.batch, call.n_in, call.n_out,
                               call.channels, call.pixels};
  const int blocks = cuda::grid_size(a.batch * a.channels * a.pixels, cuda::current_device());
  dispatch_output_stage(call.addend.defined(), call.negative_slope.has_value(), call.mask != nullptr,
                        [&](auto add, auto act, auto save) {
    temporal_mix_kernel<src_t, y_t, acc_t, decltype(add)::value, decltype(act)::value, decltype(save)::value>
        <<<blocks, kThreads, 0, cuda::current_stream()>>>(a);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void temporal_mix_cuda(const TemporalMix& call) {
  ADJOINTDEIS_CHECK(call.n_in <= kMaxTimes, "fourier_temporal_mix: at most ", kMaxTimes, " inputs");
  dispatch_temporal_mix(call, [&](auto src_tag, auto y_tag, auto acc_tag) {
    launch_temporal_mix<typename decltype(src_tag)::type, typename decltype(y_tag)::type,
                        typename decltype(acc_tag)::type>(call);
  });
}

void epilogue_backward_cuda(const EpilogueBackward& call) {
  const int64_t n = call.batch * call.n_times * call.channels * call.pixels;
  const int blocks = cuda::grid_size(n, cuda::current_device());
  dispatch_step_types(call.grad.dtype, "fourier_epilogue_backward", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = opmath_t<scalar_t>;
    const acc_t slope = acc_t(call.negative_slope.value_or(1.0));
    dispatch_bool(call.negative_slope.has_value(), [&](auto act) {
      epilogue_grad_kernel<scalar_t, acc_t, decltype(act)::value><<<blocks, kThreads, 0, cuda::current_stream()>>>(
          call.grad.ptr<const scalar_t>(), strides_of(call.grad), call.mask, call.dz.ptr<acc_t>(),
          strides_of(call.dz), slope, call.n_times, call.channels, call.pixels, n);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void spectral_basis_cuda(const Tensor& basis, int64_t n_times, int64_t modes) {
  dispatch_opmath_types(basis.scalar_type(), "fourier_spectral_basis", [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    const int64_t rank = spectral_rank(n_times, modes);
    acc_t* proj = basis.mutable_data_ptr<acc_t>();
    spectral_basis_kernel<acc_t><<<1, kThreads, 0, cuda::current_stream()>>>(proj, proj + rank * n_times, rank,
                                                                            n_times);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void mode_blocks_cuda(const ModeBlocks& call) {
  const int64_t n = call.blocks.numel();
  if (n == 0) return;
  const int blocks = cuda::grid_size(n, cuda::current_device());
  dispatch_step_types(call.blocks.scalar_type(), "fourier_mode_blocks", [&](auto tag) {
    using gemm_t = typename decltype(tag)::type;
    using acc_t = opmath_t<gemm_t>;
    mode_blocks_kernel<gemm_t, acc_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        call.blocks.mutable_data_ptr<gemm_t>(), call.weight.ptr<const acc_t>(), strides_of(call.weight),
        call.first_bin, call.size, call.c_in, call.c_out, n);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void mode_grad_cuda(const ModeGrad& call) {
  const int64_t n = call.count * call.c_in * call.c_out;
  if (n == 0) return;
  const int blocks = cuda::grid_size(n, cuda::current_device());
  dispatch_opmath_types(call.grad_weight.scalar_type(), "fourier_mode_grad", [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    mode_grad_kernel<acc_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        call.grad_weight.mutable_data_ptr<acc_t>(), call.grad_blocks.const_data_ptr<acc_t>(), call.first_bin,
        call.size, call.c_in, call.c_out, n);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

bool native_gemm_cuda(ScalarType dtype) { return dtype == ScalarType::Half || dtype == ScalarType::BFloat16; }

const TemporalKernels kCudaKernels{&temporal_mix_cuda, &epilogue_backward_cuda, &spectral_basis_cuda, 0,
                                   &native_gemm_cuda, &mode_blocks_cuda, &mode_grad_cuda};

std::tuple<Tensor, Tensor> spectral_conv_cuda(const Tensor& x, const Tensor& mixing, int64_t modes, bool residual,
                                              std::optional<double> negative_slope, bool save_mask) {
  const auto guard = cuda::guard_device_of(x);
  return fourier_spectral_conv(x, mixing, modes, residual, negative_slope, save_mask, DeviceType::CUDA,
                               kCudaKernels);
}

std::tuple<Tensor, Tensor> spectral_conv_backward_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& mixing,
                                                       const Tensor& mask, int64_t modes, bool residual,
                                                       std::optional<double> negative_slope,
                                                       const std::vector<bool>& output_mask) {
  const auto guard = cuda::guard_device_of(x);
  return fourier_spectral_conv_backward(grad_y, x, mixing, mask, modes, residual, negative_slope, output_mask,
                                        DeviceType::CUDA, kCudaKernels);
}

std::tuple<Tensor, Tensor> mode_conv_cuda(const Tensor& x, const Tensor& weight, int64_t modes, bool residual,
                                          std::optional<double> negative_slope, bool save_mask) {
  const auto guard = cuda::guard_device_of(x);
  return fourier_mode_conv(x, weight, modes, residual, negative_slope, save_mask, DeviceType::CUDA, kCudaKernels);
}

std::tuple<Tensor, Tensor> mode_conv_backward_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                   const Tensor& mask, int64_t modes, bool residual,
                                                   std::optional<double> negative_slope,
                                                   const std::vector<bool>& output_mask) {
  const auto guard = cuda::guard_device_of(x);
  return fourier_mode_conv_backward(grad_y, x, weight, mask, modes, residual, negative_slope, output_mask,
                                    DeviceType::CUDA, kCudaKernels);
}

std::tuple<Tensor, Tensor> channel_conv_cuda(const Tensor& x, const Tensor& kernel, bool residual,
                                             std::optional<double> negative_slope, bool save_mask) {
  const auto guard = cuda::guard_device_of(x);
  return fourier_channel_conv(x, kernel, residual, negative_slope, save_mask, DeviceType::CUDA, kCudaKernels);
}

std::tuple<Tensor, Tensor> channel_conv_backward_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& kernel,
                                                      const Tensor& mask, bool residual,
                                                      std::optional<double> negative_slope,
                                                      const std::vector<bool>& output_mask) {
  const auto guard = cuda::guard_device_of(x);
  return fourier_channel_conv_backward(grad_y, x, kernel, mask, residual, negative_slope, output_mask,
                                       DeviceType::CUDA, kCudaKernels);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CUDA, m) {
  m.impl("fourier_spectral_conv", TORCH_BOX(&spectral_conv_cuda));
  m.impl("fourier_spectral_conv_backward", TORCH_BOX(&spectral_conv_backward_cuda));
  m.impl("fourier_mode_conv", TORCH_BOX(&mode_conv_cuda));
  m.impl("fourier_mode_conv_backward", TORCH_BOX(&mode_conv_backward_cuda));
  m.impl("fourier_channel_conv", TORCH_BOX(&channel_conv_cuda));
  m.impl("fourier_channel_conv_backward", TORCH_BOX(&channel_conv_backward_cuda));
}

}  // namespace adjointdeis
