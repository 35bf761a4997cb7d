// The host side of the elementwise ops: the checks every message of which names the op and the argument,
// broadcasting, and the operands each backend's kernel receives.
#include "discrete_adjoint_step.h"
#include "multi_tensor_axpy.h"
#include "multistep_step.h"
#include "operands.h"

namespace adjointdeis {

void OperandCheck::check_reference() const {
  ADJOINTDEIS_CHECK(is_step_dtype(ref.scalar_type()), op, ": ", ref_name,
                    " must be float64, float32, float16 or bfloat16, got ", ref.scalar_type());
  ADJOINTDEIS_CHECK(ref.device().type() == device_type, op, ": ", ref_name, " is on ",
                    device_name(ref.device()), ", expected a ", device_type_name(device_type), " tensor");
}

void OperandCheck::check_coeffs(const Tensor& coeffs, int64_t count, const char* layout) const {
  ADJOINTDEIS_CHECK(coeffs.scalar_type() == ScalarType::Double, op, ": coeffs must be float64, got ",
                    coeffs.scalar_type());
  ADJOINTDEIS_CHECK(coeffs.device() == ref.device(), op, ": coeffs is on ", device_name(coeffs.device()),
                    " but ", ref_name, " is on ", device_name(ref.device()));
  ADJOINTDEIS_CHECK(coeffs.dim() == 1 && coeffs.size(0) == count, op, ": coeffs must have shape [", count,
                    "] (", layout, "), got ", shape_name(coeffs.sizes()));
}

void OperandCheck::check(const char* name, const Tensor& t) const {
  ADJOINTDEIS_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                    " but ", ref_name, " has dtype ", ref.scalar_type());
  ADJOINTDEIS_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", device_name(t.device()), " but ",
                    ref_name, " is on ", device_name(ref.device()));
}

void OperandCheck::merge_shape(Shape& shape, const char* name, const Tensor& t) const {
  const std::optional<Shape> merged = broadcast_shapes(shape, t.sizes());
  ADJOINTDEIS_CHECK(merged.has_value(), op, ": ", name, " with shape ", shape_name(t.sizes()),
                    " does not broadcast with ", ref_name, "'s shape ", shape_name(ref.sizes()));
  shape = *merged;
}

namespace {

// The checked inputs of one step, broadcast to their common shape and contiguous; no outputs yet.
StepOperands step_inputs(const char* op, const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                         const Tensor& coeffs, const std::optional<Tensor>& noise, DeviceType device_type,
                         Shape& shape) {
  const OperandCheck check{op, "x", x, device_type};
  check.check_reference();
  ADJOINTDEIS_CHECK(history.size() <= static_cast<size_t>(kMaxHistory), op, ": history holds at most ",
                    kMaxHistory, " tensors, got ", history.size());
  const bool wide = history.size() == kMaxHistory || (coeffs.dim() == 1 && coeffs.size(0) == kNumStepCoeffs);
  if (wide) {
    check.check_coeffs(coeffs, kNumStepCoeffs, "[a, b0, b1, b2, c, p, q, b3]");
  } else {
    check.check_coeffs(coeffs, step_coeff_count(0), "[a, b0, b1, b2, c, p, q]");
  }

  const char* history_names[kMaxHistory] = {"history[0]", "history[1]", "history[2]"};
  check.check("out", out);
  for (size_t k = 0; k < history.size(); ++k) check.check(history_names[k], history[k]);
  if (noise.has_value()) check.check("noise", *noise);

  shape = shape_of(x);
  check.merge_shape(shape, "out", out);
  for (size_t k = 0; k < history.size(); ++k) check.merge_shape(shape, history_names[k], history[k]);
  if (noise.has_value()) check.merge_shape(shape, "noise", *noise);

  StepOperands ops;
  ops.x = dense(x, shape);
  ops.out = dense(out, shape);
  for (const Tensor& h : history) ops.history.push_back(dense(h, shape));
  ops.has_noise = noise.has_value();
  if (ops.has_noise) ops.noise = dense(*noise, shape);
  ops.coeffs = coeffs.is_contiguous() ? coeffs : torch::stable::contiguous(coeffs);
  return ops;
}

// The bytes a tensor's elements span, from its first element to one past its last (strides are never negative).
std::pair<const char*, const char*> extent(const Tensor& t) {
  const char* begin = static_cast<const char*>(t.data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + (last + 1) * static_cast<int64_t>(t.element_size())};
}

bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [a_begin, a_end] = extent(a);
  const auto [b_begin, b_end] = extent(b);
  return a_begin < b_end && b_begin < a_end;
}

