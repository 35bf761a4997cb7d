"""DSNO's temporal Fourier convolution (ops.fourier_temporal_conv and its channel-wise variant, the ops
fourier_spectral_conv and fourier_channel_conv behind them, the weight synthesis, FourierTemporalConv)
against the literal rfft / einsum / irfft reference and the dense block-circulant matrix, computed on
the CPU in float64."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.testing import assert_close

import adjointdeis as ad
from adjointdeis import ops, reference
from conftest import DEVICES, DTYPES

# Tolerances against the float64 reference: the op's output is rounded to x's dtype, and its GEMM
# accumulates T * C_in products in float32 (float64 for float64 x).
REFERENCE_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
SLOPES = [0.01, 0.3, None]


def make_x(shape, dtype=torch.float64, device="cpu", seed=0, layout="contiguous"):
    """Activations (B, T, C, H, W) in the given layout: contiguous, a permuted view (channels
    last in memory) or a strided slice."""
    g = torch.Generator().manual_seed(seed)
    b, t, c, h, w = shape
    if layout == "permuted":
        x = torch.randn(b, h, w, t, c, generator=g, dtype=torch.float64).permute(0, 3, 4, 1, 2)
    elif layout == "sliced":
        x = torch.randn(b, t, c, h, 2 * w + 1, generator=g, dtype=torch.float64)[..., 1::2]
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def make_weight(shape, seed=1, device="cpu", dtype=torch.complex64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.complex128) / shape[1] ** 0.5
    return w.to(device=device, dtype=dtype)


def circulant(taps):
    """(T, T, C) kernel[t, s] = taps[(t - s) mod T] of the channel-wise layer."""
    t = torch.arange(taps.shape[0], device=taps.device)
    return taps[(t[:, None] - t[None, :]) % taps.shape[0]]


def float64_reference(fn, x, weight, modes, residual, slope):
    return fn(x.cpu().double(), weight.cpu().to(torch.complex128), modes, residual, slope)


@st.composite
def layer_cases(draw, channelwise=False):
    n_times = draw(st.integers(2, 32))
    modes = draw(st.integers(1, n_times // 2 + 1))
    c_in = draw(st.integers(1, 5))
    c_out = c_in if channelwise else draw(st.integers(1, 5))
    residual = c_in == c_out and draw(st.booleans())
    shape = (draw(st.integers(1, 3)), n_times, c_in, draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    k_w = modes + draw(st.integers(0, 2))
    weight_shape = (k_w, c_in) if channelwise else (k_w, c_in, c_out)
    return dict(shape=shape, weight_shape=weight_shape, modes=modes, residual=residual,
                slope=draw(st.sampled_from(SLOPES)), dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(["contiguous", "permuted", "sliced"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def check_against_reference(case, op, ref):
    x = make_x(case["shape"], case["dtype"], seed=case["seed"], layout=case["layout"])
    weight = make_weight(case["weight_shape"], seed=case["seed"] + 1)
    y = op(x, weight, case["modes"], case["residual"], case["slope"])
    want = float64_reference(ref, x, weight, case["modes"], case["residual"], case["slope"])
    assert y.dtype == x.dtype and y.is_contiguous() and y.shape == want.shape
    assert_close(y.double(), want, **REFERENCE_TOL[x.dtype])


@settings(max_examples=60, deadline=None)
@given(case=layer_cases())
def test_matches_float64_reference(case):
    check_against_reference(case, ops.fourier_temporal_conv, reference.fourier_temporal_conv)


@settings(max_examples=40, deadline=None)
@given(case=layer_cases(channelwise=True))
def test_channelwise_matches_float64_reference(case):
    check_against_reference(case, ops.fourier_temporal_conv_channelwise,
                            reference.fourier_temporal_conv_channelwise)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_times,modes", [(2, 2), (4, 2), (5, 3), (16, 9), (32, 5)])
def test_every_dtype_and_device(device, dtype, n_times, modes):
    x = make_x((2, n_times, 6, 5, 3), dtype, device)
    for residual, weight_shape in ((True, (modes, 6, 6)), (False, (modes, 6, 4))):
        weight = make_weight(weight_shape, device=device)
        y = ops.fourier_temporal_conv(x, weight, modes, residual)
        want = float64_reference(reference.fourier_temporal_conv, x, weight, modes, residual, 0.01)
        assert y.device == x.device and y.dtype == dtype
        assert_close(y.cpu().double(), want, **REFERENCE_TOL[dtype])
    weight = make_weight((modes, 6), device=device)
    y = ops.fourier_temporal_conv_channelwise(x, weight, modes)
    want = float64_reference(reference.fourier_temporal_conv_channelwise, x, weight, modes, True, 0.01)
    assert_close(y.cpu().double(), want, **REFERENCE_TOL[dtype])


def test_reference_is_the_plain_fft_layer():
    """The reference equals rfft -> per-bin complex matmul -> irfft written out in a loop."""
    x, weight, modes = make_x((2, 6, 3, 2, 2)), make_weight((4, 3, 5), dtype=torch.complex128), 3
    spectrum = torch.fft.rfft(x, dim=1)
    out = torch.zeros(2, 4, 5, 2, 2, dtype=torch.complex128)
    for k in range(modes):
        out[:, k] = torch.einsum("bihw,io->bohw", spectrum[:, k], weight[k])
    out[:, 0] = out[:, 0].real  # a real signal's DC bin is real
    want = torch.fft.irfft(out, n=6, dim=1)
    assert_close(reference.fourier_temporal_conv(x, weight, modes, False, None), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_times", [2, 3, 4, 7, 8, 13, 32])
def test_synthesis_identity(n_times):
    """The dense block-circulant matrix applied as a 1x1 convolution is the layer, and the taps of the
    op's synthesis equal the reference's."""
    for modes in sorted({1, n_times // 2, n_times // 2 + 1} - {0}):
        weight = make_weight((modes + 1, 3, 4), dtype=torch.complex128)
        kernel = reference.fourier_kernel_synthesis(weight, n_times, modes)
        assert kernel.shape == (n_times * 4, n_times * 3) and kernel.dtype == torch.float64
        x = make_x((2, n_times, 3, 3, 2))
        layer = (kernel @ x.reshape(2, n_times * 3, 6)).view(2, n_times, 4, 3, 2)
        assert_close(layer, reference.fourier_temporal_conv(x, weight, modes, False, None), rtol=1e-12, atol=1e-12)
        taps = ops.fourier_tap_synthesis(weight[:, 0], n_times, modes)
        assert_close(taps, reference.fourier_tap_synthesis(weight[:, 0], n_times, modes), rtol=1e-13, atol=1e-13)
        assert taps.dtype == torch.float64
    assert ops.fourier_tap_synthesis(weight[:, 0].to(torch.complex64), n_times, modes).dtype == torch.float32


@pytest.mark.parametrize("n_times", [4, 5, 8])
@pytest.mark.parametrize("channelwise", [False, True])
def test_imaginary_part_of_real_bins_has_no_effect(n_times, channelwise):
    modes = n_times // 2 + 1
    x = make_x((2, n_times, 3, 2, 2))
    weight = make_weight((modes, 3) if channelwise else (modes, 3, 3), dtype=torch.complex128)
    op = ops.fourier_temporal_conv_channelwise if channelwise else ops.fourier_temporal_conv
    ref = reference.fourier_temporal_conv_channelwise if channelwise else reference.fourier_temporal_conv
    real_bins = [0] + ([n_times // 2] if n_times % 2 == 0 else [])
    changed = weight.clone()
    changed[real_bins] = changed[real_bins] + 5j
    for fn in (op, ref):
        assert torch.equal(fn(x, changed, modes), fn(x, weight, modes))
    changed[1] = changed[1] + 0.5j  # the imaginary part of any other bin matters
    for fn in (op, ref):
        assert not torch.allclose(fn(x, changed, modes), fn(x, weight, modes))


def test_bins_beyond_modes_are_ignored():
    x, weight = make_x((1, 8, 2, 2, 2)), make_weight((5, 2, 2))
    changed = weight.clone()
    changed[2:] = 7.0
    assert torch.equal(ops.fourier_temporal_conv(x, changed, 2), ops.fourier_temporal_conv(x, weight, 2))


@pytest.mark.parametrize("n_times,modes,residual,slope", [(4, 2, True, 0.01), (5, 3, False, 0.2), (6, 4, False, None)])
def test_gradcheck(n_times, modes, residual, slope):
    x = make_x((2, n_times, 3, 2, 1)).requires_grad_()
    c_out = 3 if residual else 2
    weight = make_weight((modes, 3, c_out), dtype=torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: ops.fourier_temporal_conv(x, w, modes, residual, slope), (x, weight))
    wc = make_weight((modes, 3), dtype=torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: ops.fourier_temporal_conv_channelwise(x, w, modes, True, slope), (x, wc))


@pytest.mark.parametrize("n_times,modes", [(4, 3), (7, 2)])
def test_synthesis_gradcheck_and_gradgradcheck(n_times, modes):
    weight = make_weight((modes + 1, 2, 3), dtype=torch.complex128).requires_grad_()
    taps_weight = weight[:, 0].detach().requires_grad_()
    for fn, w in ((ops.fourier_mode_mixing, weight), (ops.fourier_tap_synthesis, taps_weight)):
        assert torch.autograd.gradcheck(lambda w: fn(w, n_times, modes), (w,))
        assert torch.autograd.gradgradcheck(lambda w: fn(w, n_times, modes), (w,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channelwise", [False, True])
def test_gradients_match_reference(dtype, channelwise):
    """Gradients in x and the complex weight equal the float64 reference's autograd."""
    n_times, modes = 6, 3
    x = make_x((3, n_times, 4, 3, 5), layout="permuted")
    weight = make_weight((modes, 4) if channelwise else (modes, 4, 4), dtype=torch.complex128)
    cot = make_x((3, n_times, 4, 3, 5), seed=7)
    op = ops.fourier_temporal_conv_channelwise if channelwise else ops.fourier_temporal_conv
    ref = reference.fourier_temporal_conv_channelwise if channelwise else reference.fourier_temporal_conv

    def grads(fn, x, w):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        (fn(x, w, modes) * cot.to(x.dtype)).sum().backward()
        return x.grad, w.grad

    got_x, got_w = grads(op, x.to(dtype), weight.to(torch.complex128 if dtype == torch.float64 else torch.complex64))
    want_x, want_w = grads(ref, x.to(dtype).double(), weight)
    tol = REFERENCE_TOL[dtype]
    assert got_x.dtype == dtype
    assert_close(got_x.double(), want_x, **tol)
    scale = want_w.abs().max()  # the weight gradient sums over B * H * W * T products
    assert_close(got_w.to(torch.complex128) / scale, want_w / scale, **tol)


