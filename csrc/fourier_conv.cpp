#include "fourier_conv.h"

#include <algorithm>
#include <cstdlib>

namespace adjointdeis {
namespace {

void check_activations(const char* op, const Tensor& x, DeviceType device_type) {
  ADJOINTDEIS_CHECK(is_step_dtype(x.scalar_type()), op, ": x must be float64, float32, float16 or bfloat16, got ",
                    x.scalar_type());
  ADJOINTDEIS_CHECK(x.device().type() == device_type, op, ": x is on ", device_name(x.device()), ", expected a ",
                    device_type_name(device_type), " tensor");
  ADJOINTDEIS_CHECK(x.dim() == 5, op, ": x must have shape (B, T, C, H, W), got ", shape_name(x.sizes()));
  ADJOINTDEIS_CHECK(x.size(1) >= 2 && x.size(1) <= kMaxTimes, op, ": x.shape[1] (T) must be in [2, ", kMaxTimes,
                    "], got ", x.size(1));
}

void check_operand(const char* op, const char* name, const Tensor& t, const Tensor& x, ScalarType dtype) {
  ADJOINTDEIS_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " for x of dtype ",
                    x.scalar_type(), ", got ", t.scalar_type());
  ADJOINTDEIS_CHECK(t.device() == x.device(), op, ": ", name, " is on ", device_name(t.device()), " but x is on ",
                    device_name(x.device()));
}

void check_grad_and_mask(const char* op, const Tensor& grad_y, const Tensor& mask, const Tensor& x,
                         const Shape& y_shape, std::optional<double> negative_slope) {
  check_operand(op, "grad_y", grad_y, x, x.scalar_type());
  ADJOINTDEIS_CHECK(same_shape(grad_y.sizes(), IntRef(y_shape)), op, ": grad_y must have shape ",
                    shape_name(IntRef(y_shape)), ", got ", shape_name(grad_y.sizes()));
  if (negative_slope.has_value()) {
    check_operand(op, "mask", mask, x, ScalarType::Bool);
    ADJOINTDEIS_CHECK(same_shape(mask.sizes(), IntRef(y_shape)) && mask.is_contiguous(), op,
                      ": mask must be a contiguous tensor of shape ", shape_name(IntRef(y_shape)), ", got ",
                      shape_name(mask.sizes()));
  }
}

void check_output_mask(const char* op, const std::vector<bool>& output_mask) {
  ADJOINTDEIS_CHECK(output_mask.size() == 2, op, ": output_mask must hold 2 flags, got ", output_mask.size());
}

template <int N>
Strided<N> strided(const Tensor& t, const std::array<int64_t, N>& stride) {
  Strided<N> s;
  s.data = static_cast<char*>(const_cast<void*>(t.const_data_ptr()));
  s.dtype = t.scalar_type();
  s.itemsize = static_cast<int64_t>(t.element_size());
  s.stride = stride;
  return s;
}

// t (B, T, C, H, W) as a (B, T, C, P) view, P = H W: H and W merge when their strides allow, else t
// is first copied contiguous into `owner`.
View4 activations(const Tensor& t, Tensor& owner) {
  const bool mergeable = t.size(4) == 1 || t.size(3) == 1 || t.stride(3) == t.stride(4) * t.size(4);
  owner = mergeable ? t : torch::stable::contiguous(t);
  const int64_t p_stride = owner.size(4) == 1 ? owner.stride(3) : owner.stride(4);
  return strided<4>(owner, {owner.stride(0), owner.stride(1), owner.stride(2), p_stride});
}

// A contiguous (B, T, C, P) tensor as a view.
View4 dense4(const Tensor& t, int64_t n_times, int64_t channels, int64_t pixels) {
  return strided<4>(t, {n_times * channels * pixels, channels * pixels, pixels, 1});
}

Tensor make_mask(bool wanted, std::optional<double> negative_slope, const Shape& shape, const Tensor& x) {
  return empty(wanted && negative_slope.has_value() ? shape : Shape{0}, ScalarType::Bool, x.device());
}

bool* mask_data(const Tensor& mask) { return mask.numel() > 0 ? mask.mutable_data_ptr<bool>() : nullptr; }

// The bins' coordinates grouped by block size: DC (one coordinate), the complex bins (two each,
// consecutive), Nyquist (one). The mixing matrix is block-diagonal over bins, so the GEMM runs as
// one product per group (a batched one for the complex bins): sum_k (size_k C)^2 multiply-adds per
// pixel instead of (r C)^2.
struct BinGroup {
  int64_t first, count, size;  // first coordinate, number of bins, coordinates per bin

