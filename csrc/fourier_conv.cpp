#include "fourier_conv.h"

#include <algorithm>
#include <cmath>
#include <vector>

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

int64_t spectral_rank(int64_t n_times, int64_t modes) {
  return std::min<int64_t>(2 * modes - 1, n_times);
}

namespace {

// Coordinate j of the kept spectrum: bin (j + 1) / 2, imaginary part for even j > 0.
struct Coordinates {
  at::Tensor bin;        // (r,) float64
  at::Tensor imaginary;  // (r,) bool
};

Coordinates coordinates(int64_t n_times, int64_t modes, at::Device device) {
  const at::Tensor j = at::arange(spectral_rank(n_times, modes),
                                  at::TensorOptions().dtype(at::kLong).device(device));
  return {at::floor_divide(j + 1, 2).to(at::kDouble), (j > 0).logical_and(at::remainder(j, 2) == 0)};
}

// P (r, T): coordinate j of x is sum_tau P[j, tau] x_tau (cos for Re, -sin for Im); and
// E (T, r): x_t = sum_j E[t, j] coordinate j, E[t, j] = c_k P[j, t] / T.
std::tuple<at::Tensor, at::Tensor> spectral_basis(int64_t n_times, int64_t modes, at::ScalarType dtype,
                                                  at::Device device) {
  const Coordinates coords = coordinates(n_times, modes, device);
  const at::Tensor tau = at::arange(n_times, at::TensorOptions().dtype(at::kDouble).device(device));
  const at::Tensor theta = coords.bin.unsqueeze(1) * tau.unsqueeze(0) * (2.0 * M_PI / n_times);
  const at::Tensor proj = at::where(coords.imaginary.unsqueeze(1), -at::sin(theta), at::cos(theta));
  const at::Tensor single = (coords.bin == 0).logical_or(coords.bin * 2 == n_times);
  const at::Tensor c = (2.0 - single.to(at::kDouble)) / static_cast<double>(n_times);
  return {proj.to(dtype), (proj * c.unsqueeze(1)).t().to(dtype)};
}

// S (r, r, modes, 2): M[(j, o), (l, i)] = sum_{k, q} S[j, l, k, q] W[k, i, o, q] (q: Re, Im).
at::Tensor mixing_selector(int64_t n_times, int64_t modes, at::ScalarType dtype, at::Device device) {
  const Coordinates coords = coordinates(n_times, modes, device);
  const at::Tensor k = at::arange(modes, at::TensorOptions().dtype(at::kDouble).device(device));
  const at::Tensor in_bin = (coords.bin.unsqueeze(1) == k.unsqueeze(0)).to(dtype);  // (r, modes)
  const at::Tensor same_bin = in_bin.unsqueeze(1) * in_bin.unsqueeze(0);           // (j, l, k)
  const at::Tensor im_row = coords.imaginary.unsqueeze(1).to(dtype);
  const at::Tensor im_col = coords.imaginary.unsqueeze(0).to(dtype);
  // Re rows: [Re W^T, -Im W^T]; Im rows: [Im W^T, Re W^T].
  const at::Tensor re_part = 1.0 - (im_row - im_col).abs();
  const at::Tensor im_part = im_row - im_col;
  return same_bin.unsqueeze(-1) * at::stack({re_part, im_part}, -1).unsqueeze(2);
}

void check_mixing(const char* op, const at::Tensor& mixing, const at::Tensor& x, int64_t modes,
                  int64_t& c_out) {
  check_operand(op, "mixing", mixing, x, opmath_of(x.scalar_type()));
  const int64_t n_times = x.size(1), c_in = x.size(2);
  TORCH_CHECK(modes >= 1 && modes <= n_times / 2 + 1, op, ": modes must be in [1, T // 2 + 1] = [1, ",
              n_times / 2 + 1, "], got ", modes);
  const int64_t rank = spectral_rank(n_times, modes);
  TORCH_CHECK(mixing.dim() == 2 && mixing.size(1) == rank * c_in && mixing.size(0) % rank == 0, op,
              ": mixing must have shape (r * C_out, r * C_in) with r = ", rank, ", C_in = ", c_in,
              ", got ", mixing.sizes());
  c_out = mixing.size(0) / rank;
}

// Writes the r coordinates of x (nb, T, C, P) into u, a contiguous (r, C, nb, P) tensor of the
// accumulation type.
void project_into(const at::Tensor& x4, const at::Tensor& proj, const at::Tensor& u,
                  const TemporalKernels& kernels) {
  kernels.temporal_mix(x4, at::Tensor(), 1.0, proj.unsqueeze(2).expand({proj.size(0), x4.size(1), x4.size(2)}),
                       at::Tensor(), u.permute({2, 0, 1, 3}), at::Tensor(), std::nullopt);
}

// The bins' coordinates grouped by block size: DC (one coordinate), the complex bins (two each,
// consecutive), Nyquist (one). The mixing matrix is block-diagonal over bins, so the GEMM runs as
// one product per group (a batched one for the complex bins): sum_k (size_k C)^2 multiply-adds per
// pixel instead of (r C)^2.
struct BinGroup {
  int64_t first, count, size;  // first coordinate, number of bins, coordinates per bin
};

std::vector<BinGroup> bin_groups(int64_t n_times, int64_t modes) {
  std::vector<BinGroup> groups{{0, 1, 1}};
  const bool nyquist = n_times % 2 == 0 && modes == n_times / 2 + 1;
  const int64_t complex_bins = modes - 1 - (nyquist ? 1 : 0);
  if (complex_bins > 0) groups.push_back({1, complex_bins, 2});
  if (nyquist) groups.push_back({n_times - 1, 1, 1});
  return groups;
}

// The group's diagonal blocks of m (r rows_per, r cols_per) as a (count, size rows_per, size cols_per) view.
at::Tensor diagonal_blocks(const at::Tensor& m, const BinGroup& g, int64_t rows_per, int64_t cols_per) {
  const int64_t rows = g.size * rows_per, cols = g.size * cols_per;
  return m.as_strided({g.count, rows, cols}, {rows * m.stride(0) + cols * m.stride(1), m.stride(0), m.stride(1)},
                      m.storage_offset() + g.first * (rows_per * m.stride(0) + cols_per * m.stride(1)));
}

// The group's coordinates of a contiguous (r per, n) matrix as a (count, size per, n) view.
at::Tensor coordinate_blocks(const at::Tensor& a, const BinGroup& g, int64_t per) {
  return a.narrow(0, g.first * per, g.count * g.size * per).view({g.count, g.size * per, a.size(1)});
}

// out (r rows_out, n) = blockdiag(m) @ in (r rows_in, n), or its transpose with m^T's blocks.
void block_diagonal_mm(const at::Tensor& out, const at::Tensor& m, const at::Tensor& in, int64_t rows_out,
                       int64_t rows_in, bool transpose, const std::vector<BinGroup>& groups) {
  for (const BinGroup& g : groups) {
    at::Tensor blocks = transpose ? diagonal_blocks(m, g, rows_in, rows_out).transpose(1, 2)
                                  : diagonal_blocks(m, g, rows_out, rows_in);
    at::Tensor result = coordinate_blocks(out, g, rows_out);
    at::bmm_out(result, blocks, coordinate_blocks(in, g, rows_in));
  }
}

// Batch entries per chunk of the pipeline, and contiguous (rows, nb, P) views of scratch storage.
struct Chunks {
  int64_t batch, pixels, step;

