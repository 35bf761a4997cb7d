"""Typed wrappers of the compiled ops, with their fake (meta) and autograd registrations."""

import torch
from torch import Tensor

from . import _extension, reference

_C = _extension.load()


def cuda_version() -> int:
    """CUDA_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 for a CPU-only build."""
    return torch.ops.adjointdeis.cuda_version()


def cuda_arch_list() -> str:
    """Compute capabilities the CUDA kernels were compiled for, e.g. "800,900" ("" if none)."""
    return _C.cuda_arch_list()


def multistep_step(x: Tensor, out: Tensor, history: list[Tensor], coeffs: Tensor,
                   noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One fused solver step: ``m0 = p x + q out``, ``x_next = a x + b0 m0 + b1 m1 + b2 m2 + c noise``.

    One pass over memory on CPU or CUDA; differentiable in x, out, history and noise.

    Args:
        x: (*shape) current state, float64/float32/float16/bfloat16.
        out: (*shape) raw model output at x (broadcastable to the common shape), same dtype.
        history: up to two previous converted outputs ``[m1, m2]`` (broadcastable), same dtype.
        coeffs: (7,) float64 ``[a, b0, b1, b2, c, p, q]`` on x's device (a row of a
            precomputed table, so no host sync happens per step).
        noise: optional standard normal noise (broadcastable), same dtype.

    Returns:
        ``(x_next, m0)``: the next state and the converted output to keep as history.

    Raises:
        RuntimeError naming the argument for a dtype, device or shape mismatch.
    """
    return torch.ops.adjointdeis.multistep_step.default(x, out, list(history), coeffs, noise)


@torch.library.register_fake("adjointdeis::multistep_step")
def _multistep_step_fake(x, out, history, coeffs, noise):
    shape = reference.check_step_operands(x, out, history, coeffs, noise)
    return x.new_empty(shape), x.new_empty(shape)


def _multistep_step_setup_context(ctx, inputs, output):
    x, out, history, coeffs, noise = inputs
    ctx.save_for_backward(coeffs)
    ctx.shapes = (x.shape, out.shape, [h.shape for h in history],
                  None if noise is None else noise.shape)


def _multistep_step_backward(ctx, grad_x_next, grad_m0):
    (coeffs,) = ctx.saved_tensors
    x_shape, out_shape, history_shapes, noise_shape = ctx.shapes
    a, b0, b1, b2, c, p, q = coeffs.to(grad_x_next.dtype).unbind()
    grad_total_m0 = b0 * grad_x_next + grad_m0
    grad_x = (a * grad_x_next + p * grad_total_m0).sum_to_size(x_shape)
    grad_out = (q * grad_total_m0).sum_to_size(out_shape)
    grad_history = [(b * grad_x_next).sum_to_size(s) for b, s in zip((b1, b2), history_shapes)]
    grad_noise = None if noise_shape is None else (c * grad_x_next).sum_to_size(noise_shape)
    return grad_x, grad_out, grad_history, None, grad_noise


torch.library.register_autograd(
    "adjointdeis::multistep_step", _multistep_step_backward,
    setup_context=_multistep_step_setup_context)


def ctm_step(x: Tensor, g: Tensor, coeffs: Tensor, noise: Tensor | None = None) -> Tensor:
    """One fused consistency-trajectory (gamma) step: ``x_next = a x + b g + c noise`` (MATH.md 8).

    With ``a = u/t``, ``b = 1 - u/t`` it is CTM's jump ``G(x, t, u) = (u/t) x + (1 - u/t) g`` and
    ``c = sqrt(t_next^2 - u^2)`` scales the fresh noise; one pass over memory on CPU or CUDA,
    differentiable in x, g and noise.

    Args:
        x: (*shape) current state, float64/float32/float16/bfloat16.
        g: (*shape) the two-time model's output (broadcastable to the common shape), same dtype.
        coeffs: (3,) float64 ``[a, b, c]`` on x's device (precomputed on the host, so no host
            sync happens per step).
        noise: optional standard normal noise (broadcastable), same dtype.

    Returns:
        (*shape) x_next, contiguous, with the broadcast shape and x's dtype.

    Raises:
        RuntimeError naming the argument for a dtype, device or shape mismatch.
    """
    return torch.ops.adjointdeis.ctm_step.default(x, g, coeffs, noise)


@torch.library.register_fake("adjointdeis::ctm_step")
def _ctm_step_fake(x, g, coeffs, noise):
    return x.new_empty(reference.check_ctm_operands(x, g, coeffs, noise))


def _ctm_step_setup_context(ctx, inputs, output):
    x, g, coeffs, noise = inputs
    ctx.save_for_backward(coeffs)
    ctx.shapes = (x.shape, g.shape, None if noise is None else noise.shape)


def _ctm_step_backward(ctx, grad_x_next):
    (coeffs,) = ctx.saved_tensors
    x_shape, g_shape, noise_shape = ctx.shapes
    a, b, c = coeffs.to(grad_x_next.dtype).unbind()
    grad_noise = None if noise_shape is None else (c * grad_x_next).sum_to_size(noise_shape)
    return (a * grad_x_next).sum_to_size(x_shape), (b * grad_x_next).sum_to_size(g_shape), None, grad_noise


torch.library.register_autograd("adjointdeis::ctm_step", _ctm_step_backward, setup_context=_ctm_step_setup_context)


def discrete_adjoint_step(xbar: Tensor, vjp: Tensor, gfull: Tensor, pend1: Tensor | None,
                          pend2: Tensor | None, coeffs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One fused row j of the exact discrete adjoint (MATH.md 5.1), after the model's VJP at x_j.

    ``xbar_prev = a xbar + p gfull + vjp``, ``gfull_prev = pend1 + b1 xbar + b0_prev xbar_prev``,
    ``cot_prev = q_prev gfull_prev``, ``pend_prev = pend2 + b2 xbar``, in one pass over memory on
    CPU or CUDA; differentiable in xbar, vjp, gfull, pend1 and pend2 (it is linear in them).

    Args:
        xbar: (*shape) dL/dx_{j+1}, float64/float32/float16/bfloat16.
        vjp: (*shape) ``(d out_j / d x_j)^T (q_j gfull)`` (broadcastable), same dtype.
        gfull: (*shape) full adjoint of m_j (broadcastable), same dtype.
        pend1: optional (*shape) partial adjoint of m_{j-1} (broadcastable); None counts as zero.
        pend2: optional (*shape) partial adjoint of m_{j-2} (broadcastable); None counts as zero.
        coeffs: (6,) float64 ``[a_j, p_j, b1_j, b2_j, b0_{j-1}, q_{j-1}]`` on xbar's device.

    Returns:
        ``(xbar_prev, gfull_prev, cot_prev, pend_prev)``: dL/dx_j, the full adjoint of m_{j-1},
        the cotangent of the next VJP and the partial adjoint of m_{j-2}; contiguous, with the
        broadcast shape and xbar's dtype.

    Raises:
        RuntimeError naming the argument for a dtype, device or shape mismatch.
    """
    return torch.ops.adjointdeis.discrete_adjoint_step.default(xbar, vjp, gfull, pend1, pend2, coeffs)