  int64_t first_bin() const { return (first + 1) / 2; }
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
Tensor diagonal_blocks(const Tensor& m, const BinGroup& g, int64_t rows_per, int64_t cols_per) {
  const int64_t rows = g.size * rows_per, cols = g.size * cols_per;
  const int64_t s0 = m.stride(0), s1 = m.stride(1), step = rows * s0 + cols * s1;
  const int64_t offset = g.first * (rows_per * s0 + cols_per * s1);
  return view_of(m, offset, {g.count, rows, cols}, {step, s0, s1});
}

// The group's coordinates of a contiguous (r per, n) buffer as a (count, size per, n) view, or its
// blockwise transpose (count, n, size per).
Tensor coordinate_blocks(const Tensor& buffer, int64_t n, const BinGroup& g, int64_t per, bool transpose = false) {
  const int64_t rows = g.size * per;
  if (transpose) return view_of(buffer, g.first * per * n, {g.count, n, rows}, {rows * n, 1, n});
  return view_of(buffer, g.first * per * n, {g.count, rows, n}, {rows * n, n, 1});
}

// t in `dtype`: t itself, or a rounded copy.
Tensor in_type(const Tensor& t, ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  Tensor copy = empty(shape_of(t), dtype, t.device());
  torch::stable::copy_(copy, t);
  return copy;
}

// The GEMMs' operands: per bin group, the (count, size C_out, size C_in) diagonal blocks of the mixing matrix, in the
// GEMMs' element type. Views of `mixing` when it is in that type already (the BLAS reads them in place); else
// rounded into contiguous blocks once per call: a GEMM given a strided bfloat16 view copies it on every call
// (oneDNN takes contiguous or transposed operands only), once per chunk, and the blocks are all the GEMMs read.
std::vector<Tensor> gemm_blocks(const Tensor& mixing, const std::vector<BinGroup>& groups, int64_t c_out,
                                int64_t c_in, ScalarType dtype) {
  std::vector<Tensor> blocks;
  for (const BinGroup& g : groups) blocks.push_back(in_type(diagonal_blocks(mixing, g, c_out, c_in), dtype));
  return blocks;
}

// out (r rows_out, n) = blockdiag(blocks) @ in (r rows_in, n), or its transpose with each block transposed.
void block_diagonal_mm(const Tensor& out, const std::vector<Tensor>& blocks, const Tensor& in, int64_t n,
                       int64_t rows_out, int64_t rows_in, bool transpose, const std::vector<BinGroup>& groups) {
  for (size_t k = 0; k < groups.size(); ++k) {
    const Tensor a = transpose ? torch::stable::transpose(blocks[k], 1, 2) : blocks[k];
    aten::bmm_out(coordinate_blocks(out, n, groups[k], rows_out), a, coordinate_blocks(in, n, groups[k], rows_in));
  }
}

// CPU scratch memory kept by each thread between calls, two buffers (the pipeline's two coordinate buffers), each
// kept while at most kKeptScratchBytes: a buffer freed at the end of every call is one glibc may hand back to the
// OS and fault in again at the next (bench/RESULTS.md: 573 page faults a forward + backward at B = 32, C = 128,
// H = W = 8, bfloat16). The buffers live as long as their thread; a call uses them only while it runs.
constexpr size_t kKeptScratchBytes = size_t{4} << 20;

class KeptScratch {
 public:
  // `bytes` of this thread's buffer `slot` (0 or 1), 64-byte aligned; null when over the limit.
  static void* get(int slot, size_t bytes) {
    if (bytes > kKeptScratchBytes) return nullptr;
    thread_local KeptScratch kept;
    Buffer& b = kept.buffers_[slot];
    if (b.bytes < bytes) {
      std::free(b.data);
      const size_t rounded = (bytes + 63) / 64 * 64;
      b.data = std::aligned_alloc(64, rounded);
      b.bytes = b.data == nullptr ? 0 : rounded;
    }
    return b.data;
  }
  ~KeptScratch() {
    for (Buffer& b : buffers_) std::free(b.data);
  }