def test_batch_split_into_pipeline_chunks():
    """Large enough that the CPU pipeline runs over several chunks of the batch (5 of one entry each: an entry
    has 3 * 64 * 32 * 32 coordinates, and a chunk at most 2 ** 18)."""
    x = make_x((5, 4, 64, 32, 32), layout="sliced").requires_grad_()
    weight = make_weight((2, 64, 64), dtype=torch.complex128).requires_grad_()
    cot = make_x((5, 4, 64, 32, 32), seed=4)
    y = ops.fourier_temporal_conv(x, weight, 2)
    (y * cot).sum().backward()
    got = (y.detach(), x.grad, weight.grad)
    x.grad = weight.grad = None
    want = reference.fourier_temporal_conv(x, weight, 2)
    (want * cot).sum().backward()
    for g, w in zip(got, (want.detach(), x.grad, weight.grad)):
        assert_close(g, w, rtol=1e-10, atol=1e-10 * w.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_internal_ops_match_their_twins(device, dtype):
    """fourier_spectral_conv / fourier_channel_conv and their backward ops against reference.py."""
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_x((2, 4, 3, 2, 5), dtype, device, layout="sliced")
    grad = make_x((2, 4, 3, 2, 5), dtype, device, seed=3)
    mixing = ops.fourier_mode_mixing(make_weight((2, 3, 3), device=device), 4, 2).to(opmath)
    kernel = circulant(ops.fourier_tap_synthesis(make_weight((3, 3), device=device), 4, 3)).to(opmath)
    tol = REFERENCE_TOL[dtype]
    for name, weight, extra in (("fourier_spectral_conv", mixing, (2,)), ("fourier_channel_conv", kernel, ())):
        for residual, slope in ((True, 0.01), (False, None)):
            y, mask = getattr(torch.ops.adjointdeis, name)(x, weight, *extra, residual, slope, True)
            want_y, want_mask = getattr(reference, name)(x, weight, *extra, residual, slope, True)
            assert_close(y, want_y, **tol)
            assert mask.shape == want_mask.shape
            args = (grad, x, weight, want_mask, *extra, residual, slope, [True, True])
            got = getattr(torch.ops.adjointdeis, name + "_backward")(*args)
            want = getattr(reference, name + "_backward")(*args)
            assert_close(got[0], want[0], **tol)
            assert_close(got[1], want[1], rtol=tol["rtol"], atol=tol["atol"] * want[1].abs().max().item())
    # The mixing is block-diagonal over bins: blocks between different bins are ignored (zero gradient).
    mask = reference.bin_block_mask(4, 2, 3, 3, opmath, device)
    noisy = mixing + (1 - mask) * 5.0
    lib = torch.ops.adjointdeis
    assert torch.equal(lib.fourier_spectral_conv(x, noisy, 2, True, 0.01, False)[0],
                       lib.fourier_spectral_conv(x, mixing, 2, True, 0.01, False)[0])
    y, m = lib.fourier_spectral_conv(x, noisy, 2, True, 0.01, True)
    grad_mixing = lib.fourier_spectral_conv_backward(grad, x, noisy, m, 2, True, 0.01, [False, True])[1]
    assert torch.all(grad_mixing[mask == 0] == 0) and grad_mixing.abs().sum() > 0


def weight_parts(shape, device="cpu", dtype=torch.float32, layout="contiguous", seed=1):
    """(K, C_in, C_out, 2) real and imaginary parts of a weight; "strided": a view with no unit stride."""
    parts = torch.view_as_real(make_weight(shape, seed, device, torch.complex128)).to(dtype)
    if layout == "strided":
        big = torch.zeros(shape[0], shape[2], shape[1], 3, dtype=dtype, device=device)
        big[..., :2] = parts.transpose(1, 2)
        parts = big.transpose(1, 2)[..., :2]
        assert parts.stride(-1) == 1 and parts.stride(2) != 2 and not parts.is_contiguous()
    return parts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("n_times,modes,c_in,c_out,residual,slope", [
    (4, 2, 3, 3, True, 0.01), (5, 3, 3, 2, False, 0.2), (8, 5, 2, 4, False, None), (2, 2, 3, 3, True, 0.01)])
def test_mode_conv_matches_its_twin(device, dtype, layout, n_times, modes, c_in, c_out, residual, slope):
    """fourier_mode_conv (the GEMM blocks built from the weight) and its backward against reference.py, with
    bins beyond `modes` in the weight (not read; zero gradient), C_in != C_out, DC and Nyquist bins."""
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_x((2, n_times, c_in, 2, 5), dtype, device, layout="sliced")
    grad = make_x((2, n_times, c_out, 2, 5), dtype, device, seed=3)
    weight = weight_parts((modes + 1, c_in, c_out), device, opmath, layout)
    tol = REFERENCE_TOL[dtype]
    lib = torch.ops.adjointdeis
    y, mask = lib.fourier_mode_conv(x, weight, modes, residual, slope, True)
    want_y, want_mask = reference.fourier_mode_conv(x, weight, modes, residual, slope, True)
    assert y.dtype == dtype and y.shape == want_y.shape and mask.shape == want_mask.shape
    assert_close(y, want_y, **tol)
    for output_mask in ([True, True], [True, False], [False, True]):
        args = (grad, x, weight, want_mask, modes, residual, slope, output_mask)
        got, want = lib.fourier_mode_conv_backward(*args), reference.fourier_mode_conv_backward(*args)
        if output_mask[0]:
            assert_close(got[0], want[0], **tol)
        if output_mask[1]:
            assert got[1].shape == weight.shape and got[1].dtype == opmath
            assert_close(got[1], want[1], rtol=tol["rtol"], atol=tol["atol"] * want[1].abs().max().item())
            assert torch.all(got[1][modes:] == 0) and torch.all(got[1][0, ..., 1] == 0)
        assert [g is not None for g in got] == output_mask
    # The same layer as fourier_spectral_conv given M: the same GEMM operands, rounded the same way.
    mixing = ops.fourier_mode_mixing(torch.view_as_complex(weight.contiguous()), n_times, modes)
    y_m, _ = lib.fourier_spectral_conv(x, mixing, modes, residual, slope, False)
    assert_close(y, y_m, rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("residual,slope", [(True, 0.01), (False, 0.2), (False, None)])
def test_mode_conv_gradcheck(residual, slope):
    x = make_x((2, 5, 3, 2, 1)).requires_grad_()
    weight = weight_parts((4, 3, 3 if residual else 2), dtype=torch.float64, layout="strided").requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: ops.fourier_mode_conv(x, w, 3, residual, slope, True)[0], (x, weight))


def test_mode_conv_concurrent_calls_keep_their_scratch_apart():
    """Each thread has its own kept scratch (KeptScratch): concurrent calls of different shapes give what a call
    alone gives."""
    import concurrent.futures

    cases = [(make_x((b, 4, c, 4, 4), torch.float32, seed=b), weight_parts((2, c, c)), make_x((b, 4, c, 4, 4),
              torch.float32, seed=b + 1)) for b, c in ((3, 8), (5, 16), (2, 24), (4, 8))]

    def run(case):
        x, w, g = case
        y, mask = torch.ops.adjointdeis.fourier_mode_conv(x, w, 2, True, 0.01, True)
        return (y, *torch.ops.adjointdeis.fourier_mode_conv_backward(g, x, w, mask, 2, True, 0.01, [True, True]))

    alone = [run(case) for case in cases]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(run, cases * 4), alone * 4):
                for g, w in zip(got, want):
                    assert torch.equal(g, w)


