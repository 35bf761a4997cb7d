"""The adjoint ops against their pure-PyTorch references: discrete_adjoint_step and multi_tensor_axpy_."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.testing import assert_close

from adjointdeis import ops, reference
from conftest import DEVICES, DTYPES, KERNEL_TOL

SHAPES = [(), (0,), (1,), (7,), (3, 5, 7), (2, 4, 17, 33)]
PENDING = [(False, False), (True, False), (False, True), (True, True)]
ACCUMULATOR_DTYPES = [torch.float64, torch.float32]
SCALE = 0.37


def make_adjoint_case(shape, dtype, device, has_pend1, has_pend2, seed=0):
    g = torch.Generator().manual_seed(seed)
    def rand(*s):
        return torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    xbar, vjp, gfull = rand(*shape), rand(*shape), rand(*shape)
    pend1 = rand(*shape) if has_pend1 else None
    pend2 = rand(*shape) if has_pend2 else None
    coeffs = torch.randn(6, generator=g, dtype=torch.float64).to(device)
    return xbar, vjp, gfull, pend1, pend2, coeffs


def assert_adjoint_matches_reference(*case):
    got = ops.discrete_adjoint_step(*case)
    want = reference.discrete_adjoint_step(*case)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        assert_close(g, w, **KERNEL_TOL[case[0].dtype])
    return got


def to_device(case, device):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in case]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("has_pend1,has_pend2", PENDING)
def test_adjoint_matches_reference(device, dtype, shape, has_pend1, has_pend2):
    assert_adjoint_matches_reference(*make_adjoint_case(shape, dtype, device, has_pend1, has_pend2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adjoint_matches_float64_formula(dtype):
    xbar, vjp, gfull, pend1, pend2, coeffs = make_adjoint_case((5, 9), dtype, "cpu", True, True)
    a, p, b1, b2, b0_prev, q_prev = coeffs.tolist()
    got = ops.discrete_adjoint_step(xbar, vjp, gfull, pend1, pend2, coeffs)
    d = [t.double() for t in (xbar, vjp, gfull, pend1, pend2)]
    xbar_prev = a * d[0] + p * d[2] + d[1]
    gfull_prev = d[3] + b1 * d[0] + b0_prev * xbar_prev
    want = (xbar_prev, gfull_prev, q_prev * gfull_prev, d[4] + b2 * d[0])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert_close(g.double(), w, **tol)


def linear_multistep_rows(num_rows, seed):
    """Random coefficient rows (a, b0, b1, b2, p, q) of a 3-term multistep recurrence, float64."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_rows, 6, generator=g, dtype=torch.float64) * 0.5
    rows[0, 2] = 0.0  # row 0 has no m_{-1}
    rows[:2, 3] = 0.0  # rows 0 and 1 have no m_{-2}
    return rows


