"""Pure-PyTorch twins of the compiled ops, with the same signatures and semantics.

They serve as the test oracle for the kernels, as the CUDA implementation when the
extension was built without CUDA, and as readable documentation of each op.
"""

import torch
from torch import Tensor

STEP_COEFFS = ("a", "b0", "b1", "b2", "c", "p", "q")
MAX_HISTORY = 2
_STEP_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_step_operands(x, out, history, coeffs, noise) -> torch.Size:
    """Validates the operands of multistep_step and returns the broadcast output shape.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    if x.dtype not in _STEP_DTYPES:
        raise TypeError(f"multistep_step: x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"multistep_step: history holds at most {MAX_HISTORY} tensors, got {len(history)}")
    if coeffs.dtype != torch.float64:
        raise TypeError(f"multistep_step: coeffs must be float64, got {coeffs.dtype}")
    if coeffs.shape != (len(STEP_COEFFS),):
        raise ValueError(
            f"multistep_step: coeffs must have shape [{len(STEP_COEFFS)}] ([a, b0, b1, b2, c, p, q]), "
            f"got {list(coeffs.shape)}"
        )
    if coeffs.device != x.device:
        raise ValueError(f"multistep_step: coeffs is on {coeffs.device} but x is on {x.device}")
    named = [("out", out)] + [(f"history[{k}]", h) for k, h in enumerate(history)]
    if noise is not None:
        named.append(("noise", noise))
    shape = x.shape
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"multistep_step: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"multistep_step: {name} is on {t.device} but x is on {x.device}")
        try:
            shape = torch.broadcast_shapes(shape, t.shape)
        except RuntimeError:
            raise ValueError(
                f"multistep_step: {name} with shape {list(t.shape)} does not broadcast with "
                f"x's shape {list(x.shape)}"
            ) from None
    return shape


def multistep_step(x: Tensor, out: Tensor, history: list[Tensor], coeffs: Tensor,
                   noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One fused solver step: ``m0 = p x + q out``, ``x_next = a x + b0 m0 + b1 m1 + b2 m2 + c noise``.

    Args:
        x: (*shape) current state, float64/float32/float16/bfloat16.
        out: (*shape) raw model output at x (broadcastable), same dtype.
        history: up to two previous converted outputs ``[m1, m2]`` (broadcastable), same dtype.
        coeffs: (7,) float64 ``[a, b0, b1, b2, c, p, q]`` on x's device.
        noise: optional (*shape) standard normal noise, same dtype; ``c`` is ignored without it.

    Returns:
        ``(x_next, m0)``, both contiguous with the broadcast shape and x's dtype. Arithmetic
        runs in float64 for float64 inputs and in float32 otherwise.
    """
    shape = check_step_operands(x, out, history, coeffs, noise)
    opmath = opmath_dtype(x.dtype)
    a, b0, b1, b2, c, p, q = coeffs.to(opmath).unbind()
    xf = x.to(opmath)
    m0 = p * xf + q * out.to(opmath)
    acc = a * xf + b0 * m0
    for b, m in zip((b1, b2), history):
        acc = acc + b * m.to(opmath)
    if noise is not None:
        acc = acc + c * noise.to(opmath)
    return (acc.expand(shape).to(x.dtype).contiguous(),
            m0.expand(shape).to(x.dtype).contiguous())


CTM_COEFFS = ("a", "b", "c")


