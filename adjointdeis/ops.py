"""Typed wrappers of the compiled ops, with their fake (meta) and autograd registrations.

Each op ``adjointdeis::NAME`` has its wrapper ``ops.NAME`` and its pure-PyTorch twin ``reference.NAME``,
with one signature. The DSNO layer's user-facing functions are ``fourier_temporal_conv``, the op
``fourier_mode_conv`` on the weight's real and imaginary parts, and its channel-wise variant, which
composes an op with the weight's synthesis (plain differentiable PyTorch on the small weight).
"""

import torch
from torch import Tensor

from . import _extension, reference

_C = _extension.load()


_LIB = torch.library.Library("adjointdeis", "FRAGMENT")


_forward_ad = torch.autograd.forward_ad
_functorch_active = torch._C._are_functorch_transforms_active
_increment_version = torch.autograd.graph.increment_version


def transformed() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) or a forward-mode AD level is active, which the fused
    kernels' autograd formulas (reverse mode only, in the layout of plain tensors) do not serve."""
    return _functorch_active() or _forward_ad._current_level >= 0


def _check_untransformed(op: str, tensors) -> None:
    """Raises RuntimeError when an operand of the non-differentiable op `op` is a torch.func transform's tensor
    (vmap, grad, jvp, ...) or carries a forward-mode tangent: the op would drop the tangent or batch dimension.
    Called when :func:`transformed`, outside torch.compile."""
    for t in tensors:
        if t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t):
            raise RuntimeError(f"{op}: is not supported under torch.func transforms (vmap, grad, jvp, ...); "
                               "use the functional ops (multistep_step, or plain PyTorch)")
        if t is not None and _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(t).tangent is not None:
            raise RuntimeError(f"{op}: is not differentiable, but an input carries a forward-mode AD tangent; "
                               "use multistep_step, or plain PyTorch")


def _register_autograd(name: str, backward, setup_context, constant: int | None = None) -> None:
    """The Autograd kernel of ``adjointdeis::NAME``: `backward` (reverse mode) around the fused kernel, and the
    pure-PyTorch twin ``reference.NAME`` (which every transform differentiates and batches) under torch.func
    transforms and forward-mode AD, and when the argument at position `constant` (if any: the coefficients, which
    the fused backward treats as constants) requires grad. Without it, forward-mode AD would drop the tangents
    (torch's custom-op autograd is reverse mode only) and coefficients that require grad would get none."""
    op = getattr(torch.ops.adjointdeis, name).default
    fused = torch._library.autograd.make_autograd_impl(op, torch._library.autograd.Info(backward, setup_context))
    twin = getattr(reference, name)

    def kernel(keyset, *args):
        if transformed() or (constant is not None and args[constant].requires_grad and torch.is_grad_enabled()):
            return twin(*args)
        return fused(keyset, *args)

    _LIB.impl(name, kernel, "Autograd", with_keyset=True)


def _register_vmap(name: str, constant: int, out_dims) -> None:
    """The batching rule of the elementwise op ``adjointdeis::NAME`` (torch.vmap): the fused kernel on the operands
    with their vmapped dimension moved to the front and unit dimensions inserted after it, so that they broadcast
    with the other operands as the logical tensors do; one call per batch element when the coefficients (argument
    `constant`) are vmapped. `out_dims(args)`: the results' vmapped dimensions (0, or None for an empty m0)."""
    op = getattr(torch.ops.adjointdeis, name).default

    def each(args, in_dims, f):
        return [f(a, d) if not isinstance(a, list) else [f(t, e) for t, e in zip(a, d)] for a, d in zip(args, in_dims)]

    def rule(info, in_dims, *args):
        if in_dims[constant] is not None:
            calls = [op(*each(args, in_dims, lambda t, d: t if t is None or d is None else t.select(d, i)))
                     for i in range(info.batch_size)]
            dims = out_dims(args)
            return tuple(torch.stack(r) if d == 0 else r[0] for r, d in zip(zip(*calls), dims)), dims
        ranks = each(args, in_dims, lambda t, d: t.dim() - (d is not None) if isinstance(t, Tensor) else 0)
        rank = max(max(r) if isinstance(r, list) else r for r in ranks if r != [])

        def lead(t, dim):
            if t is None or dim is None:
                return t
            t = t.movedim(dim, 0)
            return t.view(t.shape[0], *([1] * (rank + 1 - t.dim())), *t.shape[1:])

        return op(*each(args, in_dims, lead)), out_dims(args)

    torch.library.register_vmap(f"adjointdeis::{name}", rule, lib=_LIB)