def test_adjoint_recurrence_equals_autograd():
    """Chained over all rows with the model's VJPs, the op gives autograd's dL/dx_0 and dL/dtheta."""
    num_rows, shape = 6, (4, 5)
    rows = linear_multistep_rows(num_rows, seed=3)
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[-1], generator=g, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    loss_weight = torch.randn(shape, generator=g, dtype=torch.float64)

    def model(x, j):
        return torch.tanh(weight * x + bias) * (1.0 + 0.1 * j)

    xs, ms = [x0], []
    for j in range(num_rows):
        a, b0, b1, b2, p, q = rows[j].tolist()
        ms.append(p * xs[j] + q * model(xs[j], j))
        x_next = a * xs[j] + b0 * ms[j]
        if j >= 1:
            x_next = x_next + b1 * ms[j - 1]
        if j >= 2:
            x_next = x_next + b2 * ms[j - 2]
        xs.append(x_next)
    loss = (loss_weight * xs[-1]).sum()
    want_x0, want_weight, want_bias = torch.autograd.grad(loss, (x0, weight, bias))

    states = [x.detach() for x in xs]
    params = [weight, bias]
    grads = [torch.zeros_like(weight), torch.zeros_like(bias)]
    one = torch.ones(1, dtype=torch.float64)
    xbar = loss_weight.clone()
    gfull = rows[-1, 1] * xbar
    cot = rows[-1, 5] * gfull
    pend1 = None
    for j in reversed(range(num_rows)):
        x = states[j].clone().requires_grad_()
        out = model(x, j)
        vjp, *param_vjps = torch.autograd.grad(out, [x, *params], cot)
        with torch.no_grad():
            ops.multi_tensor_axpy_(grads, param_vjps, one)
        a, b0, b1, b2, p, q = rows[j].tolist()
        b0_prev, q_prev = (rows[j - 1, 1].item(), rows[j - 1, 5].item()) if j > 0 else (0.0, 0.0)
        coeffs = torch.tensor([a, p, b1, b2, b0_prev, q_prev], dtype=torch.float64)
        xbar, gfull, cot, pend1 = ops.discrete_adjoint_step(xbar, vjp, gfull, pend1, None, coeffs)
    tol = dict(rtol=1e-10, atol=1e-12)
    assert_close(xbar, want_x0, **tol)
    assert_close(grads[0], want_weight, **tol)
    assert_close(grads[1], want_bias, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adjoint_non_contiguous_inputs(device, dtype):
    xbar, vjp, gfull, pend1, pend2, coeffs = make_adjoint_case((6, 10, 8), dtype, device, True, True)
    tensors = (xbar, vjp, gfull, pend1, pend2)
    transposed = [t.transpose(0, 2) for t in tensors]
    assert not transposed[0].is_contiguous()
    assert_adjoint_matches_reference(*transposed, coeffs)
    # Strided slices and an odd offset defeat vector alignment.
    assert_adjoint_matches_reference(*[t[1::2] for t in tensors], coeffs)
    assert_adjoint_matches_reference(*[t[:, 1:] for t in tensors], coeffs)


@pytest.mark.parametrize("device", DEVICES)
def test_adjoint_broadcast_inputs(device):
    xbar, vjp, gfull, pend1, pend2, coeffs = make_adjoint_case((3, 4, 5), torch.float32, device, True, True)
    outs = assert_adjoint_matches_reference(xbar, vjp[:1], gfull[0, 0], pend1[:, :1], pend2[0].expand(3, 4, 5),
                                            coeffs)
    assert all(o.shape == (3, 4, 5) for o in outs)
    # xbar itself may broadcast against a larger vjp.
    outs = assert_adjoint_matches_reference(xbar[0], vjp, gfull, None, None, coeffs)
    assert all(o.shape == (3, 4, 5) for o in outs)


def test_adjoint_outputs_are_fresh_tensors():
    case = make_adjoint_case((4, 4), torch.float32, "cpu", True, True)
    outs = ops.discrete_adjoint_step(*case)
    pointers = {t.data_ptr() for t in case}
    assert len({o.data_ptr() for o in outs}) == 4
    assert all(o.data_ptr() not in pointers for o in outs)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    dtype=st.sampled_from(DTYPES),
    pending=st.sampled_from(PENDING),
    seed=st.integers(0, 2**31 - 1),
    transpose=st.booleans(),
)
def test_adjoint_property_matches_reference(shape, dtype, pending, seed, transpose):
    *tensors, coeffs = make_adjoint_case(tuple(shape), dtype, "cpu", *pending, seed)
    if transpose and len(shape) >= 2:
        tensors = [None if t is None else t.transpose(0, -1) for t in tensors]
    assert_adjoint_matches_reference(*tensors, coeffs)


@pytest.mark.parametrize("has_pend1,has_pend2", PENDING)
def test_adjoint_gradcheck(has_pend1, has_pend2):
    xbar, vjp, gfull, pend1, pend2, coeffs = make_adjoint_case((3, 4), torch.float64, "cpu", has_pend1, has_pend2)
    gfull = gfull[:1]  # broadcast input: its gradient is summed
    tensors = [t.requires_grad_() for t in (xbar, vjp, gfull, pend1, pend2) if t is not None]

    def step(xbar, vjp, gfull, *pending):
        rest = iter(pending)
        p1 = next(rest) if has_pend1 else None
        p2 = next(rest) if has_pend2 else None
        return ops.discrete_adjoint_step(xbar, vjp, gfull, p1, p2, coeffs)

    assert torch.autograd.gradcheck(step, tensors)
    assert torch.autograd.gradgradcheck(step, tensors)


def test_adjoint_grad_matches_reference_autograd():
    *tensors, coeffs = make_adjoint_case((5, 6), torch.float64, "cpu", True, True)
    ins = [t.clone().requires_grad_() for t in tensors]
    ref_ins = [t.clone().requires_grad_() for t in tensors]
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    sum(((o * w).sum() for o, w in zip(ops.discrete_adjoint_step(*ins, coeffs), weights))).backward()
    sum(((o * w).sum() for o, w in zip(reference.discrete_adjoint_step(*ref_ins, coeffs), weights))).backward()
    for got, want in zip(ins, ref_ins, strict=True):
        assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_pend1,has_pend2", [(False, False), (True, True)])