 private:
  struct Buffer {
    void* data = nullptr;
    size_t bytes = 0;
  };
  Buffer buffers_[2];
};

// Batch entries per chunk of the pipeline, and the scratch storage of one chunk's coordinates.
struct Chunks {
  int64_t batch, pixels, step;

  Chunks(int64_t batch, int64_t pixels, int64_t rows, int64_t chunk_elements)
      : batch(batch), pixels(pixels), step(batch) {
    if (chunk_elements > 0 && rows * pixels > 0) {
      step = std::clamp<int64_t>(chunk_elements / (rows * pixels), 1, std::max<int64_t>(batch, 1));
    }
  }
  // Buffer `slot` (0 or 1) of a call's two: on the CPU this thread's kept memory (KeptScratch) when it fits.
  Tensor scratch(int slot, int64_t rows, ScalarType dtype, const Device& device) const {
    const int64_t n = rows * step * pixels;
    if (device.type() == DeviceType::CPU) {
      const size_t itemsize = dtype == ScalarType::Double ? 8 : dtype == ScalarType::Float ? 4 : 2;
      void* kept = KeptScratch::get(slot, static_cast<size_t>(n) * itemsize);
      const Shape sizes{n}, strides{1};
      if (kept != nullptr) return torch::stable::from_blob(kept, IntRef(sizes), IntRef(strides), device, dtype);
    }
    return empty({n}, dtype, device);
  }
  // A (r, C, nb, P) coordinate buffer as the (nb, r, C, P) operand of a temporal mix.
  View4 coordinates(const Tensor& buffer, int64_t channels, int64_t nb) const {
    return strided<4>(buffer, {pixels, channels * nb * pixels, nb * pixels, 1});
  }
};

// The projection P and the expansion weights W of the kept bins (see TemporalKernels::spectral_basis).
struct SpectralBasis {
  Tensor storage;
  int64_t rank, n_times;