def cuda_version() -> int:
    """CUDA_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 for a CPU-only build."""
    return torch.ops.adjointdeis.cuda_build()[0]


def cuda_arch_list() -> str:
    """Compute capabilities the CUDA kernels were compiled for, e.g. "800,900" ("" if none)."""
    return torch.ops.adjointdeis.cuda_build()[1]


def multistep_step(x: Tensor, out: Tensor, history: list[Tensor], coeffs: Tensor, noise: Tensor | None = None,
                   save_m0: bool = True) -> tuple[Tensor, Tensor]:
    """One fused solver step (docs/math.md section 4): ``m0 = p x + q out``,
    ``x_next = a x + b0 m0 + b1 m1 + b2 m2 + b3 m3 + c noise``.

    One pass over memory on CPU or CUDA; differentiable in x, out, history and noise (and in coeffs when it requires
    grad, through the twin ``reference.multistep_step``, as under torch.func transforms and forward-mode AD). A
    consistency-trajectory (gamma) jump ``x_next = a x + b g + c noise`` (docs/math.md section 8) is the
    row ``[a, b, 0, 0, c, 0, 1]`` with ``out = g``, no history and ``save_m0=False``.

    Args:
        x: (*shape) current state, float64/float32/float16/bfloat16.
        out: (*shape) raw model output at x (broadcastable to the common shape), same dtype.
        history: up to three previous converted outputs ``[m1, m2, m3]`` (broadcastable), same dtype.
        coeffs: (7,) float64 ``[a, b0, b1, b2, c, p, q]`` on x's device, or (8,) with ``b3`` appended
            (required with three history terms); a row of a precomputed table, so no host sync
            happens per step.
        noise: optional standard normal noise (broadcastable), same dtype.
        save_m0: also return m0; False skips writing it (the last step, or a step nobody keeps).

    Returns:
        ``(x_next, m0)``: the next state and the converted output to keep as history, contiguous with
        the broadcast shape and x's dtype; m0 is an empty tensor when not saved.

    Raises:
        RuntimeError naming the argument for a dtype, device or shape mismatch.
    """
    return torch.ops.adjointdeis.multistep_step.default(x, out, list(history), coeffs, noise, save_m0)


@torch.library.register_fake("adjointdeis::multistep_step")
def _multistep_step_fake(x, out, history, coeffs, noise, save_m0):
    shape = reference.check_step_operands(x, out, history, coeffs, noise)
    return x.new_empty(shape), x.new_empty(shape if save_m0 else (0,))


def _multistep_step_setup_context(ctx, inputs, output):
    x, out, history, coeffs, noise, save_m0 = inputs
    ctx.save_for_backward(coeffs)
    ctx.shapes = (x.shape, out.shape, [h.shape for h in history], None if noise is None else noise.shape)
    ctx.save_m0 = save_m0


def _multistep_step_backward(ctx, grad_x_next, grad_m0):
    (coeffs,) = ctx.saved_tensors
    x_shape, out_shape, history_shapes, noise_shape = ctx.shapes
    a, b0, b1, b2, c, p, q, *wide = coeffs.to(grad_x_next.dtype).unbind()
    grad_total_m0 = b0 * grad_x_next + grad_m0 if ctx.save_m0 else b0 * grad_x_next
    grad_x = (a * grad_x_next + p * grad_total_m0).sum_to_size(x_shape)
    grad_out = (q * grad_total_m0).sum_to_size(out_shape)
    grad_history = [(b * grad_x_next).sum_to_size(s) for b, s in zip((b1, b2, *wide), history_shapes)]
    grad_noise = None if noise_shape is None else (c * grad_x_next).sum_to_size(noise_shape)
    return grad_x, grad_out, grad_history, None, grad_noise, None