def use_temporal_mix(monkeypatch, kernel):
    """Forces the CPU temporal mix's kernel (ADJOINTDEIS_TEMPORAL_MIX, read at every call); skips where this CPU
    lacks the ISA, which the op reports by raising."""
    if kernel == "auto":
        monkeypatch.delenv("ADJOINTDEIS_TEMPORAL_MIX", raising=False)
        return
    monkeypatch.setenv("ADJOINTDEIS_TEMPORAL_MIX", kernel)
    try:
        ops.fourier_temporal_conv(torch.ones(1, 2, 1, 1, 1), torch.ones(1, 1, 1, dtype=torch.complex64), 1)
    except RuntimeError as e:
        if "this CPU lacks" not in str(e):
            raise
        pytest.skip(str(e))


@pytest.mark.parametrize("kernel", ["auto", "avx512", "avx2", "tiles"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pixels", [(2, 4), (4, 4), (7, 9), (8, 8), (5, 13), (10, 13)])
@pytest.mark.parametrize("n_times, modes", [(5, 3), (4, 2)])
def test_temporal_mix_paths_at_vector_block_edges(monkeypatch, kernel, dtype, pixels, n_times, modes):
    """H * W = 8, 16, 63, 64, 65, 130: one AVX2 vector, one AVX-512 vector, a 64-pixel block short of one,
    exactly one, one over, and two blocks with a tail (AVX2's blocks are 16 pixels). Contiguous pixels take the
    chosen kernel (the CPU's widest SIMD loop unless forced), a sliced copy of the same values the tile path;
    both match the twins, forward (with the mask) and backward (the masked source of the epilogue's adjoint),
    with and without residual and activation. T = 5 with three bins takes the SIMD loop with run-time row
    counts (5 into 5), T = 4 with two its unrolled loops (4 into 3 coordinates and back)."""
    use_temporal_mix(monkeypatch, kernel)
    h, w = pixels
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    mixing = ops.fourier_mode_mixing(make_weight((modes, 5, 5)), n_times, modes).to(opmath)
    kernel = circulant(ops.fourier_tap_synthesis(make_weight((modes, 5)), n_times, modes)).to(opmath)
    tol = REFERENCE_TOL[dtype]
    lib = torch.ops.adjointdeis
    for layout in ("contiguous", "sliced"):
        x = make_x((2, n_times, 5, h, w), dtype, layout=layout)
        grad = make_x((2, n_times, 5, h, w), dtype, seed=3, layout=layout)
        for name, weight, extra in (("fourier_spectral_conv", mixing, (modes,)), ("fourier_channel_conv", kernel, ())):
            for residual, slope in ((True, 0.01), (False, 0.3), (True, None)):
                y, mask = getattr(lib, name)(x, weight, *extra, residual, slope, True)
                want_y, want_mask = getattr(reference, name)(x, weight, *extra, residual, slope, True)
                assert_close(y, want_y, **tol)
                if slope is not None:  # where rounding leaves the pre-activation exactly at the kink, the two may differ
                    assert (mask != want_mask).float().mean() < 1e-2
                args = (grad, x, weight, want_mask, *extra, residual, slope, [True, True])
                got = getattr(lib, name + "_backward")(*args)
                want = getattr(reference, name + "_backward")(*args)
                assert_close(got[0], want[0], **tol)
                assert_close(got[1], want[1], rtol=tol["rtol"], atol=tol["atol"] * want[1].abs().max().item())


@pytest.mark.parametrize("value", ["avx", "AVX2", " tiles"])
def test_temporal_mix_choice_that_cannot_be_honoured_raises_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("ADJOINTDEIS_TEMPORAL_MIX", value)
    with pytest.raises(RuntimeError, match="ADJOINTDEIS_TEMPORAL_MIX must be avx512, avx2, tiles or unset"):
        ops.fourier_temporal_conv(torch.ones(1, 2, 1, 1, 1), torch.ones(1, 1, 1, dtype=torch.complex64), 1)


@pytest.mark.parametrize("n_times", [2, 3, 4, 7, 8, 16, 32])
def test_mode_mixing_factors_the_block_circulant_kernel(n_times):
    """A = (E (x) I_Cout) M (P (x) I_Cin), and the op's M equals the reference's."""
    for modes in sorted({1, 2, n_times // 2 + 1}):
        weight = make_weight((modes + 1, 3, 2), dtype=torch.complex128)
        mixing = ops.fourier_mode_mixing(weight, n_times, modes)
        rank = ops.spectral_rank(n_times, modes)
        assert mixing.shape == (rank * 2, rank * 3) and mixing.dtype == torch.float64
        assert_close(mixing, reference.fourier_mode_mixing(weight, n_times, modes), rtol=1e-14, atol=1e-14)
        proj, expand = reference.spectral_basis(n_times, modes)
        factored = torch.einsum("tj,joli,ls->tosi", expand, mixing.view(rank, 2, rank, 3), proj)
        factored = factored.reshape(n_times * 2, n_times * 3)
        assert_close(factored, reference.fourier_kernel_synthesis(weight, n_times, modes), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual,slope", [(True, 0.01), (False, None)])
def test_opcheck(device, residual, slope):
    """Schema, fake (meta) kernel, autograd registration and dispatch of both ops."""
    x = make_x((2, 4, 3, 2, 3), torch.float32, device, layout="sliced").requires_grad_()
    mixing = ops.fourier_mode_mixing(make_weight((2, 3, 3), device=device), 4, 2).detach().requires_grad_()
    kernel = circulant(ops.fourier_tap_synthesis(make_weight((3, 3), device=device), 4, 3)).detach().requires_grad_()
    torch.library.opcheck(torch.ops.adjointdeis.fourier_spectral_conv.default, (x, mixing, 2, residual, slope, True))
    torch.library.opcheck(torch.ops.adjointdeis.fourier_channel_conv.default, (x, kernel, residual, slope, True))
    weight = weight_parts((3, 3, 3), device, layout="strided").requires_grad_()
    torch.library.opcheck(torch.ops.adjointdeis.fourier_mode_conv.default, (x, weight, 2, residual, slope, True))


@pytest.mark.parametrize("channelwise", [False, True])
def test_module_compiles_fullgraph_with_dynamic_shapes(channelwise):
    """dynamic=True makes the layer's float slope a SymFloat, which the argument check's math.isfinite could not take
    (a fullgraph error); batch sizes 1 to 3 through one compiled module, against the eager layer."""
    torch._dynamo.reset()
    layer = ad.FourierTemporalConv(3, 3, n_times=4, modes=2, channelwise=channelwise)
    with torch.no_grad():
        layer.weight.normal_()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for batch in (1, 2, 3):
        x = make_x((batch, 4, 3, 2, 3), torch.float32, seed=batch)
        with torch.no_grad():
            assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channelwise", [False, True])
def test_module_compiles_fullgraph(device, channelwise):
    torch._dynamo.reset()
    layer = ad.FourierTemporalConv(4, 4, n_times=4, modes=2, channelwise=channelwise).to(device)
    with torch.no_grad():
        layer.weight.normal_()
    x = make_x((2, 4, 4, 3, 3), torch.float32, device).requires_grad_()
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    assert_close(y, layer(x))
    (y * y).sum().backward()
    got_x, got_w = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None
    (layer(x) ** 2).sum().backward()
    assert_close(got_x, x.grad)
    assert_close(got_w, layer.weight.grad)


def test_module_weight_layout_and_init(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = ad.FourierTemporalConv(32, 32, n_times=4, modes=2)
    assert layer.weight.shape == (2, 32, 32, 2) and layer.weight.dtype == torch.float32
    assert ad.FourierTemporalConv(8, 8, 4, 2, channelwise=True).weight.shape == (2, 8, 2)
    x = make_x((2, 4, 32, 4, 4), torch.float32)
    # Initialised close to the identity of the residual block.
    assert (layer(x) - x).norm() < 0.05 * x.norm()
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    other = ad.FourierTemporalConv(32, 32, n_times=4, modes=2)
    other.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(other(x), layer(x))
    # The module is the op with the complex view of its weight.
    weight = torch.view_as_complex(layer.weight.detach())
    assert torch.equal(layer(x), ops.fourier_temporal_conv(x, weight, 2))
    plain = ad.FourierTemporalConv(32, 16, n_times=4, modes=3, residual=False, activation=None)
    want = reference.fourier_temporal_conv(x.double(), plain.complex_weight(torch.complex128), 3, False, None)
    assert_close(plain(x).double(), want, **REFERENCE_TOL[torch.float32])
    assert plain.double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_times,modes", [(4, 2), (8, 5)])
def test_half_precision_layer_rounds_like_a_half_precision_torch_layer(device, dtype, n_times, modes):
    """At a DSNO-sized width (where bfloat16 activations may take bfloat16 GEMMs: AVX-512-BF16 or AMX CPUs,
    CUDA tensor cores) the output is within the dtype's rounding of the float64 layer, and the gradients are no
    further from float64 than a plain PyTorch layer ``x + leaky_relu(x @ W.T)`` in that dtype is from its own."""
    g = torch.Generator().manual_seed(0)
    c, shape = 64, (4, n_times, 64, 8, 8)
    x = torch.randn(shape, generator=g).to(device, dtype)
    weight = (torch.randn(modes, c, c, generator=g, dtype=torch.complex64) / c).to(device)
    grad = torch.randn(shape, generator=g).to(device, dtype)
    xs, ws = x.detach().requires_grad_(), weight.clone().requires_grad_()
    y = ops.fourier_temporal_conv(xs, ws, modes)
    y.backward(grad)
    x64 = x.double().cpu().requires_grad_()
    w64 = weight.to(torch.complex128).cpu().requires_grad_()
    want = reference.fourier_temporal_conv(x64, w64, modes)
    want.backward(grad.double().cpu())
    rel = lambda a, b: ((a.cpu().to(b.dtype) - b).norm() / b.norm()).item()
    assert ((y.double().cpu() - want).abs().max() / want.abs().max()).item() < REFERENCE_TOL[dtype]["rtol"]

    rows = x.transpose(1, 2).reshape(-1, c).cpu()  # the same values through a plain layer of the same width
    dense = torch.randn(c, c, generator=g) / c ** 0.5
    plain = lambda x, w: x + torch.nn.functional.leaky_relu(x @ w.T, 0.01)
    w_low, w_high = dense.to(dtype).requires_grad_(), dense.double().requires_grad_()
    plain(rows, w_low).backward(grad.transpose(1, 2).reshape(-1, c).cpu())
    plain(rows.double(), w_high).backward(grad.transpose(1, 2).reshape(-1, c).cpu().double())
    plain_error = rel(w_low.grad, w_high.grad)
    assert rel(ws.grad, w64.grad) < 2 * plain_error + 1e-3
    assert rel(xs.grad, x64.grad) < 2 * plain_error + 1e-3


def test_module_runs_in_bfloat16():
    layer = ad.FourierTemporalConv(8, 8, n_times=4, modes=2).to(torch.bfloat16)
    x = make_x((2, 4, 8, 4, 4), torch.bfloat16)
    y = layer(x)
    want = reference.fourier_temporal_conv(x.double(), layer.complex_weight(torch.complex128), 2)
    assert y.dtype == torch.bfloat16
    assert_close(y.double(), want, **REFERENCE_TOL[torch.bfloat16])


def bad_case(**change):
    case = dict(x=torch.zeros(2, 4, 3, 2, 2), weight=torch.zeros(2, 3, 3, dtype=torch.complex64), modes=2,
                residual=True, negative_slope=0.01)
    case.update(change)
    return case


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(x=torch.zeros(2, 4, 3, 4)), ValueError, r"x must have shape \(B, T, C, H, W\)"),
        (dict(x=torch.zeros(2, 4, 3, 2, 2, dtype=torch.int64)), TypeError, "x must be float64"),
        (dict(x=torch.zeros(2, 33, 3, 2, 2), modes=2), ValueError, r"T\) must be in \[2, 32\]"),
        (dict(x=torch.zeros(2, 1, 3, 2, 2), modes=1), ValueError, r"T\) must be in \[2, 32\]"),
        (dict(weight=torch.zeros(2, 3, 3)), TypeError, "weight must be complex64 or complex128"),
        (dict(weight=torch.zeros(2, 3, 3, dtype=torch.complex128)), TypeError, "complex128 weight needs float64 x"),
        (dict(weight=torch.zeros(2, 3, 3, dtype=torch.complex64, device="meta")), ValueError, "weight is on meta"),
        (dict(weight=torch.zeros(2, 3, dtype=torch.complex64)), ValueError, r"weight must have shape \(K, C_in, C_out\)"),
        (dict(weight=torch.zeros(2, 5, 3, dtype=torch.complex64)), ValueError, "5 input channels but x has C = 3"),
        (dict(modes=0), ValueError, r"modes must be in \[1, T // 2 \+ 1\] = \[1, 3\]"),
        (dict(modes=4), ValueError, r"modes must be in \[1, T // 2 \+ 1\] = \[1, 3\]"),
        (dict(modes=3), ValueError, "weight holds only 2 bins"),
        (dict(modes=2.0), TypeError, "modes must be an int"),
        (dict(weight=torch.zeros(2, 3, 5, dtype=torch.complex64)), ValueError, "residual=True needs C_out == C_in"),
        (dict(negative_slope="0.1"), TypeError, "negative_slope must be a finite number"),
    ],
)
@pytest.mark.parametrize("impl", [ops.fourier_temporal_conv, reference.fourier_temporal_conv])
def test_bad_input_names_the_argument(impl, change, error, message):
    case = bad_case(**change)
    with pytest.raises(error, match=message):
        impl(case["x"], case["weight"], case["modes"], case["residual"], case["negative_slope"])


@pytest.mark.parametrize("impl", [ops.fourier_temporal_conv_channelwise, reference.fourier_temporal_conv_channelwise])
def test_bad_input_channelwise(impl):
    x = torch.zeros(2, 4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, C\)"):
        impl(x, torch.zeros(2, 3, 3, dtype=torch.complex64), 2)
    with pytest.raises(ValueError, match="4 input channels but x has C = 3"):
        impl(x, torch.zeros(2, 4, dtype=torch.complex64), 2)


def test_bad_input_compiled_ops_name_the_argument():
    """The C++ checks behind the Python ones (a caller of torch.ops.adjointdeis directly)."""
    lib = torch.ops.adjointdeis
    x = torch.zeros(2, 4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="mixing must be Float"):
        lib.fourier_spectral_conv(x, torch.zeros(9, 9, dtype=torch.float64), 2, True, 0.01, False)
    with pytest.raises(RuntimeError, match=r"mixing must have shape \(r \* C_out, r \* C_in\) with r = 3"):
        lib.fourier_spectral_conv(x, torch.zeros(9, 8), 2, True, 0.01, False)
    with pytest.raises(RuntimeError, match="residual needs C_out == C_in"):
        lib.fourier_spectral_conv(x, torch.zeros(6, 9), 2, True, 0.01, False)
    with pytest.raises(RuntimeError, match="modes must be in"):
        lib.fourier_spectral_conv(x, torch.zeros(9, 9), 4, True, 0.01, False)
    with pytest.raises(RuntimeError, match=r"kernel must have shape \(T, T, C\) = \(4, 4, 3\)"):
        lib.fourier_channel_conv(x, torch.zeros(4, 3), True, 0.01, False)
    with pytest.raises(RuntimeError, match="kernel must be Float for x of dtype Float, got Double"):
        lib.fourier_channel_conv(x, torch.zeros(4, 4, 3, dtype=torch.float64), True, 0.01, False)
    with pytest.raises(ValueError, match="modes must be in"):
        ops.fourier_mode_mixing(torch.zeros(5, 3, 3, dtype=torch.complex64), 4, 4)
    with pytest.raises(ValueError, match="n_times must be an integer in"):
        ops.fourier_tap_synthesis(torch.zeros(5, 3, dtype=torch.complex64), 33, 2)
    with pytest.raises(RuntimeError, match="weight must be Float for x of dtype Float, got Double"):
        lib.fourier_mode_conv(x, torch.zeros(2, 3, 3, 2, dtype=torch.float64), 2, True, 0.01, False)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(K, C_in, C_out, 2\) with K >= modes = 2"):
        lib.fourier_mode_conv(x, torch.zeros(1, 3, 3, 2), 2, True, 0.01, False)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(K, C_in, C_out, 2\)"):
        lib.fourier_mode_conv_backward(x, x, torch.zeros(2, 3, 3), x, 2, True, None, [True, True])
    with pytest.raises(RuntimeError, match="residual needs C_out == C_in"):
        lib.fourier_mode_conv(x, torch.zeros(2, 3, 4, 2), 2, True, 0.01, False)
    with pytest.raises(RuntimeError, match="modes must be in"):
        lib.fourier_mode_conv(x, torch.zeros(5, 3, 3, 2), 4, True, 0.01, False)
    for bad, message in ((torch.zeros(2, 3, 3, 2, dtype=torch.float64), "weight must be torch.float32"),
                         (torch.zeros(2, 3, 3), r"weight must have shape \(K, C_in, C_out, 2\)"),
                         (torch.zeros(1, 3, 3, 2), "K >= modes = 2"), ("w", "weight must be a tensor")):
        with pytest.raises((TypeError, ValueError), match=message):
            ops.fourier_mode_conv(x, bad, 2, True, 0.01, False)
    with pytest.raises(RuntimeError, match="mask must be a contiguous tensor"):
        lib.fourier_spectral_conv_backward(x, x, torch.zeros(9, 9), torch.zeros(0, dtype=torch.bool), 2, True,
                                           0.01, [True, True])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(in_channels=4, out_channels=4, n_times=1, modes=1), r"n_times must be an integer in \[2, 32\]"),
        (dict(in_channels=4, out_channels=4, n_times=4, modes=4), r"modes must be an integer in \[1, 3\]"),
        (dict(in_channels=4, out_channels=5, n_times=4, modes=2), "residual=True needs in_channels == out_channels"),
        (dict(in_channels=4, out_channels=5, n_times=4, modes=2, residual=False, channelwise=True),
         "channelwise=True needs in_channels == out_channels"),
        (dict(in_channels=4, out_channels=4, n_times=4, modes=2, activation="gelu"), "activation must be one of"),
    ],
)
def test_module_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ad.FourierTemporalConv(**kwargs)


