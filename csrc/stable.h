// The LibTorch stable ABI as this extension uses it: checks that raise plain messages, the dtype,
// device and shape names those messages print, element-type dispatch, and dispatcher calls to the
// ATen ops that the stable API of the target version (torch 2.13, TORCH_TARGET_VERSION) has no
// wrapper for. Everything here is header-only over torch/csrc/stable and torch/headeronly, so the
// binary calls libtorch only through its C shim and loads in every torch from the target on.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifndef STABLE_TORCH_ERROR_CODE_CHECK  // torch 2.11 and 2.12 (ADJOINTDEIS_TORCH_TARGET) name it TORCH_ERROR_CODE_CHECK
#define STABLE_TORCH_ERROR_CODE_CHECK TORCH_ERROR_CODE_CHECK
#endif

namespace adjointdeis {

using torch::headeronly::DeviceType;
using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::Tensor;
using Shape = std::vector<int64_t>;
using IntRef = torch::headeronly::IntHeaderOnlyArrayRef;

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

}  // namespace adjointdeis

// Throws std::runtime_error (RuntimeError in Python) carrying only the message when cond is false.
#define ADJOINTDEIS_CHECK(cond, ...)                                 \
  do {                                                               \
    if (!(cond)) throw std::runtime_error(::adjointdeis::str(__VA_ARGS__)); \
  } while (0)

namespace adjointdeis {

// "cpu", "cuda:0", "meta": the device as torch prints it.
inline std::string device_name(const Device& device) {
  std::string name;
  switch (device.type()) {
    case DeviceType::CPU: name = "cpu"; break;
    case DeviceType::CUDA: name = "cuda"; break;
    case DeviceType::Meta: name = "meta"; break;
    default: name = str("device_type_", static_cast<int>(device.type())); break;
  }
  return device.has_index() ? str(name, ":", device.index()) : name;
}

inline std::string device_type_name(DeviceType type) { return device_name(Device(type)); }

// "[3, 4]".
inline std::string shape_name(IntRef sizes) {
  std::ostringstream out;
  out << '[';
  for (size_t k = 0; k < sizes.size(); ++k) out << (k ? ", " : "") << sizes[k];
  out << ']';
  return out.str();
}

inline bool same_shape(IntRef a, IntRef b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

inline Shape shape_of(const Tensor& t) {
  const IntRef sizes = t.sizes();
  return Shape(sizes.begin(), sizes.end());
}

// shape broadcast with `sizes` (numpy rules), or nullopt when they do not broadcast.
inline std::optional<Shape> broadcast_shapes(const Shape& shape, IntRef sizes) {
  const size_t n = std::max(shape.size(), sizes.size());
  Shape out(n);
  for (size_t k = 0; k < n; ++k) {
    const int64_t a = k < n - shape.size() ? 1 : shape[k - (n - shape.size())];
    const int64_t b = k < n - sizes.size() ? 1 : sizes[k - (n - sizes.size())];
    if (a != b && a != 1 && b != 1) return std::nullopt;
    out[k] = a == 1 ? b : a;
  }
  return out;
}

template <typename T>
struct TypeTag {
  using type = T;
};

using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// The type kernels accumulate in: double for double data, float otherwise.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr ScalarType scalar_type_of() {
  if constexpr (std::is_same_v<T, double>) return ScalarType::Double;
  else if constexpr (std::is_same_v<T, float>) return ScalarType::Float;
  else if constexpr (std::is_same_v<T, Half>) return ScalarType::Half;
  else return ScalarType::BFloat16;
}

// True for the value types of the elementwise and temporal kernels.
inline bool is_step_dtype(ScalarType t) {
  return t == ScalarType::Double || t == ScalarType::Float || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

inline ScalarType opmath_of(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// Calls f(TypeTag<T>{}) with the element type T of dtype, one of float64/32/16/bf16.
template <typename F>
void dispatch_step_types(ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case ScalarType::Double: f(TypeTag<double>{}); return;
    case ScalarType::Float: f(TypeTag<float>{}); return;
    case ScalarType::Half: f(TypeTag<Half>{}); return;
    case ScalarType::BFloat16: f(TypeTag<BFloat16>{}); return;
    default: ADJOINTDEIS_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// Calls f(TypeTag<T>{}) for float64 or float32.
template <typename F>
void dispatch_opmath_types(ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case ScalarType::Double: f(TypeTag<double>{}); return;
    case ScalarType::Float: f(TypeTag<float>{}); return;
    default: ADJOINTDEIS_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// Calls f(std::bool_constant<flag>{}) so a runtime switch selects a compile-time variant.
template <typename F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// A contiguous uninitialised tensor, through the C shim's allocator entry (no dispatcher call: the
// elementwise ops allocate their outputs on every call).
inline Tensor empty(const Shape& shape, ScalarType dtype, const Device& device) {
  Shape strides(shape.size());
  int64_t stride = 1;
  for (size_t k = shape.size(); k-- > 0;) {
    strides[k] = stride;
    stride *= std::max<int64_t>(shape[k], 1);
  }
  using torch::stable::detail::from;
  using torch::stable::detail::to;
  AtenTensorHandle handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(shape.size()), shape.data(), strides.data(), to<int32_t>(from(dtype)),
      to<int32_t>(from(device.type())), device.index(), &handle));
  return Tensor(handle);
}

inline Tensor zeros(const Shape& shape, ScalarType dtype, const Device& device) {
  Tensor t = empty(shape, dtype, device);
  torch::stable::zero_(t);
  return t;
}

// t broadcast to `shape` as a contiguous tensor: t itself when it already is one.
inline Tensor dense(const Tensor& t, const Shape& shape) {
  if (same_shape(t.sizes(), IntRef(shape)) && t.is_contiguous()) return t;
  Tensor out = empty(shape, t.scalar_type(), t.device());
  torch::stable::copy_(out, t);
  return out;
}

// A tensor over memory owned by another tensor, which must outlive it (a view made without a
// dispatcher call).
inline Tensor view_of(const Tensor& owner, int64_t offset, const Shape& sizes, const Shape& strides) {
  char* base = static_cast<char*>(owner.data_ptr()) + offset * static_cast<int64_t>(owner.element_size());
  return torch::stable::from_blob(base, IntRef(sizes), IntRef(strides), owner.device(), owner.scalar_type());
}

namespace aten {

// Calls the ATen op name.overload through the dispatcher with every argument of its schema, in
// order, and returns its first result. For the ops the stable API of the target version does not
// wrap; 2.13's dispatcher bridge cannot pass a Scalar, so ops with Scalar arguments are out of reach.
template <typename... Args>
Tensor call(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

inline Tensor bmm(const Tensor& a, const Tensor& b) { return call("aten::bmm", "", a, b); }

inline void bmm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  call("aten::bmm", "out", a, b, out);
}

inline Tensor permute(const Tensor& t, const Shape& dims) { return call("aten::permute", "", t, IntRef(dims)); }

}  // namespace aten
}  // namespace adjointdeis
