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


def fourier_kernel_synthesis(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """The real block-circulant matrix of DSNO's temporal layer (MATH.md section 7).

    ``A[(t, o), (tau, i)] = Kt[(t - tau) mod T][o, i]`` with
    ``Kt[d] = (1/T) sum_{k<modes} c_k Re(W_k^T e^{2 pi i k d / T})`` (c_0 = c_{T/2} = 1, else 2), so
    the layer is ``A @ x[b].view(T * C_in, H * W)``. Differentiable in weight (its backward is the
    adjoint of the synthesis, op ``fourier_kernel_synthesis_adjoint``).

    Args:
        weight: (K, C_in, C_out) complex64 or complex128; bins >= modes are not used.
        n_times: T, in [2, 32].
        modes: bins used, in [1, min(K, T // 2 + 1)].

    Returns:
        (T * C_out, T * C_in) float32 (float64 for a complex128 weight), on weight's device.

    Raises:
        RuntimeError naming the argument for a bad dtype, shape or range.
    """
    return torch.ops.adjointdeis.fourier_kernel_synthesis.default(weight, n_times, modes)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.complex128, torch.float64) else torch.float32


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype in (torch.complex128, torch.float64) else torch.complex64


def _check_synthesis(op, weight, dim, n_times, modes):
    if weight.dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"{op}: weight must be complex64 or complex128, got {weight.dtype}")
    if weight.dim() != dim:
        raise ValueError(f"{op}: weight must have {dim} dimensions, got shape {list(weight.shape)}")
    if not 2 <= n_times <= reference.MAX_TIMES:
        raise ValueError(f"{op}: n_times must be in [2, {reference.MAX_TIMES}], got {n_times}")
    if not 1 <= modes <= min(n_times // 2 + 1, weight.shape[0]):
        raise ValueError(f"{op}: modes must be in [1, min(n_times // 2 + 1, weight.shape[0])], got {modes}")


@torch.library.register_fake("adjointdeis::fourier_kernel_synthesis")
def _fourier_kernel_synthesis_fake(weight, n_times, modes):
    _check_synthesis("fourier_kernel_synthesis", weight, 3, n_times, modes)
    _, c_in, c_out = weight.shape
    return weight.new_empty((n_times * c_out, n_times * c_in), dtype=_real_dtype(weight.dtype))


@torch.library.register_fake("adjointdeis::fourier_kernel_synthesis_adjoint")
def _fourier_kernel_synthesis_adjoint_fake(grad_kernel, n_times, modes, num_weight_modes, in_channels):
    c_out = grad_kernel.shape[0] // n_times
    return grad_kernel.new_empty((num_weight_modes, in_channels, c_out), dtype=_complex_dtype(grad_kernel.dtype))


def _synthesis_setup_context(ctx, inputs, output):
    weight, n_times, modes = inputs
    ctx.args = (n_times, modes, weight.shape)


def _fourier_kernel_synthesis_backward(ctx, grad_kernel):
    n_times, modes, (k_w, c_in, _) = ctx.args
    grad = torch.ops.adjointdeis.fourier_kernel_synthesis_adjoint.default(grad_kernel, n_times, modes, k_w, c_in)
    return grad, None, None


def _adjoint_setup_context(ctx, inputs, output):
    ctx.args = inputs[1:3]


def _fourier_kernel_synthesis_adjoint_backward(ctx, grad_weight):
    # The synthesis is real-linear, so the adjoint of its adjoint is the synthesis itself.
    n_times, modes = ctx.args
    return torch.ops.adjointdeis.fourier_kernel_synthesis.default(grad_weight, n_times, modes), None, None, None, None


torch.library.register_autograd(
    "adjointdeis::fourier_kernel_synthesis", _fourier_kernel_synthesis_backward,
    setup_context=_synthesis_setup_context)
torch.library.register_autograd(
    "adjointdeis::fourier_kernel_synthesis_adjoint", _fourier_kernel_synthesis_adjoint_backward,
    setup_context=_adjoint_setup_context)


def fourier_tap_synthesis(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """The real circular-convolution taps ``Kt[d] = (1/T) sum_{k<modes} c_k Re(W_k e^{2 pi i k d / T})``
    of a per-channel truncated spectrum (the channel-wise layer's kernel). Differentiable in weight.

    Args:
        weight: (K, C) complex64 or complex128.
        n_times: T, in [2, 32].
        modes: bins used, in [1, min(K, T // 2 + 1)].

    Returns:
        (T, C) float32 (float64 for a complex128 weight).
    """
    return torch.ops.adjointdeis.fourier_tap_synthesis.default(weight, n_times, modes)


@torch.library.register_fake("adjointdeis::fourier_tap_synthesis")
def _fourier_tap_synthesis_fake(weight, n_times, modes):
    _check_synthesis("fourier_tap_synthesis", weight, 2, n_times, modes)
    return weight.new_empty((n_times, weight.shape[1]), dtype=_real_dtype(weight.dtype))


@torch.library.register_fake("adjointdeis::fourier_tap_synthesis_adjoint")
def _fourier_tap_synthesis_adjoint_fake(grad_taps, n_times, modes, num_weight_modes):
    return grad_taps.new_empty((num_weight_modes, grad_taps.shape[1]), dtype=_complex_dtype(grad_taps.dtype))


def _fourier_tap_synthesis_backward(ctx, grad_taps):
    n_times, modes, (k_w, _) = ctx.args
    return torch.ops.adjointdeis.fourier_tap_synthesis_adjoint.default(grad_taps, n_times, modes, k_w), None, None


def _fourier_tap_synthesis_adjoint_backward(ctx, grad_weight):
    n_times, modes = ctx.args
    return torch.ops.adjointdeis.fourier_tap_synthesis.default(grad_weight, n_times, modes), None, None, None


torch.library.register_autograd(
    "adjointdeis::fourier_tap_synthesis", _fourier_tap_synthesis_backward,
    setup_context=_synthesis_setup_context)
torch.library.register_autograd(
    "adjointdeis::fourier_tap_synthesis_adjoint", _fourier_tap_synthesis_adjoint_backward,
    setup_context=_adjoint_setup_context)


def fourier_mode_mixing(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """The layer's weight in the basis of its kept bins: the real (r C_out, r C_in) matrix M with
    ``fourier_kernel_synthesis(weight) = (E (x) I) M (P (x) I)``.

    Keeping ``modes`` bins of a length-T real signal leaves r = min(2 modes - 1, T) real coordinates
    (Re of each bin, Im of each bin other than DC and Nyquist), ordered Re_0, Re_1, Im_1, Re_2, ...;
    P (r, T) takes them from the signal (cos and -sin rows) and E (T, r) synthesises the signal back
    (the inverse real DFT restricted to them). Bin k's block is ``[[Re W_k^T, -Im W_k^T],
    [Im W_k^T, Re W_k^T]]`` (just ``Re W_k^T`` for DC and Nyquist); blocks between different bins
    are zero, and the layer's GEMM only multiplies the blocks within a bin. Differentiable in weight.

    Args:
        weight: (K, C_in, C_out) complex64 or complex128.
        n_times: T, in [2, 32].
        modes: bins used, in [1, min(K, T // 2 + 1)].

    Returns:
        (r C_out, r C_in) float32 (float64 for a complex128 weight).
    """
    return torch.ops.adjointdeis.fourier_mode_mixing.default(weight, n_times, modes)


def spectral_rank(n_times: int, modes: int) -> int:
    """Real coordinates of ``modes`` kept bins of a length-T real signal: min(2 modes - 1, T)."""
    return min(2 * modes - 1, n_times)


@torch.library.register_fake("adjointdeis::fourier_mode_mixing")
def _fourier_mode_mixing_fake(weight, n_times, modes):
    _check_synthesis("fourier_mode_mixing", weight, 3, n_times, modes)
    rank = spectral_rank(n_times, modes)
    return weight.new_empty((rank * weight.shape[2], rank * weight.shape[1]), dtype=_real_dtype(weight.dtype))


@torch.library.register_fake("adjointdeis::fourier_mode_mixing_adjoint")
def _fourier_mode_mixing_adjoint_fake(grad_mixing, n_times, modes, num_weight_modes):
    rank = spectral_rank(n_times, modes)
    return grad_mixing.new_empty((num_weight_modes, grad_mixing.shape[1] // rank, grad_mixing.shape[0] // rank),
                                 dtype=_complex_dtype(grad_mixing.dtype))


def _fourier_mode_mixing_backward(ctx, grad_mixing):
    n_times, modes, (k_w, _, _) = ctx.args
    return torch.ops.adjointdeis.fourier_mode_mixing_adjoint.default(grad_mixing, n_times, modes, k_w), None, None


def _fourier_mode_mixing_adjoint_backward(ctx, grad_weight):
    n_times, modes = ctx.args
    return torch.ops.adjointdeis.fourier_mode_mixing.default(grad_weight, n_times, modes), None, None, None


torch.library.register_autograd(
    "adjointdeis::fourier_mode_mixing", _fourier_mode_mixing_backward, setup_context=_synthesis_setup_context)
torch.library.register_autograd(
    "adjointdeis::fourier_mode_mixing_adjoint", _fourier_mode_mixing_adjoint_backward,
    setup_context=_adjoint_setup_context)


def _needs_mask(x: Tensor, kernel: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad)


def fourier_temporal_conv(x: Tensor, weight: Tensor, modes: int, residual: bool = True,
                          negative_slope: float | None = 0.01) -> Tensor:
    """DSNO's temporal Fourier layer with its block's LeakyReLU and residual, fused.

    ``layer(x) = irfft_T(bins k < modes of rfft_T(x), each multiplied by W_k^T)``, computed without
    any FFT or complex tensor through the factored block-circulant kernel (fourier_mode_mixing): a
    kernel projects x onto the r = min(2 modes - 1, T) real coordinates of the kept bins, a GEMM per
    group of equally sized bins (a batched one for the complex bins) applies M's diagonal blocks to
    all B * H * W pixels at once, and a kernel expands back to T with the activation and residual
    fused: ``y = x + LeakyReLU(layer(x))`` (residual) or ``y = LeakyReLU(layer(x))``. Kernels and
    GEMMs accumulate in float64 for float64 x and in float32 otherwise (float16/bfloat16 x is read and
    written in its dtype; the GEMMs' operands are float32). Differentiable in x and weight (first
    order: the backward op itself has no derivative).

    Args:
        x: (B, T, C_in, H, W) float64/float32/float16/bfloat16, any strides, 2 <= T <= 32.
        weight: (K, C_in, C_out) complex64 (complex128 allowed with float64 x), K >= modes.
            ``Im(W_0)`` (and ``Im(W_{T/2})`` when modes = T/2 + 1) have no effect.
        modes: bins used, 1 <= modes <= T // 2 + 1.
        residual: add x (needs C_out == C_in).
        negative_slope: LeakyReLU slope; None means no activation.

    Returns:
        (B, T, C_out, H, W) contiguous, in x's dtype.

    Raises:
        ValueError / TypeError naming the argument (shape, dtype, device, modes out of range).
    """
    reference.check_fourier_operands(x, weight, modes, residual, negative_slope)
    mixing = fourier_mode_mixing(weight.to(_complex_dtype(x.dtype)), x.shape[1], modes)
    slope = None if negative_slope is None else float(negative_slope)
    y, _ = torch.ops.adjointdeis.fourier_spectral_conv.default(
        x, mixing, modes, residual, slope, _needs_mask(x, mixing))
    return y


def fourier_temporal_conv_channelwise(x: Tensor, weight: Tensor, modes: int, residual: bool = True,
                                      negative_slope: float | None = 0.01) -> Tensor:
    """The channel-wise variant of fourier_temporal_conv: bin k of channel c is multiplied by the
    complex scalar ``weight[k, c]`` (no channel mixing).

    Runs as a direct kernel: a circular convolution along T with the per-channel real taps
    (fourier_tap_synthesis), with the activation and residual fused in.

    Args:
        x: (B, T, C, H, W) float64/float32/float16/bfloat16, any strides, 2 <= T <= 32.
        weight: (K, C) complex64 (complex128 allowed with float64 x), K >= modes.
        modes, residual, negative_slope: as in fourier_temporal_conv.

    Returns:
        (B, T, C, H, W) contiguous, in x's dtype.

    Raises:
        ValueError / TypeError naming the argument.
    """
    reference.check_fourier_operands(x, weight, modes, residual, negative_slope, channelwise=True)
    taps = fourier_tap_synthesis(weight.to(_complex_dtype(x.dtype)), x.shape[1], modes)
    slope = None if negative_slope is None else float(negative_slope)
    y, _ = torch.ops.adjointdeis.fourier_channel_conv.default(x, taps, residual, slope, _needs_mask(x, taps))
    return y


def _conv_fake(x, weight, residual, negative_slope, save_mask, out_channels):
    if x.dim() != 5:
        raise ValueError(f"x must have shape (B, T, C, H, W), got {list(x.shape)}")
    shape = (x.shape[0], x.shape[1], out_channels, x.shape[3], x.shape[4])
    mask_shape = shape if save_mask and negative_slope is not None else (0,)
    return (x.new_empty(shape),
            x.new_empty(mask_shape, dtype=torch.bool))


@torch.library.register_fake("adjointdeis::fourier_spectral_conv")
def _fourier_spectral_conv_fake(x, mixing, modes, residual, negative_slope, save_mask):
    return _conv_fake(x, mixing, residual, negative_slope, save_mask,
                      mixing.shape[0] // spectral_rank(x.shape[1], modes))


@torch.library.register_fake("adjointdeis::fourier_channel_conv")
def _fourier_channel_conv_fake(x, taps, residual, negative_slope, save_mask):
    return _conv_fake(x, taps, residual, negative_slope, save_mask, x.shape[2])


def _conv_backward_fake(grad_y, x, weight, mask, *args):
    output_mask = args[-1]
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None)


torch.library.register_fake("adjointdeis::fourier_spectral_conv_backward")(_conv_backward_fake)
torch.library.register_fake("adjointdeis::fourier_channel_conv_backward")(_conv_backward_fake)


def _conv_setup_context(ctx, inputs, output):
    x, weight, *args, save_mask = inputs
    _, mask = output
    ctx.save_for_backward(x, weight, mask)
    ctx.args = args  # ([modes,] residual, negative_slope)


def _conv_backward(op):
    def backward(ctx, grad_y, grad_mask):
        x, weight, mask = ctx.saved_tensors
        negative_slope = ctx.args[-1]
        if negative_slope is not None and mask.numel() != grad_y.numel():
            raise RuntimeError(f"{op}: backward needs the activation mask: call it with save_mask=True")
        grad_x, grad_weight = getattr(torch.ops.adjointdeis, op).default(
            grad_y, x, weight, mask, *ctx.args, [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
        return grad_x, grad_weight, *([None] * (len(ctx.args) + 1))
    return backward


torch.library.register_autograd(
    "adjointdeis::fourier_spectral_conv", _conv_backward("fourier_spectral_conv_backward"),
    setup_context=_conv_setup_context)
torch.library.register_autograd(
    "adjointdeis::fourier_channel_conv", _conv_backward("fourier_channel_conv_backward"),
    setup_context=_conv_setup_context)


if cuda_version() < 0:
    # CPU-only build: CUDA tensors take the reference path, so callers never branch on the build.
    torch.library.impl("adjointdeis::multistep_step", "CUDA", reference.multistep_step)
    torch.library.impl("adjointdeis::ctm_step", "CUDA", reference.ctm_step)
    torch.library.impl("adjointdeis::discrete_adjoint_step", "CUDA", reference.discrete_adjoint_step)
    torch.library.impl("adjointdeis::multi_tensor_axpy_", "CUDA", reference.multi_tensor_axpy_)
    for _name in ("fourier_kernel_synthesis", "fourier_kernel_synthesis_adjoint", "fourier_tap_synthesis",
                  "fourier_tap_synthesis_adjoint", "fourier_mode_mixing", "fourier_mode_mixing_adjoint",
                  "fourier_spectral_conv", "fourier_spectral_conv_backward",
                  "fourier_channel_conv", "fourier_channel_conv_backward"):
        torch.library.impl(f"adjointdeis::{_name}", "CUDA", getattr(reference, _name))
