"""Pure-PyTorch twins of the compiled ops, with the same signatures and semantics.

They serve as the test oracle for the kernels, as the CUDA implementation when the extension was
built without CUDA, and as readable documentation of each op; the arguments and results are
documented once, on the op's wrapper in :mod:`adjointdeis.ops`. The literal constructions of the
DSNO layer (rfft / irfft, the dense block-circulant matrix, the bin-by-bin mode mixing) are here too,
as oracles for the factored ones.
"""

import torch
from torch import Tensor

from . import validation

STEP_COEFFS = ("a", "b0", "b1", "b2", "c", "p", "q")
STEP_COEFFS_WIDE = STEP_COEFFS + ("b3",)  # a row of a step that reads three previous outputs
MAX_HISTORY = 3
_STEP_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_elementwise(op: str, lead_name: str, lead: Tensor, coeffs: Tensor, coeff_names: tuple[str, ...],
                       named: list[tuple[str, Tensor]]) -> torch.Size:
    """The checks shared by the elementwise step ops: the lead operand's dtype, a float64 coefficient vector on
    its device, and every other (name, tensor) of its dtype and device; returns the broadcast output shape."""
    if not (isinstance(lead, Tensor) and isinstance(coeffs, Tensor) and all(isinstance(t, Tensor) for _, t in named)):
        for name, t in [(lead_name, lead), ("coeffs", coeffs)] + named:
            validation.instance(t, f"{op}: {name}", Tensor, "a tensor")
    if lead.dtype not in _STEP_DTYPES:
        raise TypeError(f"{op}: {lead_name} must be float64, float32, float16 or bfloat16, got {lead.dtype}")
    if coeffs.dtype != torch.float64:
        raise TypeError(f"{op}: coeffs must be float64, got {coeffs.dtype}")
    if coeffs.shape != (len(coeff_names),):
        raise ValueError(f"{op}: coeffs must have shape [{len(coeff_names)}] ([{', '.join(coeff_names)}]), "
                         f"got {list(coeffs.shape)}")
    if coeffs.device != lead.device:
        raise ValueError(f"{op}: coeffs is on {coeffs.device} but {lead_name} is on {lead.device}")
    shape = lead.shape
    for name, t in named:
        if t.dtype != lead.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {lead_name} has dtype {lead.dtype}")
        if t.device != lead.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {lead_name} is on {lead.device}")
        try:
            shape = torch.broadcast_shapes(shape, t.shape)
        except RuntimeError:
            raise ValueError(
                f"{op}: {name} with shape {list(t.shape)} does not broadcast with {lead_name}'s shape "
                f"{list(lead.shape)}"
            ) from None
    return shape


def check_step_operands(x, out, history, coeffs, noise) -> torch.Size:
    """Validates the operands of multistep_step and returns the broadcast output shape.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    if len(history) > MAX_HISTORY:
        raise ValueError(f"multistep_step: history holds at most {MAX_HISTORY} tensors, got {len(history)}")
    named = [("out", out)] + [(f"history[{k}]", h) for k, h in enumerate(history)]
    if noise is not None:
        named.append(("noise", noise))
    wide = len(history) == MAX_HISTORY or tuple(coeffs.shape) == (len(STEP_COEFFS_WIDE),)
    return _check_elementwise("multistep_step", "x", x, coeffs, STEP_COEFFS_WIDE if wide else STEP_COEFFS, named)


def multistep_step(x: Tensor, out: Tensor, history: list[Tensor], coeffs: Tensor, noise: Tensor | None = None,
                   save_m0: bool = True) -> tuple[Tensor, Tensor]:
    """The twin of :func:`adjointdeis.ops.multistep_step`: ``m0 = p x + q out``,
    ``x_next = a x + b0 m0 + b1 m1 + b2 m2 (+ b3 m3) + c noise``, in float64 for float64 inputs and in
    float32 otherwise; m0 is an empty tensor when not saved."""
    shape = check_step_operands(x, out, history, coeffs, noise)
    opmath = opmath_dtype(x.dtype)
    a, b0, b1, b2, c, p, q, *wide = coeffs.to(opmath).unbind()
    xf = x.to(opmath)
    m0 = p * xf + q * out.to(opmath)
    acc = a * xf + b0 * m0
    for b, m in zip((b1, b2, *wide), history):
        acc = acc + b * m.to(opmath)
    if noise is not None:
        acc = acc + c * noise.to(opmath)
    m0 = m0.expand(shape).to(x.dtype).contiguous() if save_m0 else x.new_empty(0)
    return acc.expand(shape).to(x.dtype).contiguous(), m0


def _extent(t: Tensor) -> tuple[int, int]:
    """The bytes t's elements span: from its first element to one past its last."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlap(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    (a_begin, a_end), (b_begin, b_end) = _extent(a), _extent(b)
    return a_begin < b_end and b_begin < a_end


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether b is the tensor output a would be written in place of: the same memory in the same layout."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and b.is_contiguous()
            and a.device == b.device)