  Chunks(int64_t batch, int64_t pixels, int64_t rows, int64_t chunk_elements)
      : batch(batch), pixels(pixels), step(batch) {
    if (chunk_elements > 0 && rows * pixels > 0) {
      step = std::clamp<int64_t>(chunk_elements / (rows * pixels), 1, std::max<int64_t>(batch, 1));
    }
  }
  at::Tensor scratch(int64_t rows, const at::TensorOptions& options) const {
    return at::empty({rows * step * pixels}, options);
  }
  // The first rows * nb * P elements of storage as a contiguous (rows, nb, P) tensor.
  at::Tensor view(const at::Tensor& storage, int64_t rows, int64_t nb) const {
    return storage.narrow(0, 0, rows * nb * pixels).view({rows, nb, pixels});
  }
};

}  // namespace

at::Tensor fourier_mode_mixing(const at::Tensor& weight, int64_t n_times, int64_t modes) {
  check_synthesis_args("fourier_mode_mixing", weight, 3, n_times, modes);
  const int64_t rank = spectral_rank(n_times, modes), c_in = weight.size(1), c_out = weight.size(2);
  const at::Tensor parts = at::view_as_real(weight.slice(0, 0, modes));  // (modes, C_in, C_out, 2)
  const at::Tensor selector =
      mixing_selector(n_times, modes, real_dtype_of(weight), weight.device());
  return at::einsum("jlkq,kioq->joli", {selector, parts}).reshape({rank * c_out, rank * c_in});
}