def test_adjoint_opcheck(device, has_pend1, has_pend2):
    *tensors, coeffs = make_adjoint_case((2, 3, 4), torch.float32, device, has_pend1, has_pend2)
    for t in tensors[:3]:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.adjointdeis.discrete_adjoint_step.default, (*tensors, coeffs))


def test_adjoint_compile_fullgraph():
    xbar, vjp, gfull, pend1, pend2, coeffs = make_adjoint_case((4, 8), torch.float32, "cpu", True, False)

    def two_rows(xbar, vjp, gfull, pend1, coeffs):
        xbar, gfull, cot, pend = ops.discrete_adjoint_step(xbar, vjp, gfull, pend1, None, coeffs)
        return ops.discrete_adjoint_step(xbar, cot * 0.5, gfull, pend, None, coeffs)

    compiled = torch.compile(two_rows, fullgraph=True)
    for got, want in zip(compiled(xbar, vjp, gfull, pend1, coeffs), two_rows(xbar, vjp, gfull, pend1, coeffs),
                         strict=True):
        assert_close(got, want)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c.update(xbar=c["xbar"].long()), "xbar must be float64"),
        (lambda c: c.update(vjp=c["vjp"].double()), "vjp has dtype"),
        (lambda c: c.update(gfull=torch.zeros(2, 5)), "gfull with shape"),
        (lambda c: c.update(pend1=torch.zeros(3, 4, dtype=torch.float16)), "pend1 has dtype"),
        (lambda c: c.update(pend2=torch.zeros(4, 4)), "pend2 with shape"),
        (lambda c: c.update(coeffs=c["coeffs"].float()), "coeffs must be float64"),
        (lambda c: c.update(coeffs=torch.zeros(7, dtype=torch.float64)), "coeffs must have shape [6]"),
    ],
)
@pytest.mark.parametrize("impl", [ops.discrete_adjoint_step, reference.discrete_adjoint_step])
def test_adjoint_bad_input_names_the_argument(impl, mutate, message):
    case = dict(xbar=torch.zeros(3, 4), vjp=torch.zeros(3, 4), gfull=torch.zeros(3, 4), pend1=None, pend2=None,
                coeffs=torch.zeros(6, dtype=torch.float64))
    mutate(case)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message.replace("[", r"\[")):
        impl(case["xbar"], case["vjp"], case["gfull"], case["pend1"], case["pend2"], case["coeffs"])