def test_module_checks_its_input():
    layer = ad.FourierTemporalConv(3, 3, n_times=4, modes=2)
    for shape in [(2, 5, 3, 2, 2), (2, 4, 2, 2, 2), (4, 3, 2, 2)]:
        with pytest.raises(ValueError, match=r"x must have shape \(B, n_times=4, in_channels=3, H, W\)"):
            layer(torch.zeros(shape))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channelwise", [False, True])
def test_cuda_forward_backward_match_float64_reference(dtype, channelwise):
    """Large enough for several blocks per row; misaligned (sliced) and permuted inputs."""
    for n_times, modes, layout in ((4, 2, "contiguous"), (8, 5, "sliced"), (16, 3, "permuted")):
        x = make_x((3, n_times, 16, 9, 7), dtype, "cuda", layout=layout)
        shape = (modes, 16) if channelwise else (modes, 16, 16)
        weight = make_weight(shape, device="cuda", dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)
        op = ops.fourier_temporal_conv_channelwise if channelwise else ops.fourier_temporal_conv
        ref = reference.fourier_temporal_conv_channelwise if channelwise else reference.fourier_temporal_conv
        xg, wg = x.detach().requires_grad_(), weight.detach().requires_grad_()
        y = op(xg, wg, modes)
        cot = make_x(tuple(y.shape), torch.float64, seed=9)
        (y * cot.to(device="cuda", dtype=dtype)).sum().backward()
        xr, wr = x.cpu().double().requires_grad_(), weight.cpu().to(torch.complex128).requires_grad_()
        want = ref(xr, wr, modes)
        (want * cot).sum().backward()
        tol = REFERENCE_TOL[dtype]
        assert_close(y.detach().cpu().double(), want.detach(), **tol)
        if dtype in (torch.float16, torch.bfloat16) and not channelwise:
            # Half-precision GEMMs (tensor cores) round the pre-activation, so a few activation-mask entries differ
            # from float64's and their x gradients with them (as on the CPU: test_temporal_mix_paths_at_vector_block_edges)
            close = torch.isclose(xg.grad.cpu().double(), xr.grad, **tol)
            assert (~close).float().mean() < 1e-2
        else:
            assert_close(xg.grad.cpu().double(), xr.grad, **tol)
        scale = wr.grad.abs().max()
        assert_close(wg.grad.cpu().to(torch.complex128) / scale, wr.grad / scale, **tol)