@torch.library.register_fake("adjointdeis::discrete_adjoint_step")
def _discrete_adjoint_step_fake(xbar, vjp, gfull, pend1, pend2, coeffs):
    shape = reference.check_adjoint_operands(xbar, vjp, gfull, pend1, pend2, coeffs)
    return tuple(xbar.new_empty(shape) for _ in range(4))


def _discrete_adjoint_step_setup_context(ctx, inputs, output):
    xbar, vjp, gfull, pend1, pend2, coeffs = inputs
    ctx.save_for_backward(coeffs)
    ctx.shapes = (xbar.shape, vjp.shape, gfull.shape, None if pend1 is None else pend1.shape,
                  None if pend2 is None else pend2.shape)


def _discrete_adjoint_step_backward(ctx, grad_xbar_prev, grad_gfull_prev, grad_cot_prev, grad_pend_prev):
    (coeffs,) = ctx.saved_tensors
    xbar_shape, vjp_shape, gfull_shape, pend1_shape, pend2_shape = ctx.shapes
    a, p, b1, b2, b0_prev, q_prev = coeffs.to(grad_xbar_prev.dtype).unbind()
    grad_total_gfull_prev = grad_gfull_prev + q_prev * grad_cot_prev
    grad_total_xbar_prev = grad_xbar_prev + b0_prev * grad_total_gfull_prev
    grad_xbar = (a * grad_total_xbar_prev + b1 * grad_total_gfull_prev + b2 * grad_pend_prev).sum_to_size(xbar_shape)
    grad_vjp = grad_total_xbar_prev.sum_to_size(vjp_shape)
    grad_gfull = (p * grad_total_xbar_prev).sum_to_size(gfull_shape)
    grad_pend1 = None if pend1_shape is None else grad_total_gfull_prev.sum_to_size(pend1_shape)
    grad_pend2 = None if pend2_shape is None else grad_pend_prev.sum_to_size(pend2_shape)
    return grad_xbar, grad_vjp, grad_gfull, grad_pend1, grad_pend2, None


torch.library.register_autograd(
    "adjointdeis::discrete_adjoint_step", _discrete_adjoint_step_backward,
    setup_context=_discrete_adjoint_step_setup_context)


def multi_tensor_axpy_(accumulators: list[Tensor], updates: list[Tensor], scale: Tensor) -> None:
    """In place, for every k: ``accumulators[k] += scale * updates[k]``, in one pass (one CUDA launch).

    The accumulation buffer of the parameter and conditioning adjoints. It is not differentiable:
    call it under ``torch.no_grad()`` (or on tensors that do not require grad). Accumulators must
    not overlap one another.

    Args:
        accumulators: contiguous float32 or float64 tensors (all one dtype), updated in place.
        updates: tensors of the same shapes as their accumulators, float64/float32/float16/bfloat16
            (all one dtype), converted to the accumulators' dtype (bf16 gradients accumulate in float32).
        scale: one-element float64 tensor on the tensors' device (read on the device: no host sync).

    Raises:
        RuntimeError naming the argument (``updates[3] has shape ...``) for a dtype, device or
        shape mismatch, or when grad mode is on and an input requires grad.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*accumulators, *updates, scale)):
        raise RuntimeError(
            "multi_tensor_axpy_ is not differentiable: call it under torch.no_grad() or on tensors "
            "that do not require grad"
        )
    torch.ops.adjointdeis.multi_tensor_axpy_.default(list(accumulators), list(updates), scale)


@torch.library.register_fake("adjointdeis::multi_tensor_axpy_")
def _multi_tensor_axpy_fake(accumulators, updates, scale):
    reference.check_axpy_operands(accumulators, updates, scale)


if cuda_version() < 0:
    # CPU-only build: CUDA tensors take the reference path, so callers never branch on the build.
    torch.library.impl("adjointdeis::multistep_step", "CUDA", reference.multistep_step)
    torch.library.impl("adjointdeis::ctm_step", "CUDA", reference.ctm_step)
    torch.library.impl("adjointdeis::discrete_adjoint_step", "CUDA", reference.discrete_adjoint_step)
    torch.library.impl("adjointdeis::multi_tensor_axpy_", "CUDA", reference.multi_tensor_axpy_)