def check_step_outputs(x, out, history, coeffs, noise, x_next, m0, finite=None, memory: bool = True) -> None:
    """Validates the operands of multistep_step_out: those of multistep_step, the output buffers and the
    finiteness flag.

    Args:
        memory: also check that each buffer is an input itself (written in place) or shares no memory with any,
            and that the two are apart (False for fake tensors, which have no memory).

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    op = "multistep_step_out"
    shape = check_step_operands(x, out, history, coeffs, noise)
    inputs = [("x", x), ("out", out)] + [(f"history[{k}]", h) for k, h in enumerate(history)]
    inputs += [("noise", noise)] if noise is not None else []
    for name, t in (("x_next", x_next), ("m0", m0)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if t.shape != shape:
            raise ValueError(f"{op}: {name} must have the operands' broadcast shape {list(shape)}, got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
        if memory and name == "m0" and _overlap(t, x_next):
            raise ValueError(f"{op}: m0 shares memory with x_next; the outputs must be apart")
        for input_name, u in inputs if memory else ():
            if _overlap(t, u) and not _same_memory(t, u):
                raise ValueError(f"{op}: {name} shares memory with {input_name}; "
                                 "an output must be an input itself (written in place) or apart from every input")
    if finite is None:
        return
    if finite.dtype != torch.bool or finite.dim() != 0:
        raise TypeError(f"{op}: finite must be a 0-d bool tensor, got {finite.dtype} of shape {list(finite.shape)}")
    if finite.device != x.device:
        raise ValueError(f"{op}: finite is on {finite.device} but x is on {x.device}")
    named = inputs + [("x_next", x_next)] + ([("m0", m0)] if m0 is not None else [])
    for name, t in named if memory else ():
        if _overlap(finite, t):
            raise ValueError(f"{op}: finite shares memory with {name}")


def multistep_step_out(x: Tensor, out: Tensor, history: list[Tensor], coeffs: Tensor, noise: Tensor | None = None,
                       *, x_next: Tensor, m0: Tensor | None = None, finite: Tensor | None = None) -> None:
    """The twin of :func:`adjointdeis.ops.multistep_step_out`: :func:`multistep_step` copied into the buffers
    (computed in full first, so a buffer may be an input itself), and `finite` cleared by ``torch.isfinite``."""
    check_step_outputs(x, out, history, coeffs, noise, x_next, m0, finite)
    new_x, new_m0 = multistep_step(x, out, history, coeffs, noise, m0 is not None)
    x_next.copy_(new_x)
    if m0 is not None:
        m0.copy_(new_m0)
    if finite is not None:
        finite.logical_and_(torch.isfinite(x_next).all())


ADJOINT_COEFFS = ("a", "p", "b1", "b2", "b0_prev", "q_prev")


def check_adjoint_operands(xbar, vjp, gfull, pend1, pend2, coeffs) -> torch.Size:
    """Validates the operands of discrete_adjoint_step and returns the broadcast output shape.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    named = [("vjp", vjp), ("gfull", gfull)]
    named += [(name, t) for name, t in (("pend1", pend1), ("pend2", pend2)) if t is not None]
    return _check_elementwise("discrete_adjoint_step", "xbar", xbar, coeffs, ADJOINT_COEFFS, named)