// Whether b is the tensor a (an output) would be written in place of: the same memory in the same layout.
bool same_memory(const Tensor& a, const Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() && same_shape(a.sizes(), b.sizes()) &&
         b.is_contiguous();
}

using NamedTensors = std::vector<std::pair<const char*, Tensor>>;

// A caller's output buffer: x's dtype and device, the operands' broadcast shape, contiguous, and either one of
// the inputs itself (written in place of it: returns true) or apart from every input.
bool check_output(const OperandCheck& check, const char* name, const Tensor& t, const Shape& shape,
                  const NamedTensors& inputs) {
  check.check(name, t);
  ADJOINTDEIS_CHECK(same_shape(t.sizes(), IntRef(shape)), check.op, ": ", name,
                    " must have the operands' broadcast shape ", shape_name(IntRef(shape)), ", got ",
                    shape_name(t.sizes()));
  ADJOINTDEIS_CHECK(t.is_contiguous(), check.op, ": ", name, " must be contiguous");
  bool in_place = false;
  for (const auto& [input_name, input] : inputs) {
    if (same_memory(t, input)) {
      in_place = true;
      continue;
    }
    ADJOINTDEIS_CHECK(!overlaps(t, input), check.op, ": ", name, " shares memory with ", input_name,
                      "; an output must be an input itself (written in place) or apart from every input");
  }
  return in_place;
}

}  // namespace

StepOperands prepare_multistep_step(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                                    const Tensor& coeffs, const std::optional<Tensor>& noise, bool save_m0,
                                    DeviceType device_type) {
  Shape shape;
  StepOperands ops = step_inputs("multistep_step", x, out, history, coeffs, noise, device_type, shape);
  ops.save_m0 = save_m0;
  ops.x_next = empty(shape, x.scalar_type(), x.device());
  ops.m0 = empty(save_m0 ? shape : Shape{0}, x.scalar_type(), x.device());
  return ops;
}

StepOperands prepare_multistep_step_out(const Tensor& x, const Tensor& out, const std::vector<Tensor>& history,
                                        const Tensor& coeffs, const std::optional<Tensor>& noise,
                                        const Tensor& x_next, const std::optional<Tensor>& m0,
                                        const std::optional<Tensor>& finite, DeviceType device_type) {
  const OperandCheck check{"multistep_step_out", "x", x, device_type};
  Shape shape;
  StepOperands ops = step_inputs(check.op, x, out, history, coeffs, noise, device_type, shape);
  const char* history_names[kMaxHistory] = {"history[0]", "history[1]", "history[2]"};
  NamedTensors inputs = {{"x", x}, {"out", out}};
  for (size_t k = 0; k < history.size(); ++k) inputs.emplace_back(history_names[k], history[k]);
  if (noise.has_value()) inputs.emplace_back("noise", *noise);
  ops.in_place = check_output(check, "x_next", x_next, shape, inputs);
  ops.x_next = x_next;
  ops.save_m0 = m0.has_value();
  if (ops.save_m0) {
    ADJOINTDEIS_CHECK(!overlaps(*m0, x_next), check.op, ": m0 shares memory with x_next; the outputs must be apart");
    ops.in_place = check_output(check, "m0", *m0, shape, inputs) || ops.in_place;
    ops.m0 = *m0;
  }
  ops.check_finite = finite.has_value();
  if (ops.check_finite) {
    const Tensor& flag = *finite;
    ADJOINTDEIS_CHECK(flag.scalar_type() == ScalarType::Bool && flag.dim() == 0, check.op,
                      ": finite must be a 0-d bool tensor, got ", flag.scalar_type(), " of shape ",
                      shape_name(flag.sizes()));
    ADJOINTDEIS_CHECK(flag.device() == x.device(), check.op, ": finite is on ", device_name(flag.device()),
                      " but x is on ", device_name(x.device()));
    inputs.emplace_back("x_next", x_next);
    if (ops.save_m0) inputs.emplace_back("m0", *m0);
    for (const auto& [name, t] : inputs) {
      ADJOINTDEIS_CHECK(!overlaps(flag, t), check.op, ": finite shares memory with ", name);
    }
    ops.finite = flag;
  }
  return ops;
}

