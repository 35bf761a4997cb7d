"""The fused consistency-trajectory step against its pure-PyTorch reference: dtypes, shapes, layouts, autograd,
compile, bad input."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.testing import assert_close

from adjointdeis import ops, reference
from conftest import DEVICES, DTYPES, KERNEL_TOL

SHAPES = [(), (0,), (1,), (7,), (3, 5, 7), (2, 4, 17, 33)]


def make_case(shape, dtype, device, noisy, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    x, out = rand(*shape), rand(*shape)
    coeffs = torch.randn(3, generator=g, dtype=torch.float64).to(device)
    noise = rand(*shape) if noisy else None
    return x, out, coeffs, noise


def assert_matches_reference(x, g, coeffs, noise):
    got = ops.ctm_step(x, g, coeffs, noise)
    want = reference.ctm_step(x, g, coeffs, noise)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    assert_close(got, want, **KERNEL_TOL[x.dtype])
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noisy", [False, True])
def test_matches_reference(device, dtype, shape, noisy):
    assert_matches_reference(*make_case(shape, dtype, device, noisy))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("noisy", [False, True])
def test_matches_float64_formula(dtype, noisy):
    x, g, coeffs, noise = make_case((5, 9), dtype, "cpu", noisy)
    a, b, c = coeffs.tolist()
    want = a * x.double() + b * g.double() + (c * noise.double() if noisy else 0.0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(ops.ctm_step(x, g, coeffs, noise).double(), want, **tol)


def test_noise_coefficient_is_ignored_without_noise():
    x, g, coeffs, _ = make_case((4, 6), torch.float64, "cpu", False)
    other = coeffs.clone()
    other[2] = 123.0
    assert torch.equal(ops.ctm_step(x, g, coeffs), ops.ctm_step(x, g, other))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(device, dtype):
    x, g, coeffs, noise = make_case((6, 10, 8), dtype, device, True)
    assert not x.transpose(0, 2).is_contiguous()
    assert_matches_reference(x.transpose(0, 2), g.transpose(0, 2), coeffs, noise.transpose(0, 2))
    # Strided slices with an odd offset defeat vector alignment.
    s = slice(1, None, 2)
    assert_matches_reference(x[s], g[s], coeffs, noise[s])
    assert_matches_reference(x[:, 1:], g[:, 1:], coeffs, noise[:, 1:])


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_inputs(device):
    x, g, coeffs, noise = make_case((3, 4, 5), torch.float32, device, True)
    assert assert_matches_reference(x, g[:1], coeffs, noise[0].expand(3, 4, 5)).shape == (3, 4, 5)
    assert assert_matches_reference(x[0], g, coeffs, None).shape == (3, 4, 5)
    assert assert_matches_reference(x, g, coeffs, noise[:, :1, :1]).shape == (3, 4, 5)


def test_output_is_a_fresh_tensor():
    x, g, coeffs, noise = make_case((4, 4), torch.float32, "cpu", True)
    x_next = ops.ctm_step(x, g, coeffs, noise)
    assert all(x_next.data_ptr() != t.data_ptr() for t in (x, g, noise))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    dtype=st.sampled_from(DTYPES),
    noisy=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    transpose=st.booleans(),
)
def test_property_matches_reference(shape, dtype, noisy, seed, transpose):
    x, g, coeffs, noise = make_case(tuple(shape), dtype, "cpu", noisy, seed)
    if transpose and len(shape) >= 2:
        x, g = x.transpose(0, -1), g.transpose(0, -1)
        noise = None if noise is None else noise.transpose(0, -1)
    assert_matches_reference(x, g, coeffs, noise)


@pytest.mark.parametrize("noisy", [False, True])
def test_gradcheck(noisy):
    x, g, coeffs, noise = make_case((3, 4), torch.float64, "cpu", noisy)
    g = g[:1]  # broadcast input: its gradient is summed
    tensors = [x.requires_grad_(), g.requires_grad_()] + ([noise.requires_grad_()] if noisy else [])

    def step(x, g, *rest):
        return ops.ctm_step(x, g, coeffs, rest[0] if rest else None)

    assert torch.autograd.gradcheck(step, tensors)
    assert torch.autograd.gradgradcheck(step, tensors)


def test_grad_matches_reference_autograd():
    x, g, coeffs, noise = make_case((5, 6), torch.float64, "cpu", True)
    ins = [t.clone().requires_grad_() for t in (x, g, noise)]
    ref_ins = [t.clone().requires_grad_() for t in (x, g, noise)]
    w = torch.randn(5, 6, dtype=torch.float64)
    (ops.ctm_step(ins[0], ins[1], coeffs, ins[2]) * w).sum().backward()
    (reference.ctm_step(ref_ins[0], ref_ins[1], coeffs, ref_ins[2]) * w).sum().backward()
    for got, want in zip(ins, ref_ins):
        assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noisy", [False, True])
def test_opcheck(device, noisy):
    x, g, coeffs, noise = make_case((2, 3, 4), torch.float32, device, noisy)
    x.requires_grad_()
    g.requires_grad_()
    torch.library.opcheck(torch.ops.adjointdeis.ctm_step.default, (x, g, coeffs, noise))


def test_compile_fullgraph():
    x, g, coeffs, noise = make_case((4, 8), torch.float32, "cpu", True)

    def two_steps(x, g, coeffs, noise):
        return ops.ctm_step(ops.ctm_step(x, g, coeffs, noise), g * 0.5, coeffs, None)

    compiled = torch.compile(two_steps, fullgraph=True)
    assert_close(compiled(x, g, coeffs, noise), two_steps(x, g, coeffs, noise))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c.update(g=c["g"].double()), "g has dtype"),
        (lambda c: c.update(g=torch.zeros(2, 5)), "g with shape"),
        (lambda c: c.update(noise=torch.zeros(4, 4)), "noise with shape"),
        (lambda c: c.update(noise=torch.zeros(3, 4, dtype=torch.float16)), "noise has dtype"),
        (lambda c: c.update(coeffs=c["coeffs"].float()), "coeffs must be float64"),
        (lambda c: c.update(coeffs=torch.zeros(7, dtype=torch.float64)), "coeffs must have shape"),
        (lambda c: c.update(x=c["x"].long()), "x must be float64"),
    ],
)
@pytest.mark.parametrize("impl", [ops.ctm_step, reference.ctm_step])
def test_bad_input_names_the_argument(impl, mutate, message):
    case = dict(x=torch.zeros(3, 4), g=torch.zeros(3, 4), noise=None, coeffs=torch.zeros(3, dtype=torch.float64))
    mutate(case)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message.replace("[", r"\[")):
        impl(case["x"], case["g"], case["coeffs"], case["noise"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noisy", [False, True])
def test_cuda_matches_cpu(dtype, noisy):
    for shape in [(1,), (5,), (4, 4, 64, 64), (3, 7, 11)]:
        cpu = make_case(shape, dtype, "cpu", noisy)
        cuda = [None if t is None else t.cuda() for t in cpu]
        assert_close(ops.ctm_step(*cuda).cpu(), ops.ctm_step(*cpu), **KERNEL_TOL[dtype])


@pytest.mark.cuda
def test_cuda_misaligned_and_large():
    x, g, coeffs, noise = make_case(((1 << 20) + 3,), torch.float32, "cuda", True)
    assert_matches_reference(x[1:], g[1:], coeffs, noise[1:])
    assert_matches_reference(x, g, coeffs, noise)
