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

if cuda_version() < 0:
    # CPU-only build: CUDA tensors take the reference path, so callers never branch on the build.
    torch.library.impl("adjointdeis::multistep_step", "CUDA", reference.multistep_step)
