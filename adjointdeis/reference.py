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