@pytest.mark.parametrize("channelwise", [False, True])
@pytest.mark.parametrize("residual,slope", [(True, 0.01), (False, None)])
def test_torch_func_transforms_match_the_fft_layer(channelwise, residual, slope):
    """Forward mode (torch.func.jvp, forward_ad), torch.func.grad and vmap against the literal rfft / irfft layer
    under the same transform: the fused ops' autograd is reverse mode only, so these run their twins (before,
    forward mode gave zero tangents silently and torch.func.grad failed inside torch)."""
    n_times, modes, c = 6, 3, 3
    x = make_x((2, n_times, c, 2, 3))
    weight = make_weight((modes, c) if channelwise else (modes, c, c), dtype=torch.complex128)
    op = ops.fourier_temporal_conv_channelwise if channelwise else ops.fourier_temporal_conv
    ref = reference.fourier_temporal_conv_channelwise if channelwise else reference.fourier_temporal_conv
    dx, dw = make_x(x.shape, seed=5), make_weight(weight.shape, seed=6, dtype=torch.complex128)
    tol = dict(rtol=1e-10, atol=1e-10)
    for args, tangents in (((x, weight), (dx, dw)), ((x, weight), (dx, torch.zeros_like(dw)))):
        got = torch.func.jvp(lambda x, w: op(x, w, modes, residual, slope), args, tangents)[1]
        want = torch.func.jvp(lambda x, w: ref(x, w, modes, residual, slope), args, tangents)[1]
        assert want.abs().max() > 0.1
        assert_close(got, want, **tol)
    with torch.autograd.forward_ad.dual_level():
        y = op(torch.autograd.forward_ad.make_dual(x, dx), weight, modes, residual, slope)
        tangent = torch.autograd.forward_ad.unpack_dual(y).tangent
    assert tangent is not None
    assert_close(tangent, torch.func.jvp(lambda x: ref(x, weight, modes, residual, slope), (x,), (dx,))[1], **tol)
    loss = lambda f: lambda x: (f(x, weight, modes, residual, slope) ** 2).sum()
    assert_close(torch.func.grad(loss(op))(x), torch.func.grad(loss(ref))(x), **tol)
    batched = torch.stack([x, dx])
    assert_close(torch.func.vmap(lambda x: op(x, weight, modes, residual, slope))(batched),
                 torch.stack([ref(t, weight, modes, residual, slope) for t in batched]), **tol)