at::Tensor fourier_mode_mixing_adjoint(const at::Tensor& grad_mixing, int64_t n_times, int64_t modes,
                                       int64_t num_weight_modes) {
  TORCH_CHECK(grad_mixing.scalar_type() == at::kFloat || grad_mixing.scalar_type() == at::kDouble,
              "fourier_mode_mixing_adjoint: grad_mixing must be float32 or float64, got ",
              grad_mixing.scalar_type());
  TORCH_CHECK(modes >= 1 && modes <= n_times / 2 + 1 && modes <= num_weight_modes,
              "fourier_mode_mixing_adjoint: modes out of range: ", modes);
  const int64_t rank = spectral_rank(n_times, modes);
  TORCH_CHECK(grad_mixing.dim() == 2 && grad_mixing.size(1) % rank == 0 &&
                  grad_mixing.size(0) % rank == 0,
              "fourier_mode_mixing_adjoint: grad_mixing must have shape (r * C_out, r * C_in) with r = ",
              rank, ", got ", grad_mixing.sizes());
  const int64_t c_out = grad_mixing.size(0) / rank, in_channels = grad_mixing.size(1) / rank;
  const at::Tensor selector =
      mixing_selector(n_times, modes, grad_mixing.scalar_type(), grad_mixing.device());
  const at::Tensor blocks = grad_mixing.reshape({rank, c_out, rank, in_channels});
  at::Tensor grad = at::zeros({num_weight_modes, in_channels, c_out, 2}, grad_mixing.options());
  grad.slice(0, 0, modes).copy_(at::einsum("jlkq,joli->kioq", {selector, blocks}));
  return at::view_as_complex(grad);
}