  SpectralBasis(int64_t n_times, int64_t modes, ScalarType dtype, const Device& device,
                const TemporalKernels& kernels)
      : storage(empty({2, spectral_rank(n_times, modes), n_times}, dtype, device)),
        rank(spectral_rank(n_times, modes)),
        n_times(n_times) {
    kernels.spectral_basis(storage, n_times, modes);
  }
  // mix[j, t, c] = P[j, t] (projection) and mix[t, j, c] = P[j, t] (its transpose).
  View3 project() const { return strided<3>(storage, {n_times, 1, 0}); }
  View3 project_transposed() const { return strided<3>(storage, {1, n_times, 0}); }
  // mix[t, j, c] = E[t, j] = W[j, t] (expansion) and mix[j, t, c] = W[j, t] (its transpose).
  View3 expand() const { return strided<3>(storage, {1, n_times, 0}).shifted(rank * n_times); }
  View3 expand_transposed() const { return strided<3>(storage, {n_times, 1, 0}).shifted(rank * n_times); }
};

void check_modes(const char* op, const Tensor& x, int64_t modes) {
  ADJOINTDEIS_CHECK(modes >= 1 && modes <= x.size(1) / 2 + 1, op, ": modes must be in [1, T // 2 + 1] = [1, ",
                    x.size(1) / 2 + 1, "], got ", modes);
}

void check_mixing(const char* op, const Tensor& mixing, const Tensor& x, int64_t modes, int64_t& c_out) {
  check_operand(op, "mixing", mixing, x, opmath_of(x.scalar_type()));
  check_modes(op, x, modes);
  const int64_t c_in = x.size(2), rank = spectral_rank(x.size(1), modes);
  ADJOINTDEIS_CHECK(mixing.dim() == 2 && mixing.size(1) == rank * c_in && mixing.size(0) % rank == 0, op,
                    ": mixing must have shape (r * C_out, r * C_in) with r = ", rank, ", C_in = ", c_in, ", got ",
                    shape_name(mixing.sizes()));
  c_out = mixing.size(0) / rank;
}

void check_weight(const char* op, const Tensor& weight, const Tensor& x, int64_t modes, int64_t& c_out) {
  check_operand(op, "weight", weight, x, opmath_of(x.scalar_type()));
  check_modes(op, x, modes);
  ADJOINTDEIS_CHECK(weight.dim() == 4 && weight.size(0) >= modes && weight.size(1) == x.size(2) &&
                        weight.size(3) == 2,
                    op, ": weight must have shape (K, C_in, C_out, 2) with K >= modes = ", modes, " and C_in = ",
                    x.size(2), ", got ", shape_name(weight.sizes()));
  c_out = weight.size(2);
}

void check_kernel(const char* op, const Tensor& kernel, const Tensor& x) {
  check_operand(op, "kernel", kernel, x, opmath_of(x.scalar_type()));
  ADJOINTDEIS_CHECK(kernel.dim() == 3 && kernel.size(0) == x.size(1) && kernel.size(1) == x.size(1) &&
                        kernel.size(2) == x.size(2),
                    op, ": kernel must have shape (T, T, C) = (", x.size(1), ", ", x.size(1), ", ", x.size(2),
                    "), got ", shape_name(kernel.sizes()));
}

// The GEMMs' element type for activations of x's dtype (TemporalKernels::native_gemm); acc is the accumulation
// type (M's or the weight's dtype). With bfloat16 coordinates the layer rounds like a bfloat16 PyTorch layer: at
// DSNO's shapes the weight's gradient is 4% off the float64 one in L2 (a bfloat16 `x + leaky_relu(x @ W.T)`
// gives 3%), mostly from activations within rounding of the kink, against 2e-7 with float32 GEMMs
// (bench/RESULTS.md).
ScalarType gemm_type(const Tensor& x, ScalarType acc, const TemporalKernels& kernels) {
  return kernels.native_gemm(x.scalar_type()) ? x.scalar_type() : acc;
}

// Per bin group, the transposes of M's diagonal blocks built from the weight (ModeBlocks), in the GEMMs' type.
std::vector<Tensor> weight_blocks(const Tensor& weight, const std::vector<BinGroup>& groups, int64_t c_in,
                                  int64_t c_out, ScalarType dtype, const TemporalKernels& kernels) {
  const View4 w = strided<4>(weight, {weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3)});
  std::vector<Tensor> blocks;
  for (const BinGroup& g : groups) {
    Tensor b = empty({g.count, g.size * c_in, g.size * c_out}, dtype, weight.device());
    kernels.mode_blocks({g.first_bin(), g.count, g.size, c_in, c_out, w, b});
    blocks.push_back(b);
  }
  return blocks;
}

// (count, rows, cols) blocks as their (count, cols, rows) transposes: views, which the BLAS reads in place.
std::vector<Tensor> transposed(const std::vector<Tensor>& blocks) {
  std::vector<Tensor> t;
  for (const Tensor& b : blocks) t.push_back(torch::stable::transpose(b, 1, 2));
  return t;
}

// The layer's forward given its GEMM operands m: per bin group the (count, size C_out, size C_in) diagonal blocks
// of M in the GEMMs' type `gemm` (views the BLAS reads); acc is the accumulation type.
std::tuple<Tensor, Tensor> spectral_forward(const Tensor& x, const std::vector<Tensor>& m, int64_t c_out,
                                            ScalarType acc, ScalarType gemm, int64_t modes, bool residual,
                                            std::optional<double> negative_slope, bool save_mask,
                                            const TemporalKernels& kernels) {
  const int64_t batch = x.size(0), n_times = x.size(1), c_in = x.size(2);
  const int64_t pixels = x.size(3) * x.size(4), rank = spectral_rank(n_times, modes);
  const Shape y_shape{batch, n_times, c_out, x.size(3), x.size(4)};
  Tensor y = empty(y_shape, x.scalar_type(), x.device());
  Tensor mask = make_mask(save_mask, negative_slope, y_shape, x);
  if (y.numel() == 0) return {y, mask};

  const SpectralBasis basis(n_times, modes, acc, x.device(), kernels);
  Tensor x_owner;
  const View4 x4 = activations(x, x_owner), y4 = dense4(y, n_times, c_out, pixels);
  bool* mask4 = mask_data(mask);
  const std::vector<BinGroup> groups = bin_groups(n_times, modes);
  const Chunks chunks(batch, pixels, rank * std::max(c_in, c_out), kernels.chunk_elements);
  const Tensor u = chunks.scratch(0, rank * c_in, gemm, x.device());
  const Tensor v = chunks.scratch(1, rank * c_out, gemm, x.device());
  const int64_t y_batch = n_times * c_out * pixels;
  for (int64_t b0 = 0; b0 < batch; b0 += chunks.step) {
    const int64_t nb = std::min(chunks.step, batch - b0);
    const View4 x_chunk = x4.shifted(b0 * x4.stride[0]);
    kernels.temporal_mix({nb, rank, n_times, c_in, pixels, x_chunk, nullptr, 1.0, basis.project(), View4{},
                          chunks.coordinates(u, c_in, nb), nullptr, std::nullopt});
    block_diagonal_mm(v, m, u, nb * pixels, c_out, c_in, /*transpose=*/false, groups);
    kernels.temporal_mix({nb, n_times, rank, c_out, pixels, chunks.coordinates(v, c_out, nb), nullptr, 1.0,
                          basis.expand(), residual ? x_chunk : View4{}, y4.shifted(b0 * y_batch),
                          mask4 == nullptr ? nullptr : mask4 + b0 * y_batch, negative_slope});
  }
  return {y, mask};
}

// The layer's backward given its GEMM operands (as spectral_forward's; read only when want_dx): dL/dx, and when
// want_blocks per bin group dL/d(M's diagonal blocks) (count, size C_out, size C_in), or their transposes
// (count, size C_in, size C_out) when `transposed`, in the accumulation type (none for an empty input).
std::tuple<Tensor, std::vector<Tensor>> spectral_backward(const Tensor& grad_y, const Tensor& x,
                                                          const std::vector<Tensor>& m, const Tensor& mask,
                                                          int64_t c_out, ScalarType acc, ScalarType gemm,
                                                          int64_t modes, bool residual,
                                                          std::optional<double> negative_slope, bool want_dx,
                                                          bool want_blocks, bool transposed,
                                                          const TemporalKernels& kernels) {
  const int64_t batch = x.size(0), n_times = x.size(1), c_in = x.size(2);
  const int64_t pixels = x.size(3) * x.size(4), rank = spectral_rank(n_times, modes);
  Tensor grad_x;
  std::vector<Tensor> grad_blocks;  // per bin group: the gradient's diagonal blocks so far
  if (want_dx) grad_x = empty(shape_of(x), x.scalar_type(), x.device());
  if (x.numel() == 0 || grad_y.numel() == 0) {
    if (want_dx) torch::stable::zero_(grad_x);
    return {grad_x, grad_blocks};
  }
  const SpectralBasis basis(n_times, modes, acc, x.device(), kernels);
  Tensor x_owner, grad_owner;
  const View4 x4 = activations(x, x_owner), grad4 = activations(grad_y, grad_owner);
  const bool* mask4 = negative_slope.has_value() ? mask.const_data_ptr<bool>() : nullptr;
  const View4 dx4 = want_dx ? dense4(grad_x, n_times, c_in, pixels) : View4{};
  const std::vector<BinGroup> groups = bin_groups(n_times, modes);
  const Chunks chunks(batch, pixels, rank * std::max(c_in, c_out), kernels.chunk_elements);
  const Tensor dv = chunks.scratch(0, rank * c_out, gemm, x.device());
  const Tensor scratch = chunks.scratch(1, rank * c_in, gemm, x.device());
  const int64_t y_batch = n_times * c_out * pixels, x_batch = n_times * c_in * pixels;
  for (int64_t b0 = 0; b0 < batch; b0 += chunks.step) {
    const int64_t nb = std::min(chunks.step, batch - b0), n = nb * pixels;
    // dv: the adjoint of the expansion applied to dL/d(pre-activation).
    const View4 grad_chunk = grad4.shifted(b0 * grad4.stride[0]);
    kernels.temporal_mix({nb, rank, n_times, c_out, pixels, grad_chunk,
                          mask4 == nullptr ? nullptr : mask4 + b0 * y_batch, negative_slope.value_or(1.0),
                          basis.expand_transposed(), View4{}, chunks.coordinates(dv, c_out, nb), nullptr,
                          std::nullopt});
    if (want_blocks) {
      kernels.temporal_mix({nb, rank, n_times, c_in, pixels, x4.shifted(b0 * x4.stride[0]), nullptr, 1.0,
                            basis.project(), View4{}, chunks.coordinates(scratch, c_in, nb), nullptr, std::nullopt});
      for (size_t k = 0; k < groups.size(); ++k) {
        const Tensor product =
            transposed ? aten::bmm(coordinate_blocks(scratch, n, groups[k], c_in),
                                   coordinate_blocks(dv, n, groups[k], c_out, /*transpose=*/true))
                       : aten::bmm(coordinate_blocks(dv, n, groups[k], c_out),
                                   coordinate_blocks(scratch, n, groups[k], c_in, /*transpose=*/true));
        const Tensor partial = in_type(product, acc);  // summed over the chunks in the accumulation type
        // 2.13's stable API has no in-place add: total - (-1) partial.
        if (b0 == 0) grad_blocks.push_back(partial);
        else grad_blocks[k] = torch::stable::subtract(grad_blocks[k], partial, -1.0);
      }
    }
    if (want_dx) {
      block_diagonal_mm(scratch, m, dv, n, c_in, c_out, /*transpose=*/true, groups);
      kernels.temporal_mix({nb, n_times, rank, c_in, pixels, chunks.coordinates(scratch, c_in, nb), nullptr, 1.0,
                            basis.project_transposed(), residual ? grad_chunk : View4{}, dx4.shifted(b0 * x_batch),
                            nullptr, std::nullopt});
    }
  }
  return {grad_x, grad_blocks};
}

void check_residual(const char* op, bool residual, int64_t c_in, int64_t c_out) {
  ADJOINTDEIS_CHECK(!residual || c_out == c_in, op, ": residual needs C_out == C_in, got C_in = ", c_in,
                    " and C_out = ", c_out);
}

}  // namespace