def check_ctm_operands(x, g, coeffs, noise) -> torch.Size:
    """Validates the operands of ctm_step and returns the broadcast output shape.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    op = "ctm_step"
    if x.dtype not in _STEP_DTYPES:
        raise TypeError(f"{op}: x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if coeffs.dtype != torch.float64:
        raise TypeError(f"{op}: coeffs must be float64, got {coeffs.dtype}")
    if coeffs.shape != (len(CTM_COEFFS),):
        raise ValueError(f"{op}: coeffs must have shape [{len(CTM_COEFFS)}] ([a, b, c]), got {list(coeffs.shape)}")
    if coeffs.device != x.device:
        raise ValueError(f"{op}: coeffs is on {coeffs.device} but x is on {x.device}")
    named = [("g", g)] + ([("noise", noise)] if noise is not None else [])
    shape = x.shape
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        try:
            shape = torch.broadcast_shapes(shape, t.shape)
        except RuntimeError:
            raise ValueError(
                f"{op}: {name} with shape {list(t.shape)} does not broadcast with x's shape {list(x.shape)}"
            ) from None
    return shape


def ctm_step(x: Tensor, g: Tensor, coeffs: Tensor, noise: Tensor | None = None) -> Tensor:
    """One consistency-trajectory (gamma) step (MATH.md section 8): ``x_next = a x + b g + c noise``.

    With ``a = u/t``, ``b = 1 - u/t`` this is CTM's jump ``G(x, t, u) = (u/t) x + (1 - u/t) g``
    followed by fresh noise ``c xi`` with ``c = sqrt(t_next^2 - u^2)``.

    Args:
        x: (*shape) current state, float64/float32/float16/bfloat16.
        g: (*shape) the two-time model's output g(x, t, u) (broadcastable), same dtype.
        coeffs: (3,) float64 ``[a, b, c]`` on x's device.
        noise: optional (*shape) standard normal noise (broadcastable), same dtype; ``c`` is
            ignored without it.

    Returns:
        (*shape) x_next, contiguous with the broadcast shape and x's dtype. Arithmetic runs in
        float64 for float64 inputs and in float32 otherwise.
    """
    shape = check_ctm_operands(x, g, coeffs, noise)
    opmath = opmath_dtype(x.dtype)
    a, b, c = coeffs.to(opmath).unbind()
    acc = a * x.to(opmath) + b * g.to(opmath)
    if noise is not None:
        acc = acc + c * noise.to(opmath)
    return acc.expand(shape).to(x.dtype).contiguous()


ADJOINT_COEFFS = ("a", "p", "b1", "b2", "b0_prev", "q_prev")


def check_adjoint_operands(xbar, vjp, gfull, pend1, pend2, coeffs) -> torch.Size:
    """Validates the operands of discrete_adjoint_step and returns the broadcast output shape.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    op = "discrete_adjoint_step"
    if xbar.dtype not in _STEP_DTYPES:
        raise TypeError(f"{op}: xbar must be float64, float32, float16 or bfloat16, got {xbar.dtype}")
    if coeffs.dtype != torch.float64:
        raise TypeError(f"{op}: coeffs must be float64, got {coeffs.dtype}")
    if coeffs.device != xbar.device:
        raise ValueError(f"{op}: coeffs is on {coeffs.device} but xbar is on {xbar.device}")
    if coeffs.shape != (len(ADJOINT_COEFFS),):
        raise ValueError(
            f"{op}: coeffs must have shape [{len(ADJOINT_COEFFS)}] ([a, p, b1, b2, b0_prev, q_prev]), "
            f"got {list(coeffs.shape)}"
        )
    named = [("vjp", vjp), ("gfull", gfull)]
    named += [(name, t) for name, t in (("pend1", pend1), ("pend2", pend2)) if t is not None]
    for name, t in named:
        if t.dtype != xbar.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but xbar has dtype {xbar.dtype}")
        if t.device != xbar.device:
            raise ValueError(f"{op}: {name} is on {t.device} but xbar is on {xbar.device}")
    shape = xbar.shape
    for name, t in named:
        try:
            shape = torch.broadcast_shapes(shape, t.shape)
        except RuntimeError:
            raise ValueError(
                f"{op}: {name} with shape {list(t.shape)} does not broadcast with xbar's shape {list(xbar.shape)}"
            ) from None
    return shape