std::tuple<at::Tensor, at::Tensor> fourier_spectral_conv(const at::Tensor& x, const at::Tensor& mixing,
                                                         int64_t modes, bool residual,
                                                         std::optional<double> negative_slope,
                                                         bool save_mask, c10::DeviceType device_type,
                                                         const TemporalKernels& kernels) {
  const char* op = "fourier_spectral_conv";
  check_activations(op, x, device_type);
  int64_t c_out = 0;
  check_mixing(op, mixing, x, modes, c_out);
  const int64_t batch = x.size(0), n_times = x.size(1), c_in = x.size(2);
  const int64_t pixels = x.size(3) * x.size(4), rank = spectral_rank(n_times, modes);
  TORCH_CHECK(!residual || c_out == c_in, op, ": residual needs C_out == C_in, got C_in = ", c_in,
              " and C_out = ", c_out);
  const std::array<int64_t, 5> y_shape{batch, n_times, c_out, x.size(3), x.size(4)};
  at::Tensor y = at::empty(y_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mask = make_mask(save_mask, negative_slope, y_shape, x);
  if (y.numel() == 0) return {y, mask};

  const auto [proj, expand] = spectral_basis(n_times, modes, mixing.scalar_type(), x.device());
  const at::Tensor x4 = x.reshape({batch, n_times, c_in, pixels});
  const at::Tensor y4 = y.view({batch, n_times, c_out, pixels});
  const at::Tensor mask4 = mask.numel() > 0 ? mask.view({batch, n_times, c_out, pixels}) : at::Tensor();
  const at::Tensor expand_mix = expand.unsqueeze(2).expand({n_times, rank, c_out});
  const std::vector<BinGroup> groups = bin_groups(n_times, modes);
  const Chunks chunks(batch, pixels, rank * std::max(c_in, c_out), kernels.chunk_elements);
  const at::Tensor u_store = chunks.scratch(rank * c_in, mixing.options());
  const at::Tensor v_store = chunks.scratch(rank * c_out, mixing.options());
  for (int64_t b0 = 0; b0 < batch; b0 += chunks.step) {
    const int64_t nb = std::min(chunks.step, batch - b0);
    const at::Tensor u = chunks.view(u_store, rank * c_in, nb);
    const at::Tensor v = chunks.view(v_store, rank * c_out, nb);
    project_into(x4.narrow(0, b0, nb), proj, u.view({rank, c_in, nb, pixels}), kernels);
    block_diagonal_mm(v.view({rank * c_out, nb * pixels}), mixing, u.view({rank * c_in, nb * pixels}), c_out,
                      c_in, /*transpose=*/false, groups);
    kernels.temporal_mix(v.view({rank, c_out, nb, pixels}).permute({2, 0, 1, 3}), at::Tensor(), 1.0,
                         expand_mix, residual ? x4.narrow(0, b0, nb) : at::Tensor(), y4.narrow(0, b0, nb),
                         mask4.defined() ? mask4.narrow(0, b0, nb) : at::Tensor(), negative_slope);
  }
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> fourier_spectral_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mixing, const at::Tensor& mask,
    int64_t modes, bool residual, std::optional<double> negative_slope,
    std::array<bool, 2> output_mask, c10::DeviceType device_type, const TemporalKernels& kernels) {
  const char* op = "fourier_spectral_conv_backward";
  check_activations(op, x, device_type);
  int64_t c_out = 0;
  check_mixing(op, mixing, x, modes, c_out);
  const int64_t batch = x.size(0), n_times = x.size(1), c_in = x.size(2);
  const int64_t pixels = x.size(3) * x.size(4), rank = spectral_rank(n_times, modes);
  const std::array<int64_t, 5> y_shape{batch, n_times, c_out, x.size(3), x.size(4)};
  check_grad_and_mask(op, grad_y, mask, x, y_shape, negative_slope);

  const auto [proj, expand] = spectral_basis(n_times, modes, mixing.scalar_type(), x.device());
  const at::Tensor x4 = x.reshape({batch, n_times, c_in, pixels});
  const at::Tensor grad4 = grad_y.reshape({batch, n_times, c_out, pixels});
  const at::Tensor mask4 =
      negative_slope.has_value() ? mask.view({batch, n_times, c_out, pixels}) : at::Tensor();
  at::Tensor grad_x, grad_mixing;
  if (output_mask[0]) grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (output_mask[1]) grad_mixing = at::zeros_like(mixing, at::MemoryFormat::Contiguous);
  if (x.numel() == 0 || grad_y.numel() == 0) {
    if (output_mask[0]) grad_x.zero_();
    return {grad_x, grad_mixing};
  }
  const at::Tensor dx4 = output_mask[0] ? grad_x.view({batch, n_times, c_in, pixels}) : at::Tensor();
  const std::vector<BinGroup> groups = bin_groups(n_times, modes);
  const Chunks chunks(batch, pixels, rank * std::max(c_in, c_out), kernels.chunk_elements);
  const at::Tensor dv_store = chunks.scratch(rank * c_out, mixing.options());
  const at::Tensor in_store = chunks.scratch(rank * c_in, mixing.options());
  for (int64_t b0 = 0; b0 < batch; b0 += chunks.step) {
    const int64_t nb = std::min(chunks.step, batch - b0);
    // dv: the adjoint of the expansion applied to dL/d(pre-activation).
    const at::Tensor dv = chunks.view(dv_store, rank * c_out, nb);
    kernels.temporal_mix(grad4.narrow(0, b0, nb), mask4.defined() ? mask4.narrow(0, b0, nb) : at::Tensor(),
                         negative_slope.value_or(1.0), expand.t().unsqueeze(2).expand({rank, n_times, c_out}),
                         at::Tensor(), dv.view({rank, c_out, nb, pixels}).permute({2, 0, 1, 3}), at::Tensor(),
                         std::nullopt);
    const at::Tensor dv2 = dv.view({rank * c_out, nb * pixels});
    const at::Tensor scratch = chunks.view(in_store, rank * c_in, nb);
    if (output_mask[1]) {
      project_into(x4.narrow(0, b0, nb), proj, scratch.view({rank, c_in, nb, pixels}), kernels);
      const at::Tensor u2 = scratch.view({rank * c_in, nb * pixels});
      for (const BinGroup& g : groups) {
        diagonal_blocks(grad_mixing, g, c_out, c_in)
            .baddbmm_(coordinate_blocks(dv2, g, c_out), coordinate_blocks(u2, g, c_in).transpose(1, 2));
      }
    }
    if (output_mask[0]) {
      block_diagonal_mm(scratch.view({rank * c_in, nb * pixels}), mixing, dv2, c_in, c_out, /*transpose=*/true,
                        groups);
      kernels.temporal_mix(scratch.view({rank, c_in, nb, pixels}).permute({2, 0, 1, 3}), at::Tensor(), 1.0,
                           proj.t().unsqueeze(2).expand({n_times, rank, c_in}),
                           residual ? grad4.narrow(0, b0, nb) : at::Tensor(), dx4.narrow(0, b0, nb),
                           at::Tensor(), std::nullopt);
    }
  }
  return {grad_x, grad_mixing};
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
    const std::array<int64_t, 4> shape4{batch, n_times, channels, pixels};
    const at::Tensor x4 = x.reshape(shape4);
    const at::Tensor circulant = taps.index_select(0, circulant_index(n_times, x.device()))
                                     .view({n_times, n_times, channels});
    kernels.temporal_mix(x4, at::Tensor(), 1.0, circulant, residual ? x4 : at::Tensor(), y.view(shape4),
                         mask.numel() > 0 ? mask.view(shape4) : at::Tensor(), negative_slope);
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
  const at::Tensor act_mask = negative_slope.has_value() ? mask.view(shape4) : at::Tensor();
  at::Tensor grad_x, grad_taps;
  if (output_mask[0]) {
    // The transpose of the circular convolution, applied to dL/d(pre-activation).
    const at::Tensor circulant = taps.index_select(0, circulant_index(n_times, x.device()))
                                     .view({n_times, n_times, channels});
    grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (grad_x.numel() > 0) {
      kernels.temporal_mix(grad4, act_mask, negative_slope.value_or(1.0), circulant.transpose(0, 1),
                           residual ? grad4 : at::Tensor(), grad_x.view(shape4), at::Tensor(),
                           std::nullopt);
    }
  }
  if (output_mask[1]) {
    // dz as (C, T, B, P); G[c, t, tau] = sum_{b, p} dz[b, t, c, p] x[b, tau, c, p];
    // grad_taps[d, c] = sum_t G[c, t, (t - d) mod T].
    at::Tensor dz = at::empty({channels, n_times, batch, pixels}, x.options().dtype(opmath));
    if (dz.numel() > 0) kernels.epilogue_backward(grad4, act_mask, dz.permute({2, 1, 0, 3}), negative_slope);
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