@pytest.mark.parametrize("shape", [(0, 4, 3, 2, 2), (2, 4, 3, 0, 2)])
def test_empty_batch_or_image_through_the_twins(shape):
    """The twins take an empty x as the ops do (the FFT twins failed in MKL's FFT, the spectral twin in an
    ambiguous reshape, which torch.func transforms and forward-mode AD now run)."""
    x = make_x(shape, torch.float32)
    weight, channel_weight = make_weight((3, 3, 2)), make_weight((3, 3))
    for op, ref, w in ((ops.fourier_temporal_conv, reference.fourier_temporal_conv, weight),
                       (ops.fourier_temporal_conv_channelwise, reference.fourier_temporal_conv_channelwise,
                        channel_weight)):
        for residual in ([False] if w is weight else [True, False]):
            want = op(x, w, 2, residual, 0.01)
            assert want.shape == (*shape[:2], w.shape[-1] if w is weight else 3, *shape[3:])
            got = ref(x, w, 2, residual, 0.01)
            assert got.shape == want.shape and got.dtype == want.dtype
            tangent = torch.func.jvp(lambda x: op(x, w, 2, residual, 0.01), (x,), (x,))[1]
            assert tangent.shape == want.shape
    parts = torch.view_as_real(weight).contiguous()
    for got, want in zip(reference.fourier_mode_conv(x, parts, 2, False, 0.01, True),
                         ops.fourier_mode_conv(x, parts, 2, False, 0.01, True)):
        assert got.shape == want.shape and got.dtype == want.dtype