std::tuple<Tensor, Tensor> fourier_spectral_conv(const Tensor& x, const Tensor& mixing, int64_t modes,
                                                 bool residual, std::optional<double> negative_slope,
                                                 bool save_mask, DeviceType device_type,
                                                 const TemporalKernels& kernels) {
  const char* op = "fourier_spectral_conv";
  check_activations(op, x, device_type);
  int64_t c_out = 0;
  check_mixing(op, mixing, x, modes, c_out);
  check_residual(op, residual, x.size(2), c_out);
  const ScalarType acc = mixing.scalar_type(), gemm = gemm_type(x, acc, kernels);
  const std::vector<Tensor> m = gemm_blocks(mixing, bin_groups(x.size(1), modes), c_out, x.size(2), gemm);
  return spectral_forward(x, m, c_out, acc, gemm, modes, residual, negative_slope, save_mask, kernels);
}

std::tuple<Tensor, Tensor> fourier_spectral_conv_backward(const Tensor& grad_y, const Tensor& x,
                                                          const Tensor& mixing, const Tensor& mask, int64_t modes,
                                                          bool residual, std::optional<double> negative_slope,
                                                          const std::vector<bool>& output_mask,
                                                          DeviceType device_type, const TemporalKernels& kernels) {
  const char* op = "fourier_spectral_conv_backward";
  check_activations(op, x, device_type);
  check_output_mask(op, output_mask);
  int64_t c_out = 0;
  check_mixing(op, mixing, x, modes, c_out);
  const Shape y_shape{x.size(0), x.size(1), c_out, x.size(3), x.size(4)};
  check_grad_and_mask(op, grad_y, mask, x, y_shape, negative_slope);

  const ScalarType acc = mixing.scalar_type(), gemm = gemm_type(x, acc, kernels);
  const std::vector<BinGroup> groups = bin_groups(x.size(1), modes);
  const std::vector<Tensor> m = output_mask[0] ? gemm_blocks(mixing, groups, c_out, x.size(2), gemm)
                                               : std::vector<Tensor>{};
  auto [grad_x, grad_blocks] = spectral_backward(grad_y, x, m, mask, c_out, acc, gemm, modes, residual,
                                                 negative_slope, output_mask[0], output_mask[1],
                                                 /*transposed=*/false, kernels);
  Tensor grad_mixing;
  if (output_mask[1]) {
    grad_mixing = zeros(shape_of(mixing), acc, x.device());
    for (size_t k = 0; k < grad_blocks.size(); ++k) {
      Tensor target = diagonal_blocks(grad_mixing, groups[k], c_out, x.size(2));
      torch::stable::copy_(target, grad_blocks[k]);
    }
  }
  return {grad_x, grad_mixing};
}

