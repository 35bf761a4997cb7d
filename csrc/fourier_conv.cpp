#include "fourier_conv.h"

#include <cmath>

#include "operands.h"

namespace adjointdeis {
namespace {

// The real synthesis matrices (n_times, modes): Kt[d] = sum_k cos[d, k] Re W_k + sin[d, k] Im W_k,
// cos[d, k] = c_k cos(2 pi k d / T) / T, sin[d, k] = -c_k sin(2 pi k d / T) / T, with c_0 = 1,
// c_{T/2} = 1 and c_k = 2 otherwise. Built in float64, then cast to `dtype`.
std::tuple<at::Tensor, at::Tensor> synthesis_tables(int64_t n_times, int64_t modes,
                                                    at::ScalarType dtype, at::Device device) {
  const auto options = at::TensorOptions().dtype(at::kDouble).device(device);
  const at::Tensor d = at::arange(n_times, options).unsqueeze(1);
  const at::Tensor k = at::arange(modes, options).unsqueeze(0);
  const at::Tensor theta = d * k * (2.0 * M_PI / static_cast<double>(n_times));
  const at::Tensor single = (k == 0).logical_or(k * 2 == n_times);
  const at::Tensor c = (2.0 - single.to(at::kDouble)) / static_cast<double>(n_times);
  // sin(pi d) is not exactly 0 in floating point: zero it so Im(W_{T/2}) has no effect at all.
  const at::Tensor sin = at::where(single, 0.0, -c * at::sin(theta));
  return {(c * at::cos(theta)).to(dtype), sin.to(dtype)};
}

at::ScalarType real_dtype_of(const at::Tensor& weight) {
  return weight.scalar_type() == at::kComplexDouble ? at::kDouble : at::kFloat;
}

void check_synthesis_args(const char* op, const at::Tensor& weight, int64_t dim, int64_t n_times,
                          int64_t modes) {
  TORCH_CHECK(weight.scalar_type() == at::kComplexFloat || weight.scalar_type() == at::kComplexDouble,
              op, ": weight must be complex64 or complex128, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == dim, op, ": weight must have ", dim, " dimensions, got shape ",
              weight.sizes());
  TORCH_CHECK(n_times >= 2 && n_times <= kMaxTimes, op, ": n_times must be in [2, ", kMaxTimes,
              "], got ", n_times);
  TORCH_CHECK(modes >= 1 && modes <= n_times / 2 + 1 && modes <= weight.size(0), op,
              ": modes must be in [1, min(n_times // 2 + 1, weight.shape[0])] = [1, ",
              std::min<int64_t>(n_times / 2 + 1, weight.size(0)), "], got ", modes);
}

// (t, tau) -> (t - tau) mod T, flattened over (t, tau).
at::Tensor circulant_index(int64_t n_times, at::Device device) {
  const auto options = at::TensorOptions().dtype(at::kLong).device(device);
  const at::Tensor t = at::arange(n_times, options);
  return at::remainder(t.unsqueeze(1) - t.unsqueeze(0), n_times).flatten();
}

// (d, t) -> t * T + (t - d) mod T: the entries (t, tau) of a T x T block grid on diagonal d.
at::Tensor diagonal_index(int64_t n_times, at::Device device) {
  const auto options = at::TensorOptions().dtype(at::kLong).device(device);
  const at::Tensor t = at::arange(n_times, options).unsqueeze(0);
  const at::Tensor d = at::arange(n_times, options).unsqueeze(1);
  return (t * n_times + at::remainder(t - d, n_times)).flatten();
}

at::ScalarType opmath_of(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_activations(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK(is_step_dtype(x.scalar_type()), op,
              ": x must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().type() == device_type, op, ": x is on ", x.device(), ", expected a ",
              device_type, " tensor");
  TORCH_CHECK(x.dim() == 5, op, ": x must have shape (B, T, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.size(1) >= 2 && x.size(1) <= kMaxTimes, op, ": x.shape[1] (T) must be in [2, ",
              kMaxTimes, "], got ", x.size(1));
}

void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                   at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " for x of dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

void check_grad_and_mask(const char* op, const at::Tensor& grad_y, const at::Tensor& mask,
                         const at::Tensor& x, at::IntArrayRef y_shape,
                         std::optional<double> negative_slope) {
  check_operand(op, "grad_y", grad_y, x, x.scalar_type());
  TORCH_CHECK(grad_y.sizes() == y_shape, op, ": grad_y must have shape ", y_shape, ", got ",
              grad_y.sizes());
  if (negative_slope.has_value()) {
    check_operand(op, "mask", mask, x, at::kBool);
    TORCH_CHECK(mask.sizes() == y_shape && mask.is_contiguous(), op,
                ": mask must be a contiguous tensor of shape ", y_shape, ", got ", mask.sizes());
  }
}

// t as a contiguous tensor of `dtype`, in one pass (no pass when it already is one).
at::Tensor dense_copy(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return at::empty(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

at::Tensor make_mask(bool wanted, std::optional<double> negative_slope, at::IntArrayRef shape,
                     const at::Tensor& x) {
  if (wanted && negative_slope.has_value()) return at::empty(shape, x.options().dtype(at::kBool));
  return at::empty({0}, x.options().dtype(at::kBool));
}

}  // namespace

at::Tensor fourier_taps(const at::Tensor& weight, int64_t n_times, int64_t modes) {
  check_synthesis_args("fourier_tap_synthesis", weight, 2, n_times, modes);
  const at::Tensor parts = at::view_as_real(weight.slice(0, 0, modes));
  const auto [cos, sin] = synthesis_tables(n_times, modes, real_dtype_of(weight), weight.device());
  return at::addmm(at::mm(cos, parts.select(-1, 0)), sin, parts.select(-1, 1));
}

at::Tensor fourier_taps_adjoint(const at::Tensor& grad_taps, int64_t n_times, int64_t modes,
                                int64_t num_weight_modes) {
  TORCH_CHECK(grad_taps.scalar_type() == at::kFloat || grad_taps.scalar_type() == at::kDouble,
              "fourier_tap_synthesis_adjoint: grad_taps must be float32 or float64, got ",
              grad_taps.scalar_type());
  TORCH_CHECK(grad_taps.dim() == 2 && grad_taps.size(0) == n_times,
              "fourier_tap_synthesis_adjoint: grad_taps must have shape (n_times, N), got ",
              grad_taps.sizes());
  TORCH_CHECK(modes >= 1 && modes <= n_times / 2 + 1 && modes <= num_weight_modes,
              "fourier_tap_synthesis_adjoint: modes out of range: ", modes);
  const auto [cos, sin] =
      synthesis_tables(n_times, modes, grad_taps.scalar_type(), grad_taps.device());
  at::Tensor grad = at::zeros({num_weight_modes, grad_taps.size(1), 2}, grad_taps.options());
  grad.slice(0, 0, modes).select(-1, 0).copy_(at::mm(cos.t(), grad_taps));
  grad.slice(0, 0, modes).select(-1, 1).copy_(at::mm(sin.t(), grad_taps));
  return at::view_as_complex(grad);
}

at::Tensor fourier_kernel_synthesis(const at::Tensor& weight, int64_t n_times, int64_t modes) {
  check_synthesis_args("fourier_kernel_synthesis", weight, 3, n_times, modes);
  const int64_t c_in = weight.size(1), c_out = weight.size(2);
  const at::Tensor taps = fourier_taps(weight.reshape({weight.size(0), c_in * c_out}), n_times, modes);
  return taps.index_select(0, circulant_index(n_times, weight.device()))
      .view({n_times, n_times, c_in, c_out})
      .permute({0, 3, 1, 2})
      .reshape({n_times * c_out, n_times * c_in});
}

at::Tensor fourier_kernel_synthesis_adjoint(const at::Tensor& grad_kernel, int64_t n_times,
                                            int64_t modes, int64_t num_weight_modes,
                                            int64_t in_channels) {
  TORCH_CHECK(grad_kernel.dim() == 2 && in_channels >= 1 && grad_kernel.size(1) == n_times * in_channels &&
                  grad_kernel.size(0) % n_times == 0,
              "fourier_kernel_synthesis_adjoint: grad_kernel must have shape (n_times * C_out, "
              "n_times * C_in), got ", grad_kernel.sizes());
  const int64_t c_out = grad_kernel.size(0) / n_times;
  const at::Tensor blocks = grad_kernel.reshape({n_times, c_out, n_times, in_channels})
                                .permute({0, 2, 3, 1})
                                .reshape({n_times * n_times, in_channels * c_out});
  const at::Tensor grad_taps = blocks.index_select(0, diagonal_index(n_times, grad_kernel.device()))
                                   .view({n_times, n_times, in_channels * c_out})
                                   .sum(1);
  return fourier_taps_adjoint(grad_taps, n_times, modes, num_weight_modes)
      .view({num_weight_modes, in_channels, c_out});
}

std::tuple<at::Tensor, at::Tensor> fourier_block_conv(const at::Tensor& x, const at::Tensor& kernel,
                                                      bool residual,
                                                      std::optional<double> negative_slope,
                                                      bool save_mask, c10::DeviceType device_type,
                                                      const TemporalKernels& kernels) {
  const char* op = "fourier_block_conv";
  check_activations(op, x, device_type);
  const at::ScalarType opmath = opmath_of(x.scalar_type());
  check_operand(op, "kernel", kernel, x, opmath);
  const int64_t batch = x.size(0), n_times = x.size(1), c_in = x.size(2);
  const int64_t pixels = x.size(3) * x.size(4);
  TORCH_CHECK(kernel.dim() == 2 && kernel.size(1) == n_times * c_in && kernel.size(0) % n_times == 0,
              op, ": kernel must have shape (T * C_out, T * C_in) = (T * C_out, ", n_times * c_in,
              "), got ", kernel.sizes());
  const int64_t rows = kernel.size(0), c_out = rows / n_times;
  TORCH_CHECK(!residual || c_out == c_in, op, ": residual needs C_out == C_in, got C_in = ", c_in,
              " and C_out = ", c_out);

  const at::Tensor x4 = x.reshape({batch, n_times, c_in, pixels});
  const at::Tensor z = at::matmul(kernel, x4.reshape({batch, n_times * c_in, pixels}).to(opmath));
  const std::array<int64_t, 5> y_shape{batch, n_times, c_out, x.size(3), x.size(4)};
  const std::array<int64_t, 4> shape4{batch, n_times, c_out, pixels};
  at::Tensor y = at::empty(y_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mask = make_mask(save_mask, negative_slope, y_shape, x);
  if (y.numel() > 0) {
    kernels.epilogue(z.view(shape4), residual ? x4 : at::Tensor(), y.view(shape4),
                     mask.numel() > 0 ? mask.view(shape4) : at::Tensor(), negative_slope);
  }
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> fourier_block_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask,
    c10::DeviceType device_type, const TemporalKernels& kernels) {
  const char* op = "fourier_block_conv_backward";
  check_activations(op, x, device_type);
  const at::ScalarType opmath = opmath_of(x.scalar_type());
  check_operand(op, "kernel", kernel, x, opmath);
  const int64_t batch = x.size(0), n_times = x.size(1), c_in = x.size(2);
  const int64_t pixels = x.size(3) * x.size(4);
  TORCH_CHECK(kernel.dim() == 2 && kernel.size(1) == n_times * c_in && kernel.size(0) % n_times == 0,
              op, ": kernel must have shape (T * C_out, T * C_in), got ", kernel.sizes());
  const int64_t rows = kernel.size(0), c_out = rows / n_times;
  const std::array<int64_t, 5> y_shape{batch, n_times, c_out, x.size(3), x.size(4)};
  check_grad_and_mask(op, grad_y, mask, x, y_shape, negative_slope);

  // dz is written as (R, B, P): both GEMMs then read it without a copy.
  const std::array<int64_t, 4> shape4{batch, n_times, c_out, pixels};
  const at::Tensor grad4 = grad_y.reshape(shape4);
  at::Tensor dz = at::empty({rows, batch, pixels}, x.options().dtype(opmath));
  if (dz.numel() > 0) {
    kernels.epilogue_backward(grad4,
                              negative_slope.has_value() ? mask.view(shape4) : at::Tensor(),
                              dz.view({n_times, c_out, batch, pixels}).permute({2, 0, 1, 3}),
                              negative_slope);
  }
  at::Tensor grad_x, grad_kernel;
  if (output_mask[0]) {
    const at::Tensor kernel_t = kernel.t().expand({batch, n_times * c_in, rows});
    const at::Tensor dz_batched = dz.transpose(0, 1);
    at::Tensor dx = residual ? at::baddbmm(grad4.reshape({batch, rows, pixels}).to(opmath),
                                           kernel_t, dz_batched)
                             : at::bmm(kernel_t, dz_batched);
    grad_x = dx.to(x.scalar_type()).view(x.sizes());
  }
  if (output_mask[1]) {
    const at::Tensor x_rows =
        dense_copy(x.reshape({batch, n_times * c_in, pixels}).transpose(0, 1), opmath)
            .view({n_times * c_in, batch * pixels});
    grad_kernel = at::mm(dz.view({rows, batch * pixels}), x_rows.t());
  }
  return {grad_x, grad_kernel};
}

std::tuple<at::Tensor, at::Tensor> fourier_channel_conv(const at::Tensor& x, const at::Tensor& taps,
                                                        bool residual,
                                                        std::optional<double> negative_slope,
                                                        bool save_mask, c10::DeviceType device_type,
                                                        const TemporalKernels& kernels) {
  const char* op = "fourier_channel_conv";
  check_activations(op, x, device_type);
  check_operand(op, "taps", taps, x, opmath_of(x.scalar_type()));
  const int64_t batch = x.size(0), n_times = x.size(1), channels = x.size(2);
  const int64_t pixels = x.size(3) * x.size(4);
  TORCH_CHECK(taps.dim() == 2 && taps.size(0) == n_times && taps.size(1) == channels, op,
              ": taps must have shape (T, C) = (", n_times, ", ", channels, "), got ", taps.sizes());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mask = make_mask(save_mask, negative_slope, x.sizes(), x);
  if (y.numel() > 0) {
    const at::Tensor x4 = x.reshape({batch, n_times, channels, pixels});
    kernels.channel_conv(x4, taps.contiguous(), residual ? x4 : at::Tensor(),
                         y.view({batch, n_times, channels, pixels}),
                         mask.numel() > 0 ? mask.view({batch, n_times, channels, pixels})
                                          : at::Tensor(),
                         negative_slope);
  }
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> fourier_channel_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& taps, const at::Tensor& mask,
    bool residual, std::optional<double> negative_slope, std::array<bool, 2> output_mask,
    c10::DeviceType device_type, const TemporalKernels& kernels) {
  const char* op = "fourier_channel_conv_backward";
  check_activations(op, x, device_type);
  const at::ScalarType opmath = opmath_of(x.scalar_type());
  check_operand(op, "taps", taps, x, opmath);
  const int64_t batch = x.size(0), n_times = x.size(1), channels = x.size(2);
  const int64_t pixels = x.size(3) * x.size(4);
  TORCH_CHECK(taps.dim() == 2 && taps.size(0) == n_times && taps.size(1) == channels, op,
              ": taps must have shape (T, C), got ", taps.sizes());
  check_grad_and_mask(op, grad_y, mask, x, x.sizes(), negative_slope);

  const std::array<int64_t, 4> shape4{batch, n_times, channels, pixels};
  const at::Tensor grad4 = grad_y.reshape(shape4);
  // dz as (C, T, B, P): the tap gradient is then one batched GEMM over channels.
  at::Tensor dz = at::empty({channels, n_times, batch, pixels}, x.options().dtype(opmath));
  const at::Tensor dz4 = dz.permute({2, 1, 0, 3});
  if (dz.numel() > 0) {
    kernels.epilogue_backward(grad4, negative_slope.has_value() ? mask.view(shape4) : at::Tensor(),
                              dz4, negative_slope);
  }
  at::Tensor grad_x, grad_taps;
  if (output_mask[0]) {
    // The transpose of a circular convolution is the convolution with the reversed taps.
    const at::Tensor reversed = taps.index_select(
        0, at::remainder(-at::arange(n_times, taps.options().dtype(at::kLong)), n_times));
    grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (grad_x.numel() > 0) {
      kernels.channel_conv(dz4, reversed.contiguous(), residual ? grad4 : at::Tensor(),
                           grad_x.view(shape4), at::Tensor(), std::nullopt);
    }
  }
  if (output_mask[1]) {
    // G[c, t, tau] = sum_{b, p} dz[b, t, c, p] x[b, tau, c, p]; grad_taps[d, c] = sum_t G[c, t, t - d].
    const at::Tensor x_cols = dense_copy(x.reshape(shape4).permute({2, 1, 0, 3}), opmath)
                                  .view({channels, n_times, batch * pixels});
    const at::Tensor gram = at::bmm(dz.view({channels, n_times, batch * pixels}), x_cols.transpose(1, 2));
    grad_taps = gram.view({channels, n_times * n_times})
                    .index_select(1, diagonal_index(n_times, x.device()))
                    .view({channels, n_times, n_times})
                    .sum(2)
                    .t()
                    .contiguous();
  }
  return {grad_x, grad_taps};
}

}  // namespace adjointdeis
