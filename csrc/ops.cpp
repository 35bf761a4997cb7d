// Declares every op of the adjointdeis library (one place for all schemas) and the Python
// extension module adjointdeis._C, whose import registers them. Backends register kernels in
// cpu/ and cuda/.
#include <Python.h>

#include <string>
#include <tuple>

#include "build.h"
#include "stable.h"

namespace adjointdeis {
namespace {

struct CudaBuild {
  int64_t version = -1;  // CUDA_VERSION of the toolkit, -1 for a CPU-only build
  std::string archs;     // __CUDA_ARCH_LIST__, e.g. "800,900"
};

// Function-local so that the CUDA translation unit can register at load time
// whatever the order in which static initialisers run.
CudaBuild& cuda_build_record() {
  static CudaBuild build;
  return build;
}

std::tuple<int64_t, std::string> cuda_build() { return {cuda_build_record().version, cuda_build_record().archs}; }

}  // namespace

void register_cuda_build(int64_t version, const char* arch_list) {
  cuda_build_record().version = version;
  cuda_build_record().archs = arch_list;
}

STABLE_TORCH_LIBRARY(adjointdeis, m) {
  m.def(
      "multistep_step(Tensor x, Tensor out, Tensor[] history, Tensor coeffs, Tensor? noise,"
      " bool save_m0) -> (Tensor x_next, Tensor m0)");
  m.def(
      "multistep_step_out(Tensor x, Tensor out, Tensor[] history, Tensor coeffs, Tensor? noise,"
      " Tensor(a!) x_next, Tensor(b!)? m0, Tensor(c!)? finite=None) -> ()");
  m.def(
      "discrete_adjoint_step(Tensor xbar, Tensor vjp, Tensor gfull, Tensor? pend1, Tensor? pend2,"
      " Tensor coeffs) -> (Tensor xbar_prev, Tensor gfull_prev, Tensor cot_prev, Tensor pend_prev)");
  m.def("multi_tensor_axpy_(Tensor(a!)[] accumulators, Tensor[] updates, Tensor scale) -> ()");
  m.def(
      "fourier_spectral_conv(Tensor x, Tensor mixing, int modes, bool residual, float? negative_slope,"
      " bool save_mask) -> (Tensor y, Tensor mask)");
  m.def(
      "fourier_spectral_conv_backward(Tensor grad_y, Tensor x, Tensor mixing, Tensor mask, int modes,"
      " bool residual, float? negative_slope, bool[2] output_mask) -> (Tensor grad_x, Tensor grad_mixing)");
  m.def(
      "fourier_mode_conv(Tensor x, Tensor weight, int modes, bool residual, float? negative_slope,"
      " bool save_mask) -> (Tensor y, Tensor mask)");
  m.def(
      "fourier_mode_conv_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor mask, int modes,"
      " bool residual, float? negative_slope, bool[2] output_mask) -> (Tensor grad_x, Tensor grad_weight)");
  m.def(
      "fourier_channel_conv(Tensor x, Tensor kernel, bool residual, float? negative_slope, bool save_mask)"
      " -> (Tensor y, Tensor mask)");
  m.def(
      "fourier_channel_conv_backward(Tensor grad_y, Tensor x, Tensor kernel, Tensor mask, bool residual,"
      " float? negative_slope, bool[2] output_mask) -> (Tensor grad_x, Tensor grad_kernel)");
  m.def("cuda_build() -> (int cuda_version, str arch_list)");
}

STABLE_TORCH_LIBRARY_IMPL(adjointdeis, CompositeExplicitAutograd, m) {
  m.impl("cuda_build", TORCH_BOX(&cuda_build));
}

}  // namespace adjointdeis

// A plain extension module (Python's limited API, no pybind11): importing it runs the
// registrations above; the ops live in torch.ops.adjointdeis.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "Compiled kernels of adjointdeis; the ops live in torch.ops.adjointdeis.", -1,
                               nullptr};
  return PyModule_Create(&module);
}