def discrete_adjoint_step(xbar: Tensor, vjp: Tensor, gfull: Tensor, pend1: Tensor | None,
                          pend2: Tensor | None, coeffs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One row j of the exact discrete adjoint (MATH.md 5.1), after the model's VJP at x_j.

    ``xbar_prev = a xbar + p gfull + vjp``, ``gfull_prev = pend1 + b1 xbar + b0_prev xbar_prev``,
    ``cot_prev = q_prev gfull_prev``, ``pend_prev = pend2 + b2 xbar``.

    Args:
        xbar: (*shape) dL/dx_{j+1}, float64/float32/float16/bfloat16.
        vjp: (*shape) ``(d out_j / d x_j)^T (q_j gfull)`` (broadcastable), same dtype.
        gfull: (*shape) full adjoint of m_j (broadcastable), same dtype.
        pend1: optional (*shape) partial adjoint of m_{j-1}; None counts as zero.
        pend2: optional (*shape) partial adjoint of m_{j-2}; None counts as zero.
        coeffs: (6,) float64 ``[a_j, p_j, b1_j, b2_j, b0_{j-1}, q_{j-1}]`` on xbar's device.

    Returns:
        ``(xbar_prev, gfull_prev, cot_prev, pend_prev)``: dL/dx_j, the full adjoint of m_{j-1},
        the cotangent of the next VJP and the partial adjoint of m_{j-2}, all contiguous with the
        broadcast shape and xbar's dtype. Arithmetic runs in float64 for float64 inputs and in
        float32 otherwise.
    """
    shape = check_adjoint_operands(xbar, vjp, gfull, pend1, pend2, coeffs)
    opmath = opmath_dtype(xbar.dtype)
    a, p, b1, b2, b0_prev, q_prev = coeffs.to(opmath).unbind()
    xb = xbar.to(opmath)
    xbar_prev = a * xb + p * gfull.to(opmath) + vjp.to(opmath)
    g = b1 * xb
    if pend1 is not None:
        g = pend1.to(opmath) + g
    gfull_prev = g + b0_prev * xbar_prev
    cot_prev = q_prev * gfull_prev
    pend_prev = b2 * xb
    if pend2 is not None:
        pend_prev = pend2.to(opmath) + pend_prev
    return tuple(t.expand(shape).to(xbar.dtype).contiguous()
                 for t in (xbar_prev, gfull_prev, cot_prev, pend_prev))


_ACCUMULATOR_DTYPES = (torch.float64, torch.float32)


def check_axpy_operands(accumulators, updates, scale) -> None:
    """Validates the operands of multi_tensor_axpy_.

    Raises:
        ValueError / TypeError naming the offending argument (``updates[3]``, ``scale``, ...).
    """
    op = "multi_tensor_axpy_"
    if len(accumulators) != len(updates):
        raise ValueError(f"{op}: got {len(accumulators)} accumulators but {len(updates)} updates")
    if scale.dtype != torch.float64:
        raise TypeError(f"{op}: scale must be float64, got {scale.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"{op}: scale must hold one element, got shape {list(scale.shape)}")
    for k, (acc, upd) in enumerate(zip(accumulators, updates)):
        if acc.dtype not in _ACCUMULATOR_DTYPES:
            raise TypeError(f"{op}: accumulators[{k}] must be float32 or float64, got {acc.dtype}")
        if acc.dtype != accumulators[0].dtype:
            raise TypeError(
                f"{op}: accumulators[{k}] has dtype {acc.dtype} but accumulators[0] has dtype "
                f"{accumulators[0].dtype}"
            )
        if upd.dtype not in _STEP_DTYPES:
            raise TypeError(f"{op}: updates[{k}] must be float64, float32, float16 or bfloat16, got {upd.dtype}")
        if upd.dtype != updates[0].dtype:
            raise TypeError(f"{op}: updates[{k}] has dtype {upd.dtype} but updates[0] has dtype {updates[0].dtype}")
        if acc.device != scale.device:
            raise ValueError(f"{op}: accumulators[{k}] is on {acc.device} but scale is on {scale.device}")
        if upd.device != scale.device:
            raise ValueError(f"{op}: updates[{k}] is on {upd.device} but scale is on {scale.device}")
        if upd.shape != acc.shape:
            raise ValueError(
                f"{op}: updates[{k}] has shape {list(upd.shape)} but accumulators[{k}] has shape {list(acc.shape)}"
            )
        if not acc.is_contiguous():
            raise ValueError(f"{op}: accumulators[{k}] must be contiguous")


def multi_tensor_axpy_(accumulators: list[Tensor], updates: list[Tensor], scale: Tensor) -> None:
    """In place, for every k: ``accumulators[k] += scale * updates[k]``.

    Args:
        accumulators: contiguous float32 or float64 tensors (all one dtype), updated in place.
        updates: tensors of the same shapes as their accumulators, any float dtype (all one
            dtype), converted to the accumulators' dtype before the product.
        scale: one-element float64 tensor on the tensors' device, rounded to the accumulators'
            dtype.
    """
    check_axpy_operands(accumulators, updates, scale)
    if not accumulators:
        return
    dtype = accumulators[0].dtype
    products = torch._foreach_mul([u.to(dtype) for u in updates], scale.reshape(()).to(dtype))
    torch._foreach_add_(list(accumulators), products)