std::tuple<Tensor, Tensor> fourier_mode_conv(const Tensor& x, const Tensor& weight, int64_t modes, bool residual,
                                             std::optional<double> negative_slope, bool save_mask,
                                             DeviceType device_type, const TemporalKernels& kernels) {
  const char* op = "fourier_mode_conv";
  check_activations(op, x, device_type);
  int64_t c_out = 0;
  check_weight(op, weight, x, modes, c_out);
  check_residual(op, residual, x.size(2), c_out);
  const ScalarType acc = weight.scalar_type(), gemm = gemm_type(x, acc, kernels);
  const std::vector<Tensor> blocks =
      weight_blocks(weight, bin_groups(x.size(1), modes), x.size(2), c_out, gemm, kernels);
  return spectral_forward(x, transposed(blocks), c_out, acc, gemm, modes, residual, negative_slope, save_mask,
                          kernels);
}

std::tuple<Tensor, Tensor> fourier_mode_conv_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                      const Tensor& mask, int64_t modes, bool residual,
                                                      std::optional<double> negative_slope,
                                                      const std::vector<bool>& output_mask, DeviceType device_type,
                                                      const TemporalKernels& kernels) {
  const char* op = "fourier_mode_conv_backward";
  check_activations(op, x, device_type);
  check_output_mask(op, output_mask);
  int64_t c_out = 0;
  check_weight(op, weight, x, modes, c_out);
  const int64_t c_in = x.size(2);
  const Shape y_shape{x.size(0), x.size(1), c_out, x.size(3), x.size(4)};
  check_grad_and_mask(op, grad_y, mask, x, y_shape, negative_slope);

  const ScalarType acc = weight.scalar_type(), gemm = gemm_type(x, acc, kernels);
  const std::vector<BinGroup> groups = bin_groups(x.size(1), modes);
  const std::vector<Tensor> m = output_mask[0] ? transposed(weight_blocks(weight, groups, c_in, c_out, gemm, kernels))
                                               : std::vector<Tensor>{};
  auto [grad_x, grad_blocks] = spectral_backward(grad_y, x, m, mask, c_out, acc, gemm, modes, residual,
                                                 negative_slope, output_mask[0], output_mask[1],
                                                 /*transposed=*/true, kernels);
  Tensor grad_weight;
  if (output_mask[1]) {
    grad_weight = empty(shape_of(weight), acc, x.device());
    if (grad_blocks.empty()) {
      torch::stable::zero_(grad_weight);
    } else {
      const int64_t bin_elements = c_in * c_out * 2;
      if (weight.size(0) > modes) {  // bins beyond `modes` have no effect
        Tensor unused = view_of(grad_weight, modes * bin_elements, {(weight.size(0) - modes) * bin_elements}, {1});
        torch::stable::zero_(unused);
      }
      for (size_t k = 0; k < groups.size(); ++k) {
        const BinGroup& g = groups[k];
        kernels.mode_grad({g.first_bin(), g.count, g.size, c_in, c_out, grad_blocks[k], grad_weight});
      }
    }
  }
  return {grad_x, grad_weight};
}