_register_autograd("multistep_step", _multistep_step_backward, _multistep_step_setup_context, constant=3)
_register_vmap("multistep_step", 3, lambda args: (0, 0 if args[5] else None))


def multistep_step_out(x: Tensor, out: Tensor, history: list[Tensor], coeffs: Tensor, noise: Tensor | None = None,
                       *, x_next: Tensor, m0: Tensor | None = None, finite: Tensor | None = None) -> None:
    """:func:`multistep_step` writing into the caller's buffers: `x_next`, and `m0` unless it is None (not saved).

    For a sampling loop that recycles the tensors it has dropped instead of allocating two fresh ones per step
    (on CPU, freshly allocated outputs can cost a page fault per 4 KiB in every step), or steps in place:
    ``x_next=x, m0=history[-1]`` overwrites the state and the oldest output, so a DPM-Solver++(2M) loop touches
    three tensors instead of five. Not differentiable.

    Args:
        x, out, history, coeffs, noise: as for :func:`multistep_step`.
        x_next, m0: contiguous, with the operands' broadcast shape and x's dtype and device, apart from each
            other; each either one of the inputs itself (the same memory in the same layout: written in place of
            it, every element read before it is written) or sharing no memory with any input.
        finite: None, or a 0-d bool tensor on x's device that the kernel sets to False when x_next holds a NaN
            or an infinity (left as it is otherwise): the sampler's finiteness check, made on each block of
            x_next while it is in cache instead of in a pass over memory after the loop.

    Raises:
        RuntimeError naming the argument for a dtype, device, shape, layout or overlap mismatch, when
        grad mode is on and an input or a buffer requires grad, and for an input of a torch.func transform or
        with a forward-mode AD tangent.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, out, noise, *history, x_next, m0)):
        raise RuntimeError("multistep_step_out: is not differentiable, but an input or output buffer requires grad; "
                           "use multistep_step, or run under torch.no_grad()")
    if transformed() and not torch.compiler.is_compiling():
        _check_untransformed("multistep_step_out", (x, out, noise, *history, x_next, m0))
    torch.ops.adjointdeis.multistep_step_out.default(x, out, list(history), coeffs, noise, x_next, m0, finite)
    if not torch.compiler.is_compiling():  # as an in-place op does: a backward through a tensor saved before the
        _increment_version([t for t in (x_next, m0, finite) if t is not None])  # write then raises


multistep_step_out_unchecked = torch.ops.adjointdeis.multistep_step_out.default
"""The op behind :func:`multistep_step_out`, positional and without its Python checks or version bumps (about
1 us a call): for a sampling loop under no_grad whose buffers nobody else holds (:func:`adjointdeis.planning.run_plan`).
The C++ checks of operands (dtype, device, shape, layout, overlap) still run."""


@torch.library.register_fake("adjointdeis::multistep_step_out")
def _multistep_step_out_fake(x, out, history, coeffs, noise, x_next, m0, finite=None):
    reference.check_step_outputs(x, out, history, coeffs, noise, x_next, m0, finite, memory=False)


def discrete_adjoint_step(xbar: Tensor, vjp: Tensor, gfull: Tensor, pend1: Tensor | None,
                          pend2: Tensor | None, coeffs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One fused row j of the exact discrete adjoint (docs/math.md section 5.1), after the model's VJP at x_j.

    ``xbar_prev = a xbar + p gfull + vjp``, ``gfull_prev = pend1 + b1 xbar + b0_prev xbar_prev``,
    ``cot_prev = q_prev gfull_prev``, ``pend_prev = pend2 + b2 xbar``, in one pass over memory on
    CPU or CUDA; differentiable in xbar, vjp, gfull, pend1 and pend2 (it is linear in them; in coeffs, under
    torch.func transforms and forward-mode AD through the twin ``reference.discrete_adjoint_step``).

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


_register_autograd("discrete_adjoint_step", _discrete_adjoint_step_backward, _discrete_adjoint_step_setup_context,
                   constant=5)
_register_vmap("discrete_adjoint_step", 5, lambda args: (0,) * 4)


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
        shape mismatch, when grad mode is on and an input requires grad, and for an input of a torch.func
        transform or with a forward-mode AD tangent.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*accumulators, *updates, scale)):
        raise RuntimeError(
            "multi_tensor_axpy_ is not differentiable: call it under torch.no_grad() or on tensors "
            "that do not require grad"
        )
    if transformed() and not torch.compiler.is_compiling():
        _check_untransformed("multi_tensor_axpy_", (*accumulators, *updates, scale))
    torch.ops.adjointdeis.multi_tensor_axpy_.default(list(accumulators), list(updates), scale)
    if not torch.compiler.is_compiling():  # as an in-place op does: a backward through a tensor saved before the
        _increment_version(accumulators)  # write then raises


@torch.library.register_fake("adjointdeis::multi_tensor_axpy_")
def _multi_tensor_axpy_fake(accumulators, updates, scale):
    reference.check_axpy_operands(accumulators, updates, scale)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.complex128, torch.float64) else torch.float32


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype in (torch.complex128, torch.float64) else torch.complex64


def spectral_rank(n_times: int, modes: int) -> int:
    """Real coordinates of ``modes`` kept bins of a length-T real signal: min(2 modes - 1, T)."""
    return min(2 * modes - 1, n_times)


def fourier_tap_synthesis(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """The real circular-convolution taps ``Kt[d] = (1/T) sum_{k<modes} c_k Re(W_k e^{2 pi i k d / T})``
    of a per-channel truncated spectrum (c_0 = c_{T/2} = 1, else 2; docs/math.md section 7).

    Plain PyTorch on the weight (differentiable to any order): ``Kt = C Re W + S Im W`` with the real
    synthesis tables C, S built in float64; ``Im(W_0)`` and ``Im(W_{T/2})`` have no effect.

    Args:
        weight: (K, N) complex64 or complex128.
        n_times: T, in [2, 32].
        modes: bins used, in [1, min(K, T // 2 + 1)].

    Returns:
        (T, N) float32 (float64 for a complex128 weight), on weight's device.

    Raises:
        TypeError / ValueError naming the argument for a bad dtype, shape or range.
    """
    reference.check_synthesis_operands("fourier_tap_synthesis", weight, 2, n_times, modes)
    options = dict(dtype=torch.float64, device=weight.device)
    d, k = torch.arange(n_times, **options)[:, None], torch.arange(modes, **options)[None, :]
    theta = torch.remainder(d * k, n_times) * (2 * torch.pi / n_times)
    single = (k == 0) | (2 * k == n_times)
    c = (2.0 - single.double()) / n_times
    real = _real_dtype(weight.dtype)
    cos, sin = (c * torch.cos(theta)).to(real), torch.where(single, 0.0, -c * torch.sin(theta)).to(real)
    parts = torch.view_as_real(weight[:modes])
    return cos @ parts[..., 0] + sin @ parts[..., 1]


def fourier_mode_mixing(weight: Tensor, n_times: int, modes: int) -> Tensor:
    """The layer's weight in the basis of its kept bins: the real (r C_out, r C_in) matrix M with
    ``reference.fourier_kernel_synthesis(weight) = (E (x) I) M (P (x) I)``.

    Keeping ``modes`` bins of a length-T real signal leaves r = min(2 modes - 1, T) real coordinates
    (Re of each bin, Im of each bin other than DC and Nyquist), ordered Re_0, Re_1, Im_1, Re_2, ...;
    P (r, T) takes them from the signal (cos and -sin rows) and E (T, r) synthesises the signal back
    (the inverse real DFT restricted to them). Bin k's block is ``[[Re W_k^T, -Im W_k^T],
    [Im W_k^T, Re W_k^T]]`` (just ``Re W_k^T`` for DC and Nyquist); blocks between different bins
    are zero, and the layer's GEMM only multiplies the blocks within a bin. Plain PyTorch on the
    weight (differentiable to any order).

    Args:
        weight: (K, C_in, C_out) complex64 or complex128.
        n_times: T, in [2, 32].
        modes: bins used, in [1, min(K, T // 2 + 1)].

    Returns:
        (r C_out, r C_in) float32 (float64 for a complex128 weight).

    Raises:
        TypeError / ValueError naming the argument for a bad dtype, shape or range.
    """
    reference.check_synthesis_operands("fourier_mode_mixing", weight, 3, n_times, modes)
    # W_k^T bin by bin by 2-D transposing copies (ATen's blocked transpose): cat and block_diag then read
    # contiguous rows, 2x faster at C = 256 than gathering them through a transposed view.
    transposed = torch.stack([w.T.contiguous() for w in weight[:modes].unbind(0)])  # (modes, C_out, C_in)
    parts = torch.view_as_real(transposed)  # (modes, C_out, C_in, 2): real ops only
    re, im = parts[..., 0], parts[..., 1]
    nyquist = 2 * (modes - 1) == n_times
    pairs = slice(1, modes - 1 if nyquist else modes)
    blocks = [re[0]]
    if pairs.stop > 1:
        rp, ip = re[pairs], im[pairs]
        blocks += torch.cat([torch.cat([rp, -ip], 2), torch.cat([ip, rp], 2)], 1).unbind(0)
    if nyquist:
        blocks.append(re[modes - 1])
    return torch.block_diag(*blocks)


def fourier_spectral_conv(x: Tensor, mixing: Tensor, modes: int, residual: bool, negative_slope: float | None,
                          save_mask: bool) -> tuple[Tensor, Tensor]:
    """The temporal layer given its mode mixing M (fourier_mode_mixing), with its activation and residual.

    A kernel projects x onto the r = min(2 modes - 1, T) real coordinates of the kept bins, a GEMM per
    group of equally sized bins (a batched one for the complex bins) applies M's diagonal blocks to
    all B * H * W pixels at once, and a kernel expands back to T with the activation and residual
    fused: ``y = x + LeakyReLU(z)`` (residual) or ``y = LeakyReLU(z)``. Kernels and GEMMs accumulate
    in float64 for float64 x and in float32 otherwise (float16/bfloat16 x is read and written in its
    dtype). Differentiable in x and mixing (first order: the backward op itself has no derivative).

    Args:
        x: (B, T, C_in, H, W) float64/float32/float16/bfloat16, any strides, 2 <= T <= 32.
        mixing: (r C_out, r C_in) float64 for float64 x, float32 otherwise; only its blocks within
            a bin are read.
        modes: bins kept, 1 <= modes <= T // 2 + 1.
        residual: add x (needs C_out == C_in).
        negative_slope: LeakyReLU slope; None means no activation.
        save_mask: also return the mask ``z <= 0`` the backward needs.

    Returns:
        ``(y, mask)``: y (B, T, C_out, H, W) contiguous in x's dtype; mask (y's shape, bool), or an
        empty bool tensor when not saved or without activation.

    Raises:
        ValueError / TypeError naming the argument (dtype, device, shape, modes out of range): the checks of
        ``reference.check_spectral_operands`` (``torch.ops.adjointdeis`` called directly: RuntimeError).
    """
    reference.check_spectral_operands(x, mixing, modes, residual, negative_slope)
    return torch.ops.adjointdeis.fourier_spectral_conv.default(x, mixing, modes, residual, negative_slope, save_mask)


def fourier_mode_conv(x: Tensor, weight: Tensor, modes: int, residual: bool, negative_slope: float | None,
                      save_mask: bool) -> tuple[Tensor, Tensor]:
    """The temporal layer given its bins' weights, as fourier_spectral_conv(x, fourier_mode_mixing(W)) without
    forming M: the GEMMs' blocks are built from the weight in one pass and the backward returns the weight's
    gradient directly (the layer's path, fourier_temporal_conv). Differentiable in x and weight (first order).

    Args:
        x: (B, T, C_in, H, W) float64/float32/float16/bfloat16, any strides, 2 <= T <= 32.
        weight: (K, C_in, C_out, 2) the complex weight's real and imaginary parts (``torch.view_as_real``),
            float64 for float64 x, float32 otherwise, any strides, K >= modes; bins beyond ``modes`` are not read.
        modes, residual, negative_slope, save_mask: as in fourier_spectral_conv.

    Returns:
        ``(y, mask)`` as in fourier_spectral_conv.

    Raises:
        ValueError / TypeError naming the argument: the checks of ``reference.check_mode_operands``.
    """
    reference.check_mode_operands(x, weight, modes, residual, negative_slope)
    return torch.ops.adjointdeis.fourier_mode_conv.default(x, weight, modes, residual, negative_slope, save_mask)


def fourier_channel_conv(x: Tensor, kernel: Tensor, residual: bool, negative_slope: float | None,
                         save_mask: bool) -> tuple[Tensor, Tensor]:
    """A per-channel temporal mix ``z[b, t, c] = sum_s kernel[t, s, c] x[b, s, c]`` with the activation
    and residual fused, in one kernel (the channel-wise layer, whose kernel is the circulant matrix of
    its taps). Differentiable in x and kernel (first order).

    Args:
        x: (B, T, C, H, W) float64/float32/float16/bfloat16, any strides, 2 <= T <= 32.
        kernel: (T, T, C) float64 for float64 x, float32 otherwise.
        residual, negative_slope, save_mask: as in fourier_spectral_conv.

    Returns:
        ``(y, mask)`` as in fourier_spectral_conv, y of x's shape.

    Raises:
        ValueError / TypeError naming the argument (``torch.ops.adjointdeis`` called directly: RuntimeError).
    """
    reference.check_channel_operands(x, kernel, residual, negative_slope)
    return torch.ops.adjointdeis.fourier_channel_conv.default(x, kernel, residual, negative_slope, save_mask)


def _needs_mask(x: Tensor, kernel: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad)


def fourier_temporal_conv(x: Tensor, weight: Tensor, modes: int, residual: bool = True,
                          negative_slope: float | None = 0.01) -> Tensor:
    """DSNO's temporal Fourier layer with its block's LeakyReLU and residual (docs/math.md section 7).

    ``layer(x) = irfft_T(bins k < modes of rfft_T(x), each multiplied by W_k^T)``, computed without
    any FFT or complex tensor on the activations as ``fourier_mode_conv(x, view_as_real(weight))``, which is
    ``fourier_spectral_conv(x, fourier_mode_mixing(weight))`` with the GEMMs' blocks built in the op:
    ``y = x + LeakyReLU(layer(x))`` (residual) or ``y = LeakyReLU(layer(x))``. Differentiable in x and
    weight (first order in x).

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
    parts = torch.view_as_real(weight.to(_complex_dtype(x.dtype)).resolve_conj())
    slope = None if negative_slope is None else float(negative_slope)
    y, _ = torch.ops.adjointdeis.fourier_mode_conv.default(x, parts, modes, residual, slope, _needs_mask(x, parts))
    return y


def fourier_temporal_conv_channelwise(x: Tensor, weight: Tensor, modes: int, residual: bool = True,
                                      negative_slope: float | None = 0.01) -> Tensor:
    """The channel-wise variant of fourier_temporal_conv: bin k of channel c is multiplied by the
    complex scalar ``weight[k, c]`` (no channel mixing).

    Runs as ``fourier_channel_conv`` with the circulant matrix of the per-channel real taps
    (fourier_tap_synthesis): a circular convolution along T, the activation and residual fused in.

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
    n_times = x.shape[1]
    taps = fourier_tap_synthesis(weight.to(_complex_dtype(x.dtype)), n_times, modes)
    t = torch.arange(n_times, device=x.device)
    kernel = taps[torch.remainder(t[:, None] - t[None, :], n_times)]  # kernel[t, s] = taps[(t - s) mod T]
    slope = None if negative_slope is None else float(negative_slope)
    y, _ = fourier_channel_conv(x, kernel, residual, slope, _needs_mask(x, kernel))
    return y


def _conv_fake(x, weight, residual, negative_slope, save_mask, out_channels):
    shape = (x.shape[0], x.shape[1], out_channels, x.shape[3], x.shape[4])
    mask_shape = shape if save_mask and negative_slope is not None else (0,)
    return x.new_empty(shape), x.new_empty(mask_shape, dtype=torch.bool)


@torch.library.register_fake("adjointdeis::fourier_spectral_conv")
def _fourier_spectral_conv_fake(x, mixing, modes, residual, negative_slope, save_mask):
    c_out = reference.check_spectral_operands(x, mixing, modes, residual, negative_slope)
    return _conv_fake(x, mixing, residual, negative_slope, save_mask, c_out)


@torch.library.register_fake("adjointdeis::fourier_mode_conv")
def _fourier_mode_conv_fake(x, weight, modes, residual, negative_slope, save_mask):
    c_out = reference.check_mode_operands(x, weight, modes, residual, negative_slope)
    return _conv_fake(x, weight, residual, negative_slope, save_mask, c_out)


@torch.library.register_fake("adjointdeis::fourier_channel_conv")
def _fourier_channel_conv_fake(x, kernel, residual, negative_slope, save_mask):
    reference.check_channel_operands(x, kernel, residual, negative_slope)
    return _conv_fake(x, kernel, residual, negative_slope, save_mask, x.shape[2])


def _conv_backward_fake(grad_y, x, weight, mask, *args):
    output_mask = args[-1]
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None)


torch.library.register_fake("adjointdeis::fourier_spectral_conv_backward")(_conv_backward_fake)
torch.library.register_fake("adjointdeis::fourier_mode_conv_backward")(_conv_backward_fake)
torch.library.register_fake("adjointdeis::fourier_channel_conv_backward")(_conv_backward_fake)


def _conv_setup_context(ctx, inputs, output):
    x, weight, *args, save_mask = inputs
    _, mask = output
    ctx.save_for_backward(x, weight, mask)
    ctx.args = args  # ([modes,] residual, negative_slope)
    # No zero gradient for the (boolean) mask, nor for an unused y: a fill of the mask's size on every backward.
    ctx.set_materialize_grads(False)


def _conv_backward(op):
    def backward(ctx, grad_y, grad_mask):
        if grad_y is None:
            return (None,) * (len(ctx.args) + 3)
        x, weight, mask = ctx.saved_tensors
        negative_slope = ctx.args[-1]
        if negative_slope is not None and mask.numel() != grad_y.numel():
            raise RuntimeError(f"{op}: backward needs the activation mask: call it with save_mask=True")
        grad_x, grad_weight = getattr(torch.ops.adjointdeis, op).default(
            grad_y, x, weight, mask, *ctx.args, [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
        return grad_x, grad_weight, *([None] * (len(ctx.args) + 1))
    return backward


for _name in ("fourier_spectral_conv", "fourier_mode_conv", "fourier_channel_conv"):
    _register_autograd(_name, _conv_backward(f"{_name}_backward"), _conv_setup_context)


if cuda_version() < 0:
    # CPU-only build: CUDA tensors take the reference path, so callers never branch on the build.
    for _name in ("multistep_step", "multistep_step_out", "discrete_adjoint_step", "multi_tensor_axpy_",
                  "fourier_spectral_conv", "fourier_spectral_conv_backward", "fourier_mode_conv",
                  "fourier_mode_conv_backward", "fourier_channel_conv", "fourier_channel_conv_backward"):
        torch.library.impl(f"adjointdeis::{_name}", "CUDA", getattr(reference, _name))