def make_axpy_case(shapes, acc_dtype, update_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    def rand(s, dtype):
        return torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    accumulators = [rand(s, acc_dtype) for s in shapes]
    updates = [rand(s, update_dtype) for s in shapes]
    scale = torch.tensor([SCALE], dtype=torch.float64, device=device)
    return accumulators, updates, scale


def assert_axpy_matches_reference(accumulators, updates, scale):
    expected = [a.clone() for a in accumulators]
    reference.multi_tensor_axpy_(expected, updates, scale)
    pointers = [a.data_ptr() for a in accumulators]
    with torch.no_grad():
        assert ops.multi_tensor_axpy_(accumulators, updates, scale) is None
    assert [a.data_ptr() for a in accumulators] == pointers
    for got, want in zip(accumulators, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, **KERNEL_TOL[got.dtype])


AXPY_SHAPE_LISTS = [[], [()], [(0,)], [(1,)], [(7,), (3, 5, 7), (0,), (2, 4, 17, 33), ()]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("acc_dtype", ACCUMULATOR_DTYPES)
@pytest.mark.parametrize("update_dtype", DTYPES)
@pytest.mark.parametrize("shapes", AXPY_SHAPE_LISTS)
def test_axpy_matches_reference(device, acc_dtype, update_dtype, shapes):
    assert_axpy_matches_reference(*make_axpy_case(shapes, acc_dtype, update_dtype, device))


@pytest.mark.parametrize("acc_dtype", ACCUMULATOR_DTYPES)
@pytest.mark.parametrize("update_dtype", DTYPES)
def test_axpy_matches_foreach_add(acc_dtype, update_dtype):
    accumulators, updates, scale = make_axpy_case([(5, 9), (33,), (0, 2), ()], acc_dtype, update_dtype, "cpu")
    expected = [a.clone() for a in accumulators]
    torch._foreach_add_(expected, [u.to(acc_dtype) for u in updates], alpha=scale.item())
    ops.multi_tensor_axpy_(accumulators, updates, scale)
    for got, want in zip(accumulators, expected, strict=True):
        assert_close(got, want, **KERNEL_TOL[acc_dtype])


@pytest.mark.parametrize("acc_dtype", ACCUMULATOR_DTYPES)
def test_axpy_matches_float64_formula(acc_dtype):
    accumulators, updates, scale = make_axpy_case([(4, 6), (11,)], acc_dtype, torch.bfloat16, "cpu")
    want = [a.double() + SCALE * u.double() for a, u in zip(accumulators, updates)]
    ops.multi_tensor_axpy_(accumulators, updates, scale)
    tol = dict(rtol=1e-12, atol=1e-12) if acc_dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for got, w in zip(accumulators, want, strict=True):
        assert_close(got.double(), w, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("acc_dtype,update_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                    (torch.float64, torch.float16)])
def test_axpy_spans_parallel_chunks(device, acc_dtype, update_dtype):
    # Tensors larger than one parallel chunk, and chunks that start and end inside tensors.
    shapes = [(40000,), (3,), (0,), (70001,), (5, 7), (32768,)]
    assert_axpy_matches_reference(*make_axpy_case(shapes, acc_dtype, update_dtype, device))


@pytest.mark.parametrize("device", DEVICES)
def test_axpy_non_contiguous_and_misaligned(device):
    accumulators, updates, scale = make_axpy_case([(9, 6), (4, 5, 3), (65,)], torch.float32, torch.float32, device)
    # Transposed and strided updates, and an accumulator that starts one element into its storage.
    updates = [torch.randn(6, 9, device=device).t(), torch.randn(3, 5, 4, device=device).permute(2, 1, 0),
               torch.randn(130, device=device)[::2]]
    base = torch.randn(66, device=device)
    accumulators[2] = base[1:]
    assert not updates[0].is_contiguous() and not updates[2].is_contiguous()
    assert_axpy_matches_reference(accumulators, updates, scale)


def test_axpy_update_may_alias_its_accumulator():
    accumulators, _, scale = make_axpy_case([(5, 5), (17,)], torch.float64, torch.float64, "cpu")
    want = [a * (1 + SCALE) for a in accumulators]
    ops.multi_tensor_axpy_(accumulators, accumulators, scale)
    for got, w in zip(accumulators, want, strict=True):
        assert_close(got, w, rtol=1e-12, atol=1e-12)


def test_axpy_scale_may_be_zero_dim():
    accumulators, updates, _ = make_axpy_case([(3, 4)], torch.float32, torch.float32, "cpu")
    assert_axpy_matches_reference(accumulators, updates, torch.tensor(-2.5, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=0, max_size=6),
    acc_dtype=st.sampled_from(ACCUMULATOR_DTYPES),
    update_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    transpose=st.booleans(),
)
def test_axpy_property_matches_reference(shapes, acc_dtype, update_dtype, seed, transpose):
    accumulators, updates, scale = make_axpy_case([tuple(s) for s in shapes], acc_dtype, update_dtype, "cpu", seed)
    if transpose:
        updates = [u.transpose(0, -1).contiguous().transpose(0, -1) if u.dim() >= 2 else u for u in updates]
    assert_axpy_matches_reference(accumulators, updates, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_axpy_opcheck(device):
    accumulators, updates, scale = make_axpy_case([(2, 3), (5,), (0,)], torch.float32, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.adjointdeis.multi_tensor_axpy_.default, (accumulators, updates, scale))


def test_axpy_compile_fullgraph():
    accumulators, updates, scale = make_axpy_case([(4, 8), (3,)], torch.float32, torch.float32, "cpu")
    expected = [a.clone() for a in accumulators]

    def accumulate_twice(accumulators, updates, scale):
        ops.multi_tensor_axpy_(accumulators, updates, scale)
        ops.multi_tensor_axpy_(accumulators, [u * 2 for u in updates], scale)
        return [a.sum() for a in accumulators]

    with torch.no_grad():
        accumulate_twice(expected, updates, scale)
        torch.compile(accumulate_twice, fullgraph=True)(accumulators, updates, scale)
    for got, want in zip(accumulators, expected, strict=True):
        assert_close(got, want)


def test_axpy_refuses_inputs_that_require_grad():
    accumulators, updates, scale = make_axpy_case([(3,)], torch.float32, torch.float32, "cpu")
    updates[0].requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.multi_tensor_axpy_(accumulators, updates, scale)
    with torch.no_grad():
        ops.multi_tensor_axpy_(accumulators, updates, scale)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c.update(updates=c["updates"][:1]), "got 2 accumulators but 1 updates"),
        (lambda c: c["updates"].__setitem__(1, torch.zeros(4, 3)),
         "updates[1] has shape [4, 3] but accumulators[1] has shape [3, 4]"),
        (lambda c: c["updates"].__setitem__(1, torch.zeros(3, 4, dtype=torch.float64)), "updates[1] has dtype"),
        (lambda c: c["updates"].__setitem__(0, torch.zeros(5, dtype=torch.long)), "updates[0] must be float64"),
        (lambda c: c["accumulators"].__setitem__(1, torch.zeros(3, 4, dtype=torch.float64)),
         "accumulators[1] has dtype"),
        (lambda c: c["accumulators"].__setitem__(0, torch.zeros(5, dtype=torch.float16)),
         "accumulators[0] must be float32 or float64"),
        (lambda c: c["accumulators"].__setitem__(1, torch.zeros(4, 3).t()), "accumulators[1] must be contiguous"),
        (lambda c: c.update(scale=torch.ones(1)), "scale must be float64"),
        (lambda c: c.update(scale=torch.ones(2, dtype=torch.float64)), "scale must hold one element"),
    ],
)
@pytest.mark.parametrize("impl", [ops.multi_tensor_axpy_, reference.multi_tensor_axpy_])
def test_axpy_bad_input_names_the_argument(impl, mutate, message):
    case = dict(accumulators=[torch.zeros(5), torch.zeros(3, 4)], updates=[torch.zeros(5), torch.zeros(3, 4)],
                scale=torch.ones(1, dtype=torch.float64))
    mutate(case)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message.replace("[", r"\[")):
        impl(case["accumulators"], case["updates"], case["scale"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_pend1,has_pend2", PENDING)
def test_cuda_adjoint_matches_cpu(dtype, has_pend1, has_pend2):
    for shape in [(1,), (5,), (4, 4, 64, 64), (3, 7, 11)]:
        cpu = make_adjoint_case(shape, dtype, "cpu", has_pend1, has_pend2)
        got = ops.discrete_adjoint_step(*to_device(cpu, "cuda"))
        for g, w in zip(got, ops.discrete_adjoint_step(*cpu), strict=True):
            assert g.is_cuda
            assert_close(g.cpu(), w, **KERNEL_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_adjoint_misaligned_and_large(dtype):
    *tensors, coeffs = make_adjoint_case(((1 << 20) + 3,), dtype, "cuda", True, True)
    assert_adjoint_matches_reference(*[t[1:] for t in tensors], coeffs)
    assert_adjoint_matches_reference(*tensors, coeffs)
    # Some operands aligned, some not: the kernel must take the scalar path.
    xbar, vjp, gfull, pend1, pend2 = tensors
    assert_adjoint_matches_reference(xbar[1:], vjp[:-1], gfull[1:], pend1[:-1], None, coeffs)


@pytest.mark.cuda
@pytest.mark.parametrize("acc_dtype", ACCUMULATOR_DTYPES)
@pytest.mark.parametrize("update_dtype", DTYPES)
def test_cuda_axpy_matches_cpu(acc_dtype, update_dtype):
    cpu = make_axpy_case([(1,), (5,), (4, 4, 64, 64), (3, 7, 11), (0,), ()], acc_dtype, update_dtype, "cpu")
    accumulators, updates, scale = ([t.cuda() for t in cpu[0]], [t.cuda() for t in cpu[1]], cpu[2].cuda())
    ops.multi_tensor_axpy_(*cpu)
    ops.multi_tensor_axpy_(accumulators, updates, scale)
    for got, want in zip(accumulators, cpu[0], strict=True):
        assert_close(got.cpu(), want, **KERNEL_TOL[acc_dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("acc_dtype,update_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                                    (torch.float64, torch.float16)])
def test_cuda_axpy_many_tensors_of_odd_sizes(acc_dtype, update_dtype):
    g = torch.Generator().manual_seed(7)
    sizes = torch.randint(0, 5000, (300,), generator=g).tolist() + [1, 0, 16383, 16384, 16385, (1 << 20) + 5]
    accumulators, updates, scale = make_axpy_case([(n,) for n in sizes], acc_dtype, update_dtype, "cuda")
    # Misaligned views: accumulators and updates that start one element into their storage.
    accumulators[0] = torch.randn(sizes[0] + 1, device="cuda", dtype=acc_dtype)[1:]
    updates[1] = torch.randn(sizes[1] + 1, device="cuda").to(update_dtype)[1:]
    assert_axpy_matches_reference(accumulators, updates, scale)


@pytest.mark.cuda
def test_cuda_axpy_scale_on_cpu_is_named():
    accumulators, updates, _ = make_axpy_case([(3,)], torch.float32, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="scale is on cpu"):
        ops.multi_tensor_axpy_(accumulators, updates, torch.ones(1, dtype=torch.float64))


# torch.func transforms and forward-mode AD run the twin (the fused autograd is reverse mode only): before, forward
# mode dropped the tangents silently.

def adjoint_closed_form(coeffs, xbar, vjp, gfull, pend1, pend2):
    """The row in float64 from its formula (linear in the tensors, so also the tangent map)."""
    a, p, b1, b2, b0_prev, q_prev = coeffs.tolist()
    xbar_prev = a * xbar + p * gfull + vjp
    gfull_prev = pend1 + b1 * xbar + b0_prev * xbar_prev
    return xbar_prev, gfull_prev, q_prev * gfull_prev, pend2 + b2 * xbar


def test_adjoint_forward_mode_ad_matches_closed_form():
    xbar, vjp, gfull, pend1, pend2, coeffs = make_adjoint_case((3, 4), torch.float64, "cpu", True, True)
    primals = (xbar, vjp[:1], gfull, pend1, pend2[0, 0])  # broadcast vjp and pend2
    tangents = tuple(torch.randn_like(t) for t in primals)
    got_primal, got_tangent = torch.func.jvp(lambda *ts: ops.discrete_adjoint_step(*ts, coeffs), primals, tangents)
    for got, want in zip((*got_primal, *got_tangent),
                         (*adjoint_closed_form(coeffs, *primals), *adjoint_closed_form(coeffs, *tangents))):
        assert_close(got, want.expand(3, 4), rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        for got, want in zip(ops.discrete_adjoint_step(*duals, coeffs), adjoint_closed_form(coeffs, *tangents)):
            tangent = torch.autograd.forward_ad.unpack_dual(got).tangent
            assert tangent is not None
            assert_close(tangent, want.expand(3, 4), rtol=1e-12, atol=1e-12)


def test_adjoint_vmap_and_grad_match_a_loop():
    xbar, vjp, gfull, pend1, _, coeffs = make_adjoint_case((5, 2, 3), torch.float64, "cpu", True, False)
    step = lambda xbar, gfull: ops.discrete_adjoint_step(xbar, vjp[0, 0], gfull, pend1[0], None, coeffs)
    got = torch.func.vmap(step, in_dims=(0, 2))(xbar, gfull.movedim(0, 2))
    loop = [step(xbar[i], gfull[i]) for i in range(5)]
    for k, g in enumerate(got):
        assert_close(g, torch.stack([r[k] for r in loop]), rtol=1e-12, atol=1e-12)
    loss = lambda xbar: sum((t * t).sum() for t in step(xbar, gfull[0]))
    xr = xbar[0].clone().requires_grad_()
    assert_close(torch.func.grad(loss)(xbar[0]), torch.autograd.grad(loss(xr), xr)[0], rtol=1e-12, atol=1e-12)


def test_axpy_refuses_transforms_and_tangents():
    accumulators, updates = [torch.zeros(3)], [torch.ones(3)]
    scale = torch.ones(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="multi_tensor_axpy_: is not supported under torch.func"):
        torch.func.jvp(lambda u: ops.multi_tensor_axpy_(accumulators, [u], scale), (updates[0],), (updates[0],))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(updates[0], torch.ones(3))
        with pytest.raises(RuntimeError, match="multi_tensor_axpy_: .*forward-mode AD tangent"):
            ops.multi_tensor_axpy_(accumulators, [dual], scale)
    assert torch.equal(accumulators[0], torch.zeros(3))


@pytest.mark.parametrize("impl", [ops.multi_tensor_axpy_, reference.multi_tensor_axpy_])
def test_axpy_bumps_the_version_of_its_accumulators(impl):
    """As torch's in-place ops: a backward through an accumulator saved before the update raises instead of using the
    updated values silently."""
    accumulator, w = torch.ones(3), torch.ones(3, requires_grad=True)
    loss = (w * accumulator).sum()  # saves the accumulator for w's gradient
    with torch.no_grad():
        impl([accumulator], [torch.ones(3)], torch.full((1,), 2.0, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