std::tuple<Tensor, Tensor> fourier_channel_conv(const Tensor& x, const Tensor& kernel, bool residual,
                                                std::optional<double> negative_slope, bool save_mask,
                                                DeviceType device_type, const TemporalKernels& kernels) {
  const char* op = "fourier_channel_conv";
  check_activations(op, x, device_type);
  check_kernel(op, kernel, x);
  const int64_t batch = x.size(0), n_times = x.size(1), channels = x.size(2), pixels = x.size(3) * x.size(4);
  const Shape shape = shape_of(x);
  Tensor y = empty(shape, x.scalar_type(), x.device());
  Tensor mask = make_mask(save_mask, negative_slope, shape, x);
  if (y.numel() > 0) {
    Tensor x_owner;
    const View4 x4 = activations(x, x_owner);
    kernels.temporal_mix({batch, n_times, n_times, channels, pixels, x4, nullptr, 1.0,
                          strided<3>(kernel, {kernel.stride(0), kernel.stride(1), kernel.stride(2)}),
                          residual ? x4 : View4{}, dense4(y, n_times, channels, pixels), mask_data(mask),
                          negative_slope});
  }
  return {y, mask};
}

std::tuple<Tensor, Tensor> fourier_channel_conv_backward(const Tensor& grad_y, const Tensor& x,
                                                         const Tensor& kernel, const Tensor& mask, bool residual,
                                                         std::optional<double> negative_slope,
                                                         const std::vector<bool>& output_mask,
                                                         DeviceType device_type, const TemporalKernels& kernels) {
  const char* op = "fourier_channel_conv_backward";
  check_activations(op, x, device_type);
  check_output_mask(op, output_mask);
  check_kernel(op, kernel, x);
  const int64_t batch = x.size(0), n_times = x.size(1), channels = x.size(2), pixels = x.size(3) * x.size(4);
  const Shape shape = shape_of(x);
  check_grad_and_mask(op, grad_y, mask, x, shape, negative_slope);
  const ScalarType acc = kernel.scalar_type();
  Tensor grad_owner;
  const View4 grad4 = activations(grad_y, grad_owner);
  const bool* act_mask = negative_slope.has_value() ? mask.const_data_ptr<bool>() : nullptr;
  Tensor grad_x, grad_kernel;
  if (output_mask[0]) {
    // The transpose of the per-channel mix, applied to dL/d(pre-activation).
    grad_x = empty(shape, x.scalar_type(), x.device());
    if (grad_x.numel() > 0) {
      kernels.temporal_mix({batch, n_times, n_times, channels, pixels, grad4, act_mask, negative_slope.value_or(1.0),
                            strided<3>(kernel, {kernel.stride(1), kernel.stride(0), kernel.stride(2)}),
                            residual ? grad4 : View4{}, dense4(grad_x, n_times, channels, pixels), nullptr,
                            std::nullopt});
    }
  }
  if (output_mask[1]) {
    // dz and x as (C, T, B P); G[c, t, s] = sum_{b, p} dz[b, t, c, p] x[b, s, c, p]; grad_kernel = G as (T, T, C).
    const int64_t n = batch * pixels;
    Tensor dz = empty({channels, n_times, batch, pixels}, acc, x.device());
    Tensor x_cols = empty({channels, n_times, batch, x.size(3), x.size(4)}, acc, x.device());
    if (dz.numel() > 0) {
      kernels.epilogue_backward({batch, n_times, channels, pixels, grad4, act_mask,
                                 strided<4>(dz, {pixels, batch * pixels, n_times * batch * pixels, 1}),
                                 negative_slope});
      torch::stable::copy_(x_cols, aten::permute(x, {2, 1, 0, 3, 4}));
    }
    const Tensor gram = aten::bmm(view_of(dz, 0, {channels, n_times, n}, {n_times * n, n, 1}),
                                  view_of(x_cols, 0, {channels, n, n_times}, {n_times * n, 1, n}));
    grad_kernel = torch::stable::contiguous(aten::permute(gram, {1, 2, 0}));
  }
  return {grad_x, grad_kernel};
}

}  // namespace adjointdeis