def discrete_adjoint_step(xbar: Tensor, vjp: Tensor, gfull: Tensor, pend1: Tensor | None,
                          pend2: Tensor | None, coeffs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The twin of :func:`adjointdeis.ops.discrete_adjoint_step` (docs/math.md section 5.1), in float64
    for float64 inputs and in float32 otherwise."""
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
    """The twin of :func:`adjointdeis.ops.multi_tensor_axpy_`: ``accumulators[k] += scale * updates[k]``,
    the updates converted to the accumulators' dtype and scale rounded to it."""
    check_axpy_operands(accumulators, updates, scale)
    if not accumulators:
        return
    dtype = accumulators[0].dtype
    products = torch._foreach_mul([u.to(dtype) for u in updates], scale.reshape(()).to(dtype))
    torch._foreach_add_(list(accumulators), products)


MAX_TIMES = 32
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def check_fourier_operands(x, weight, modes, residual, negative_slope, channelwise=False) -> int:
    """Validates the operands of fourier_temporal_conv(_channelwise); returns C_out.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    op = "fourier_temporal_conv_channelwise" if channelwise else "fourier_temporal_conv"
    validation.instance(weight, f"{op}: weight", Tensor, "a tensor")
    n_times, c_in = _check_block_input(op, x)
    if weight.dtype not in _COMPLEX_DTYPES:
        raise TypeError(f"{op}: weight must be complex64 or complex128, got {weight.dtype}")
    if weight.dtype == torch.complex128 and x.dtype != torch.float64:
        raise TypeError(f"{op}: a complex128 weight needs float64 x, got x of dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    layout = "(K, C)" if channelwise else "(K, C_in, C_out)"
    if weight.dim() != (2 if channelwise else 3):
        raise ValueError(f"{op}: weight must have shape {layout}, got {list(weight.shape)}")
    if weight.shape[1] != c_in:
        raise ValueError(
            f"{op}: weight {layout} has {weight.shape[1]} input channels but x has C = {c_in} "
            f"(x.shape[2])"
        )
    _check_modes(op, modes, n_times)
    if modes > weight.shape[0]:
        raise ValueError(f"{op}: modes = {modes} but weight holds only {weight.shape[0]} bins (weight.shape[0])")
    c_out = c_in if channelwise else weight.shape[2]
    if residual and c_out != c_in:
        raise ValueError(f"{op}: residual=True needs C_out == C_in, got C_in = {c_in}, C_out = {c_out}")
    _check_slope(op, negative_slope)
    return c_out


def _check_block_input(op: str, x) -> tuple[int, int]:
    """x of a temporal block: a (B, T, C, H, W) tensor of a step dtype, 2 <= T <= MAX_TIMES; returns (T, C)."""
    validation.instance(x, f"{op}: x", Tensor, "a tensor")
    if x.dtype not in _STEP_DTYPES:
        raise TypeError(f"{op}: x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 5:
        raise ValueError(f"{op}: x must have shape (B, T, C, H, W), got {list(x.shape)}")
    if not 2 <= x.shape[1] <= MAX_TIMES:
        raise ValueError(f"{op}: x.shape[1] (T) must be in [2, {MAX_TIMES}], got {x.shape[1]}")
    return x.shape[1], x.shape[2]


def _check_modes(op: str, modes, n_times: int) -> None:
    validation.integer(modes, f"{op}: modes")
    if not 1 <= modes <= n_times // 2 + 1:
        raise ValueError(
            f"{op}: modes must be in [1, T // 2 + 1] = [1, {n_times // 2 + 1}] for T = {n_times}, got {modes}"
        )


def _check_slope(op: str, negative_slope) -> None:
    if negative_slope is not None:
        validation.real(negative_slope, f"{op}: negative_slope")


def _check_epilogue_operand(op: str, name: str, t, x: Tensor, shape: tuple[int, ...], layout: str) -> None:
    validation.instance(t, f"{op}: {name}", Tensor, "a tensor")
    dtype = opmath_dtype(x.dtype)
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype} for x of dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {layout} = {shape}, got {list(t.shape)}")


def check_spectral_operands(x, mixing, modes, residual, negative_slope) -> int:
    """Validates the operands of fourier_spectral_conv (as its C++ checks do); returns C_out.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    op = "fourier_spectral_conv"
    n_times, c_in = _check_block_input(op, x)
    _check_modes(op, modes, n_times)
    rank = min(2 * modes - 1, n_times)
    validation.instance(mixing, f"{op}: mixing", Tensor, "a tensor")
    rows = mixing.shape[0] if mixing.dim() == 2 and mixing.shape[0] % rank == 0 else rank
    _check_epilogue_operand(op, "mixing", mixing, x, (rows, rank * c_in), "(r * C_out, r * C_in) with r = "
                            f"{rank}, C_in = {c_in}")
    c_out = rows // rank
    if residual and c_out != c_in:
        raise ValueError(f"{op}: residual needs C_out == C_in, got C_in = {c_in}, C_out = {c_out}")
    _check_slope(op, negative_slope)
    return c_out


def check_mode_operands(x, weight, modes, residual, negative_slope) -> int:
    """Validates the operands of fourier_mode_conv (as its C++ checks do); returns C_out.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    op = "fourier_mode_conv"
    n_times, c_in = _check_block_input(op, x)
    _check_modes(op, modes, n_times)
    validation.instance(weight, f"{op}: weight", Tensor, "a tensor")
    fits = weight.dim() == 4 and weight.shape[0] >= modes and weight.shape[3] == 2
    shape = (weight.shape[0], c_in, weight.shape[2], 2) if fits else (max(modes, 1), c_in, c_in, 2)
    _check_epilogue_operand(op, "weight", weight, x, shape, f"(K, C_in, C_out, 2) with K >= modes = {modes}, "
                            f"C_in = {c_in}")
    c_out = weight.shape[2]
    if residual and c_out != c_in:
        raise ValueError(f"{op}: residual needs C_out == C_in, got C_in = {c_in}, C_out = {c_out}")
    _check_slope(op, negative_slope)
    return c_out


def check_channel_operands(x, kernel, residual, negative_slope) -> None:
    """Validates the operands of fourier_channel_conv (as its C++ checks do).

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    op = "fourier_channel_conv"
    n_times, channels = _check_block_input(op, x)
    _check_epilogue_operand(op, "kernel", kernel, x, (n_times, n_times, channels), "(T, T, C)")
    _check_slope(op, negative_slope)


def check_synthesis_operands(op: str, weight, dim: int, n_times, modes) -> None:
    """Validates the operands of fourier_tap_synthesis (dim 2) and fourier_mode_mixing (dim 3).

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    validation.instance(weight, f"{op}: weight", Tensor, "a tensor")
    if weight.dtype not in _COMPLEX_DTYPES:
        raise TypeError(f"{op}: weight must be complex64 or complex128, got {weight.dtype}")
    if weight.dim() != dim:
        raise ValueError(f"{op}: weight must have {dim} dimensions, got shape {list(weight.shape)}")
    validation.integer(n_times, f"{op}: n_times", 2, MAX_TIMES)
    validation.integer(modes, f"{op}: modes")
    if not 1 <= modes <= min(n_times // 2 + 1, weight.shape[0]):
        raise ValueError(f"{op}: modes must be in [1, min(n_times // 2 + 1, weight.shape[0])], got {modes}")


def _bin_weights(n_times: int, modes: int) -> list[float]:
    """c_k of the real inverse transform: 1 for the DC and Nyquist bins, 2 for the others."""
    return [1.0 if k == 0 or 2 * k == n_times else 2.0 for k in range(modes)]


def _hermitian_spectrum(mixed: Tensor, n_times: int) -> Tensor:
    """The first bins of a real signal's rfft, zero-padded to T // 2 + 1 bins along dim 1, with the
    imaginary parts of the DC and Nyquist bins dropped (irfft of a Hermitian spectrum)."""
    modes = mixed.shape[1]
    keep = torch.tensor([0.0 if k == 0 or 2 * k == n_times else 1.0 for k in range(modes)],
                        dtype=mixed.real.dtype, device=mixed.device).view(1, modes, *([1] * (mixed.dim() - 2)))
    mixed = torch.complex(mixed.real, mixed.imag * keep)
    pad = mixed.new_zeros((mixed.shape[0], n_times // 2 + 1 - modes, *mixed.shape[2:]))
    return torch.cat([mixed, pad], dim=1)


def _finish_block(x: Tensor, layer: Tensor, residual: bool, negative_slope) -> Tensor:
    if negative_slope is not None:
        layer = torch.nn.functional.leaky_relu(layer, negative_slope)
    if residual:
        layer = x.to(layer.dtype) + layer
    return layer.to(x.dtype)


def fourier_temporal_conv(x: Tensor, weight: Tensor, modes: int, residual: bool = True,
                          negative_slope: float | None = 0.01) -> Tensor:
    """The twin of :func:`adjointdeis.ops.fourier_temporal_conv`, the literal way: ``rfft`` along T, keep
    ``modes`` bins, multiply bin k by ``W_k`` (``C_in x C_out``), ``irfft``; then LeakyReLU and the
    residual; in float64 (complex128) for float64 x and in float32 (complex64) otherwise."""
    c_out = check_fourier_operands(x, weight, modes, residual, negative_slope)
    opmath = opmath_dtype(x.dtype)
    if x.numel() == 0:  # the FFT (MKL's) fails on an empty batch or image
        return _finish_block(x, x.new_zeros((*x.shape[:2], c_out, *x.shape[3:]), dtype=opmath), residual,
                             negative_slope)
    cdtype = torch.complex128 if opmath == torch.float64 else torch.complex64
    n_times = x.shape[1]
    spectrum = torch.fft.rfft(x.to(opmath), dim=1)[:, :modes]
    mixed = torch.einsum("bkihw,kio->bkohw", spectrum, weight[:modes].to(cdtype))
    layer = torch.fft.irfft(_hermitian_spectrum(mixed, n_times), n=n_times, dim=1)
    return _finish_block(x, layer, residual, negative_slope)


def fourier_temporal_conv_channelwise(x: Tensor, weight: Tensor, modes: int, residual: bool = True,
                                      negative_slope: float | None = 0.01) -> Tensor:
    """The twin of :func:`adjointdeis.ops.fourier_temporal_conv_channelwise` through rfft / irfft: bin k
    of channel c is multiplied by the complex scalar ``weight[k, c]``."""
    c_out = check_fourier_operands(x, weight, modes, residual, negative_slope, channelwise=True)
    opmath = opmath_dtype(x.dtype)
    if x.numel() == 0:  # the FFT (MKL's) fails on an empty batch or image
        return _finish_block(x, x.new_zeros((*x.shape[:2], c_out, *x.shape[3:]), dtype=opmath), residual,
                             negative_slope)
    cdtype = torch.complex128 if opmath == torch.float64 else torch.complex64
    n_times = x.shape[1]
    spectrum = torch.fft.rfft(x.to(opmath), dim=1)[:, :modes]
    mixed = spectrum * weight[:modes].to(cdtype)[None, :, :, None, None]
    layer = torch.fft.irfft(_hermitian_spectrum(mixed, n_times), n=n_times, dim=1)
    return _finish_block(x, layer, residual, negative_slope)


def fourier_tap_synthesis(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """The twin of :func:`adjointdeis.ops.fourier_tap_synthesis` through complex phases:
    ``Kt[d] = (1/T) sum_{k<modes} c_k Re(W_k e^{2 pi i k d / T})`` (docs/math.md section 7)."""
    check_synthesis_operands("fourier_tap_synthesis", weight, 2, n_times, modes)
    d = torch.arange(n_times, dtype=torch.float64, device=weight.device)
    k = torch.arange(modes, dtype=torch.float64, device=weight.device)
    c = torch.tensor(_bin_weights(n_times, modes), dtype=torch.float64, device=weight.device)
    phase = torch.polar(c / n_times, 2 * torch.pi * d[:, None] * k[None, :] / n_times)
    # The DC and Nyquist bins are real parts only (sin(pi d) is not exactly 0 in floating point).
    real_bin = torch.tensor([k == 0 or 2 * k == n_times for k in range(modes)], device=weight.device)
    phase = torch.complex(phase.real, torch.where(real_bin, 0.0, phase.imag)).to(weight.dtype)
    return (phase @ weight[:modes]).real


def fourier_kernel_synthesis(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """The dense real block-circulant matrix of the layer, the oracle of the factored one:
    ``A[(t, o), (tau, i)] = Kt[(t - tau) mod T][i, o]`` with Kt the taps of :func:`fourier_tap_synthesis`,
    so that ``layer(x)[b] = A @ x[b].view(T * C_in, H * W)``.

    Args:
        weight: (K, C_in, C_out) complex64/complex128, K >= modes.
        n_times: T.
        modes: bins used.

    Returns:
        (T * C_out, T * C_in) float32 (float64 for complex128).
    """
    k_w, c_in, c_out = weight.shape
    taps = fourier_tap_synthesis(weight.reshape(k_w, c_in * c_out), n_times, modes)
    t = torch.arange(n_times, device=weight.device)
    blocks = taps.view(n_times, c_in, c_out)[(t[:, None] - t[None, :]) % n_times]  # (t, tau, i, o)
    return blocks.permute(0, 3, 1, 2).reshape(n_times * c_out, n_times * c_in)


def _activation_mask(z: Tensor, negative_slope, save_mask: bool) -> Tensor:
    if save_mask and negative_slope is not None:
        return (z <= 0).contiguous()
    return torch.empty(0, dtype=torch.bool, device=z.device)


def _activation_grad(grad: Tensor, mask: Tensor, negative_slope) -> Tensor:
    if negative_slope is None:
        return grad
    return torch.where(mask, negative_slope * grad, grad)


def spectral_basis(n_times: int, modes: int, dtype: torch.dtype = torch.float64,
                   device=None) -> tuple[Tensor, Tensor]:
    """The real coordinates of the first ``modes`` bins of a length-T real signal.

    Coordinate j is the real (j odd or 0) or imaginary (j even > 0) part of bin (j + 1) // 2; there
    are r = min(2 modes - 1, T) of them.

    Returns:
        ``(P, E)``: P (r, T) with ``coords = P @ signal`` (rows cos, -sin of 2 pi k tau / T), and
        E (T, r) with ``signal = E @ coords`` for a signal whose other bins are zero
        (``E[t, j] = c_k P[j, t] / T``).
    """
    rank = min(2 * modes - 1, n_times)
    proj = torch.zeros(rank, n_times, dtype=torch.float64)
    weights = torch.zeros(rank, dtype=torch.float64)
    tau = torch.arange(n_times, dtype=torch.float64)
    for j in range(rank):
        k = (j + 1) // 2
        theta = 2 * torch.pi * k * tau / n_times
        proj[j] = -torch.sin(theta) if j > 0 and j % 2 == 0 else torch.cos(theta)
        weights[j] = _bin_weights(n_times, modes)[k] / n_times
    return proj.to(device=device, dtype=dtype), (proj * weights[:, None]).t().to(device=device, dtype=dtype)


def fourier_mode_mixing(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """The twin of :func:`adjointdeis.ops.fourier_mode_mixing`, block by block: for bin k,
    ``[[Re W_k^T, -Im W_k^T], [Im W_k^T, Re W_k^T]]`` on its (Re, Im) coordinates (``Re W_k^T`` alone for
    DC and Nyquist), zero between bins."""
    check_synthesis_operands("fourier_mode_mixing", weight, 3, n_times, modes)
    _, c_in, c_out = weight.shape
    rank = min(2 * modes - 1, n_times)
    real = weight.real.new_zeros(()).dtype
    zero = torch.zeros(c_out, c_in, dtype=real, device=weight.device)
    rows = []
    for j in range(rank):
        row = []
        for col in range(rank):
            k = (j + 1) // 2
            if k != (col + 1) // 2:
                row.append(zero)
                continue
            re, im = weight[k].real.t(), weight[k].imag.t()
            j_im, col_im = j > 0 and j % 2 == 0, col > 0 and col % 2 == 0
            row.append({(False, False): re, (False, True): -im, (True, False): im, (True, True): re}[(j_im, col_im)])
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def bin_block_mask(n_times: int, modes: int, c_out: int, c_in: int, dtype=torch.float64, device=None) -> Tensor:
    """(r C_out, r C_in): 1 on the blocks that couple coordinates of the same bin, 0 elsewhere."""
    bins = torch.tensor([(j + 1) // 2 for j in range(min(2 * modes - 1, n_times))], device=device)
    same = (bins[:, None] == bins[None, :]).to(dtype)
    return torch.kron(same, torch.ones(c_out, c_in, dtype=dtype, device=device))


def _spectral_layer(x: Tensor, mixing: Tensor, modes: int) -> Tensor:
    """(E (x) I) M (P (x) I) x: the layer before activation and residual, in mixing's dtype (only
    M's blocks within a bin are used)."""
    b, n_times, c_in, h, w = x.shape
    rank = min(2 * modes - 1, n_times)
    mixing = mixing * bin_block_mask(n_times, modes, mixing.shape[0] // rank, c_in, mixing.dtype, x.device)
    proj, expand = spectral_basis(n_times, modes, mixing.dtype, x.device)
    coords = torch.einsum("jt,btchw->bjchw", proj, x.to(mixing.dtype)).reshape(b, rank * c_in, h * w)
    mixed = (mixing @ coords).view(b, rank, mixing.shape[0] // rank, h, w)  # no -1: also for an empty x
    return torch.einsum("tj,bjchw->btchw", expand, mixed)


def fourier_spectral_conv(x: Tensor, mixing: Tensor, modes: int, residual: bool, negative_slope,
                          save_mask: bool) -> tuple[Tensor, Tensor]:
    """The twin of :func:`adjointdeis.ops.fourier_spectral_conv`: project onto the kept bins'
    coordinates, mix (only M's blocks within a bin), expand, then the epilogue."""
    check_spectral_operands(x, mixing, modes, residual, negative_slope)
    z = _spectral_layer(x, mixing, modes)
    mask = _activation_mask(z, negative_slope, save_mask)
    return _finish_block(x, z, residual, negative_slope).contiguous(), mask


def fourier_spectral_conv_backward(grad_y: Tensor, x: Tensor, mixing: Tensor, mask: Tensor, modes: int,
                                   residual: bool, negative_slope, output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    """Gradients of fourier_spectral_conv in x and mixing (None where output_mask is False)."""
    dz = _activation_grad(grad_y.to(mixing.dtype), mask, negative_slope)
    with torch.enable_grad():
        xd = x.detach().to(mixing.dtype).requires_grad_()
        md = mixing.detach().requires_grad_()
        grad_x, grad_mixing = torch.autograd.grad(_spectral_layer(xd, md, modes), (xd, md), dz)
    if residual:
        grad_x = grad_x + grad_y.to(mixing.dtype)
    return (grad_x.to(x.dtype) if output_mask[0] else None, grad_mixing if output_mask[1] else None)


def _mode_mixing_of_parts(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """M (fourier_mode_mixing) of a (K, C_in, C_out, 2) weight of real and imaginary parts, differentiable in it."""
    return fourier_mode_mixing(torch.complex(weight[..., 0], weight[..., 1])[:modes], n_times, modes)


def fourier_mode_conv(x: Tensor, weight: Tensor, modes: int, residual: bool, negative_slope,
                      save_mask: bool) -> tuple[Tensor, Tensor]:
    """The twin of :func:`adjointdeis.ops.fourier_mode_conv`: fourier_spectral_conv's twin with M built
    from the weight's parts."""
    check_mode_operands(x, weight, modes, residual, negative_slope)
    return fourier_spectral_conv(x, _mode_mixing_of_parts(weight, x.shape[1], modes), modes, residual,
                                 negative_slope, save_mask)


def fourier_mode_conv_backward(grad_y: Tensor, x: Tensor, weight: Tensor, mask: Tensor, modes: int,
                               residual: bool, negative_slope, output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    """Gradients of fourier_mode_conv in x and weight (None where output_mask is False)."""
    with torch.enable_grad():
        wd = weight.detach().requires_grad_()
        mixing = _mode_mixing_of_parts(wd, x.shape[1], modes)
        grad_x, grad_mixing = fourier_spectral_conv_backward(grad_y, x, mixing.detach(), mask, modes, residual,
                                                             negative_slope, [True, True])
        (grad_weight,) = torch.autograd.grad(mixing, (wd,), grad_mixing)
    return (grad_x if output_mask[0] else None, grad_weight.contiguous() if output_mask[1] else None)


def fourier_channel_conv(x: Tensor, kernel: Tensor, residual: bool, negative_slope,
                         save_mask: bool) -> tuple[Tensor, Tensor]:
    """The twin of :func:`adjointdeis.ops.fourier_channel_conv`:
    ``z[b, t, c] = sum_s kernel[t, s, c] x[b, s, c]``, then the epilogue."""
    check_channel_operands(x, kernel, residual, negative_slope)
    z = torch.einsum("tsc,bschw->btchw", kernel, x.to(kernel.dtype))
    mask = _activation_mask(z, negative_slope, save_mask)
    return _finish_block(x, z, residual, negative_slope).contiguous(), mask


def fourier_channel_conv_backward(grad_y: Tensor, x: Tensor, kernel: Tensor, mask: Tensor, residual: bool,
                                  negative_slope, output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    """Gradients of fourier_channel_conv in x and kernel (None where output_mask is False)."""
    opmath = kernel.dtype
    dz = _activation_grad(grad_y.to(opmath), mask, negative_slope)
    grad_x = grad_kernel = None
    if output_mask[0]:
        dx = torch.einsum("tsc,btchw->bschw", kernel, dz)
        grad_x = (dx + grad_y.to(opmath) if residual else dx).to(x.dtype)
    if output_mask[1]:
        grad_kernel = torch.einsum("btchw,bschw->tsc", dz, x.to(opmath))
    return grad_x, grad_kernel
