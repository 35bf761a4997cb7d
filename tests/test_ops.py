"""The fused step op against its pure-PyTorch reference: dtypes, shapes, layouts, autograd, compile."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.testing import assert_close

from adjointdeis import ops, reference
from conftest import DEVICES, DTYPES, KERNEL_TOL

SHAPES = [(), (0,), (1,), (7,), (3, 5, 7), (2, 4, 17, 33)]


def make_case(shape, dtype, device, num_history, noisy, seed=0):
    g = torch.Generator().manual_seed(seed)
    def rand(*s):
        return torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    x, out = rand(*shape), rand(*shape)
    history = [rand(*shape) for _ in range(num_history)]
    coeffs = torch.randn(7, generator=g, dtype=torch.float64).to(device)
    noise = rand(*shape) if noisy else None
    return x, out, history, coeffs, noise


def assert_matches_reference(x, out, history, coeffs, noise):
    got = ops.multistep_step(x, out, history, coeffs, noise)
    want = reference.multistep_step(x, out, history, coeffs, noise)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        assert_close(g, w, **KERNEL_TOL[x.dtype])
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_history,noisy", [(0, False), (1, False), (2, False), (1, True), (2, True)])
def test_matches_reference(device, dtype, shape, num_history, noisy):
    assert_matches_reference(*make_case(shape, dtype, device, num_history, noisy))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_formula(dtype):
    x, out, (m1, m2), coeffs, noise = make_case((5, 9), dtype, "cpu", 2, True)
    a, b0, b1, b2, c, p, q = coeffs.tolist()
    x_next, m0 = ops.multistep_step(x, out, [m1, m2], coeffs, noise)
    d = [t.double() for t in (x, out, m1, m2, noise)]
    want_m0 = p * d[0] + q * d[1]
    want_x = a * d[0] + b0 * want_m0 + b1 * d[2] + b2 * d[3] + c * d[4]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(m0.double(), want_m0, **tol)
    assert_close(x_next.double(), want_x, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(device, dtype):
    x, out, history, coeffs, noise = make_case((6, 10, 8), dtype, device, 2, True)
    views = [x.transpose(0, 2), out.transpose(0, 2), noise.transpose(0, 2)]
    hist = [h.transpose(0, 2) for h in history]
    assert not views[0].is_contiguous()
    assert_matches_reference(views[0], views[1], hist, coeffs, views[2])
    # Strided slices with an odd offset defeat vector alignment.
    s = slice(1, None, 2)
    assert_matches_reference(x[s], out[s], [h[s] for h in history], coeffs, noise[s])
    assert_matches_reference(x[:, 1:], out[:, 1:], [h[:, 1:] for h in history], coeffs, noise[:, 1:])


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_inputs(device):
    x, out, history, coeffs, noise = make_case((3, 4, 5), torch.float32, device, 2, True)
    x_next, m0 = assert_matches_reference(x, out[:1], [history[0][0, 0], history[1][:, :1]], coeffs,
                                          noise[0].expand(3, 4, 5))
    assert x_next.shape == (3, 4, 5)
    # x itself may broadcast against a larger model output.
    x_next, _ = assert_matches_reference(x[0], out, [], coeffs, None)
    assert x_next.shape == (3, 4, 5)


def test_outputs_are_fresh_tensors():
    x, out, history, coeffs, noise = make_case((4, 4), torch.float32, "cpu", 2, True)
    inputs = [x, out, *history, noise]
    x_next, m0 = ops.multistep_step(x, out, history, coeffs, noise)
    for result in (x_next, m0):
        assert all(result.data_ptr() != t.data_ptr() for t in inputs)
    assert x_next.data_ptr() != m0.data_ptr()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    dtype=st.sampled_from(DTYPES),
    num_history=st.integers(0, 2),
    noisy=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    transpose=st.booleans(),
)
def test_property_matches_reference(shape, dtype, num_history, noisy, seed, transpose):
    x, out, history, coeffs, noise = make_case(tuple(shape), dtype, "cpu", num_history, noisy, seed)
    if transpose and len(shape) >= 2:
        x, out = x.transpose(0, -1), out.transpose(0, -1)
        history = [h.transpose(0, -1) for h in history]
        noise = None if noise is None else noise.transpose(0, -1)
    assert_matches_reference(x, out, history, coeffs, noise)


@pytest.mark.parametrize("num_history,noisy", [(0, False), (1, True), (2, True)])
def test_gradcheck(num_history, noisy):
    x, out, history, coeffs, noise = make_case((3, 4), torch.float64, "cpu", num_history, noisy)
    out = out[:1]  # broadcast input: its gradient is summed
    tensors = [t.requires_grad_() for t in (x, out, *history)] + ([noise.requires_grad_()] if noisy else [])

    def step(x, out, *rest):
        hist, nz = (rest[:-1], rest[-1]) if noisy else (rest, None)
        return ops.multistep_step(x, out, list(hist), coeffs, nz)

    assert torch.autograd.gradcheck(step, tensors)
    assert torch.autograd.gradgradcheck(step, tensors)


def test_grad_matches_reference_autograd():
    x, out, history, coeffs, noise = make_case((5, 6), torch.float64, "cpu", 2, True)
    ins = [t.clone().requires_grad_() for t in (x, out, *history, noise)]
    ref_ins = [t.clone().requires_grad_() for t in (x, out, *history, noise)]
    w1, w2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    a, b = ops.multistep_step(ins[0], ins[1], ins[2:4], coeffs, ins[4])
    ((a * w1).sum() + (b * w2).sum()).backward()
    a, b = reference.multistep_step(ref_ins[0], ref_ins[1], ref_ins[2:4], coeffs, ref_ins[4])
    ((a * w1).sum() + (b * w2).sum()).backward()
    for got, want in zip(ins, ref_ins):
        assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_history,noisy", [(0, False), (2, True)])
def test_opcheck(device, num_history, noisy):
    x, out, history, coeffs, noise = make_case((2, 3, 4), torch.float32, device, num_history, noisy)
    for t in (x, out, *history):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.adjointdeis.multistep_step.default, (x, out, history, coeffs, noise))


def test_compile_fullgraph():
    x, out, history, coeffs, noise = make_case((4, 8), torch.float32, "cpu", 2, True)

    def two_steps(x, out, m1, m2, coeffs, noise):
        x1, m0 = ops.multistep_step(x, out, [m1, m2], coeffs, noise)
        return ops.multistep_step(x1, out * 0.5, [m0, m1], coeffs, None)

    compiled = torch.compile(two_steps, fullgraph=True)
    for got, want in zip(compiled(x, out, *history, coeffs, noise), two_steps(x, out, *history, coeffs, noise)):
        assert_close(got, want)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c.update(out=c["out"].double()), "out has dtype"),
        (lambda c: c.update(out=torch.zeros(2, 5)), "out with shape"),
        (lambda c: c.update(history=[torch.zeros(3, 4)] * 3), "history holds at most 2"),
        (lambda c: c.update(history=[torch.zeros(3, 4, dtype=torch.float16)]), "history[0] has dtype"),
        (lambda c: c.update(noise=torch.zeros(4, 4)), "noise with shape"),
        (lambda c: c.update(coeffs=c["coeffs"].float()), "coeffs must be float64"),
        (lambda c: c.update(coeffs=torch.zeros(6, dtype=torch.float64)), "coeffs must have shape"),
        (lambda c: c.update(x=c["x"].long()), "x must be float64"),
    ],
)
@pytest.mark.parametrize("impl", [ops.multistep_step, reference.multistep_step])
def test_bad_input_names_the_argument(impl, mutate, message):
    case = dict(x=torch.zeros(3, 4), out=torch.zeros(3, 4), history=[], noise=None,
                coeffs=torch.zeros(7, dtype=torch.float64))
    mutate(case)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message.replace("[", r"\[")):
        impl(case["x"], case["out"], case["history"], case["coeffs"], case["noise"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_history,noisy", [(0, False), (1, False), (2, True)])
def test_cuda_matches_cpu(dtype, num_history, noisy):
    for shape in [(1,), (5,), (4, 4, 64, 64), (3, 7, 11)]:
        cpu = make_case(shape, dtype, "cpu", num_history, noisy)
        cuda = [t.cuda() if isinstance(t, torch.Tensor) else ([h.cuda() for h in t] if isinstance(t, list) else t)
                for t in cpu]
        for got, want in zip(ops.multistep_step(*cuda), ops.multistep_step(*cpu)):
            assert_close(got.cpu(), want, **KERNEL_TOL[dtype])


@pytest.mark.cuda
def test_cuda_misaligned_and_large():
    x, out, history, coeffs, noise = make_case(((1 << 20) + 3,), torch.float32, "cuda", 2, True)
    assert_matches_reference(x[1:], out[1:], [h[1:] for h in history], coeffs, noise[1:])
    assert_matches_reference(x, out, history, coeffs, noise)