AdjointOperands prepare_discrete_adjoint_step(const Tensor& xbar, const Tensor& vjp, const Tensor& gfull,
                                              const std::optional<Tensor>& pend1,
                                              const std::optional<Tensor>& pend2, const Tensor& coeffs,
                                              DeviceType device_type) {
  const OperandCheck check{"discrete_adjoint_step", "xbar", xbar, device_type};
  check.check_reference();
  check.check_coeffs(coeffs, kNumAdjointCoeffs, "[a, p, b1, b2, b0_prev, q_prev]");
  check.check("vjp", vjp);
  check.check("gfull", gfull);
  if (pend1.has_value()) check.check("pend1", *pend1);
  if (pend2.has_value()) check.check("pend2", *pend2);

  Shape shape = shape_of(xbar);
  check.merge_shape(shape, "vjp", vjp);
  check.merge_shape(shape, "gfull", gfull);
  if (pend1.has_value()) check.merge_shape(shape, "pend1", *pend1);
  if (pend2.has_value()) check.merge_shape(shape, "pend2", *pend2);

  auto fresh = [&] { return empty(shape, xbar.scalar_type(), xbar.device()); };
  AdjointOperands ops;
  ops.xbar = dense(xbar, shape);
  ops.vjp = dense(vjp, shape);
  ops.gfull = dense(gfull, shape);
  ops.has_pend1 = pend1.has_value();
  if (ops.has_pend1) ops.pend1 = dense(*pend1, shape);
  ops.has_pend2 = pend2.has_value();
  if (ops.has_pend2) ops.pend2 = dense(*pend2, shape);
  ops.coeffs = coeffs.is_contiguous() ? coeffs : torch::stable::contiguous(coeffs);
  ops.xbar_prev = fresh();
  ops.gfull_prev = fresh();
  ops.cot_prev = fresh();
  ops.pend_prev = fresh();
  return ops;
}

AxpyOperands prepare_multi_tensor_axpy(const std::vector<Tensor>& accumulators, const std::vector<Tensor>& updates,
                                       const Tensor& scale, DeviceType device_type) {
  constexpr const char* op = "multi_tensor_axpy_";
  ADJOINTDEIS_CHECK(accumulators.size() == updates.size(), op, ": got ", accumulators.size(),
                    " accumulators but ", updates.size(), " updates");
  ADJOINTDEIS_CHECK(scale.scalar_type() == ScalarType::Double, op, ": scale must be float64, got ",
                    scale.scalar_type());
  ADJOINTDEIS_CHECK(scale.numel() == 1, op, ": scale must hold one element, got shape ", shape_name(scale.sizes()));
  ADJOINTDEIS_CHECK(scale.device().type() == device_type, op, ": scale is on ", device_name(scale.device()),
                    ", expected a ", device_type_name(device_type), " tensor");

  AxpyOperands ops;
  ops.scale = scale;
  if (!accumulators.empty()) {
    ops.accumulator_dtype = accumulators[0].scalar_type();
    ops.update_dtype = updates[0].scalar_type();
  }
  ops.accumulators.reserve(accumulators.size());
  ops.updates.reserve(updates.size());
  for (size_t k = 0; k < accumulators.size(); ++k) {
    const Tensor& acc = accumulators[k];
    const Tensor& upd = updates[k];
    const ScalarType acc_dtype = acc.scalar_type(), upd_dtype = upd.scalar_type();
    ADJOINTDEIS_CHECK(acc_dtype == ScalarType::Float || acc_dtype == ScalarType::Double, op, ": accumulators[", k,
                      "] must be float32 or float64, got ", acc_dtype);
    ADJOINTDEIS_CHECK(acc_dtype == ops.accumulator_dtype, op, ": accumulators[", k, "] has dtype ", acc_dtype,
                      " but accumulators[0] has dtype ", ops.accumulator_dtype);
    ADJOINTDEIS_CHECK(is_step_dtype(upd_dtype), op, ": updates[", k,
                      "] must be float64, float32, float16 or bfloat16, got ", upd_dtype);
    ADJOINTDEIS_CHECK(upd_dtype == ops.update_dtype, op, ": updates[", k, "] has dtype ", upd_dtype,
                      " but updates[0] has dtype ", ops.update_dtype);
    ADJOINTDEIS_CHECK(acc.device() == scale.device(), op, ": accumulators[", k, "] is on ",
                      device_name(acc.device()), " but scale is on ", device_name(scale.device()));
    ADJOINTDEIS_CHECK(upd.device() == scale.device(), op, ": updates[", k, "] is on ", device_name(upd.device()),
                      " but scale is on ", device_name(scale.device()));
    ADJOINTDEIS_CHECK(same_shape(upd.sizes(), acc.sizes()), op, ": updates[", k, "] has shape ",
                      shape_name(upd.sizes()), " but accumulators[", k, "] has shape ", shape_name(acc.sizes()));
    ADJOINTDEIS_CHECK(acc.is_contiguous(), op, ": accumulators[", k, "] must be contiguous");
    ops.accumulators.push_back(acc);
    ops.updates.push_back(upd.is_contiguous() ? upd : torch::stable::contiguous(upd));
  }
  return ops;
}

}  // namespace adjointdeis
