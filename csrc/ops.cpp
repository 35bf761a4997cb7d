// Declares every op of the adjointdeis library (one place for all schemas) and the
// Python extension module adjointdeis._C. Backends register kernels in cpu/ and cuda/.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "multistep_step.h"

namespace adjointdeis {
namespace {

struct CudaBuild {
  int64_t version = -1;  // CUDA_VERSION of the toolkit, -1 for a CPU-only build
  std::string archs;
};

// Function-local so that the CUDA translation unit can register at load time
// whatever the order in which static initialisers run.
CudaBuild& cuda_build() {
  static CudaBuild build;
  return build;
}

int64_t cuda_version() { return cuda_build().version; }

}  // namespace

void register_cuda_build(int64_t version, const char* arch_list) {
  cuda_build().version = version;
  cuda_build().archs = arch_list;
}

std::string cuda_arch_list() { return cuda_build().archs; }

TORCH_LIBRARY(adjointdeis, m) {
  m.def(
      "multistep_step(Tensor x, Tensor out, Tensor[] history, Tensor coeffs, Tensor? noise)"
      " -> (Tensor x_next, Tensor m0)");
  m.def("ctm_step(Tensor x, Tensor g, Tensor coeffs, Tensor? noise) -> Tensor");
  m.def(
      "discrete_adjoint_step(Tensor xbar, Tensor vjp, Tensor gfull, Tensor? pend1, Tensor? pend2,"
      " Tensor coeffs) -> (Tensor xbar_prev, Tensor gfull_prev, Tensor cot_prev, Tensor pend_prev)");
  m.def("multi_tensor_axpy_(Tensor(a!)[] accumulators, Tensor[] updates, Tensor scale) -> ()");
  m.def("fourier_kernel_synthesis(Tensor weight, int n_times, int modes) -> Tensor");
  m.def(
      "fourier_kernel_synthesis_adjoint(Tensor grad_kernel, int n_times, int modes,"
      " int num_weight_modes, int in_channels) -> Tensor");
  m.def("fourier_tap_synthesis(Tensor weight, int n_times, int modes) -> Tensor");
  m.def(
      "fourier_tap_synthesis_adjoint(Tensor grad_taps, int n_times, int modes,"
      " int num_weight_modes) -> Tensor");
  m.def("fourier_mode_mixing(Tensor weight, int n_times, int modes) -> Tensor");
  m.def(
      "fourier_mode_mixing_adjoint(Tensor grad_mixing, int n_times, int modes,"
      " int num_weight_modes) -> Tensor");
  m.def(
      "fourier_spectral_conv(Tensor x, Tensor mixing, int modes, bool residual,"
      " float? negative_slope, bool save_mask) -> (Tensor y, Tensor mask)");
  m.def(
      "fourier_spectral_conv_backward(Tensor grad_y, Tensor x, Tensor mixing, Tensor mask,"
      " int modes, bool residual, float? negative_slope, bool[2] output_mask)"
      " -> (Tensor grad_x, Tensor grad_mixing)");
  m.def(
      "fourier_channel_conv(Tensor x, Tensor taps, bool residual, float? negative_slope,"
      " bool save_mask) -> (Tensor y, Tensor mask)");
  m.def(
      "fourier_channel_conv_backward(Tensor grad_y, Tensor x, Tensor taps, Tensor mask,"
      " bool residual, float? negative_slope, bool[2] output_mask)"
      " -> (Tensor grad_x, Tensor grad_taps)");
  m.def("cuda_version() -> int", &cuda_version);
}

}  // namespace adjointdeis

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Compiled kernels of adjointdeis; the ops live in torch.ops.adjointdeis.";
  module.def("cuda_arch_list", &adjointdeis::cuda_arch_list,
             "Comma-separated compute capabilities the CUDA kernels were compiled for.");
}
