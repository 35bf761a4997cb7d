"""The fused step op against its pure-PyTorch reference: dtypes, shapes, layouts, autograd, compile;
up to three history terms, with and without m0, and the consistency-trajectory row folded into it."""

import math

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
    coeffs = torch.randn(8 if num_history == 3 else 7, generator=g, dtype=torch.float64).to(device)
    noise = rand(*shape) if noisy else None
    return x, out, history, coeffs, noise


def assert_matches_reference(x, out, history, coeffs, noise, save_m0=True):
    got = ops.multistep_step(x, out, history, coeffs, noise, save_m0)
    want = reference.multistep_step(x, out, history, coeffs, noise, save_m0)
    if not save_m0:
        assert got[1].shape == (0,) and got[1].dtype == x.dtype
        got, want = got[:1], want[:1]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        assert_close(g, w, **KERNEL_TOL[x.dtype])
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_history,noisy", [(0, False), (1, False), (2, False), (3, False), (1, True), (2, True),
                                               (3, True)])
@pytest.mark.parametrize("save_m0", [True, False])
def test_matches_reference(device, dtype, shape, num_history, noisy, save_m0):
    assert_matches_reference(*make_case(shape, dtype, device, num_history, noisy), save_m0=save_m0)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_three_history_terms_match_float64_formula(dtype):
    x, out, (m1, m2, m3), coeffs, noise = make_case((5, 9), dtype, "cpu", 3, True)
    a, b0, b1, b2, c, p, q, b3 = coeffs.tolist()
    x_next, m0 = ops.multistep_step(x, out, [m1, m2, m3], coeffs, noise)
    d = [t.double() for t in (x, out, m1, m2, m3, noise)]
    want_m0 = p * d[0] + q * d[1]
    want_x = a * d[0] + b0 * want_m0 + b1 * d[2] + b2 * d[3] + b3 * d[4] + c * d[5]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(m0.double(), want_m0, **tol)
    assert_close(x_next.double(), want_x, **tol)


def test_eight_entry_rows_serve_fewer_history_terms():
    x, out, history, coeffs, noise = make_case((4, 6), torch.float64, "cpu", 2, True)
    wide = torch.cat([coeffs, torch.tensor([123.0], dtype=torch.float64)])  # b3 is not read
    for got, want in zip(ops.multistep_step(x, out, history, wide, noise), ops.multistep_step(x, out, history, coeffs, noise)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noisy", [False, True])
def test_consistency_trajectory_row(dtype, noisy):
    """The gamma step of a two-time model, x_next = a x + b g + c noise, is the row [a, b, 0, 0, c, 0, 1]."""
    x, g, _, _, noise = make_case((3, 5, 7), dtype, "cpu", 0, noisy)
    a, b, c = 0.3, 0.7, 1.9
    row = torch.tensor([a, b, 0.0, 0.0, c, 0.0, 1.0], dtype=torch.float64)
    x_next, m0 = ops.multistep_step(x, g, [], row, noise, save_m0=False)
    want = a * x.double() + b * g.double() + (c * noise.double() if noisy else 0.0)
    assert m0.numel() == 0 and x_next.dtype == dtype
    assert_close(x_next.double(), want, **KERNEL_TOL[dtype])


def test_noise_coefficient_is_ignored_without_noise():
    x, out, history, coeffs, _ = make_case((4, 5), torch.float64, "cpu", 1, False)
    other = coeffs.clone()
    other[4] = 1e6
    assert torch.equal(ops.multistep_step(x, out, history, coeffs)[0], ops.multistep_step(x, out, history, other)[0])


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
    num_history=st.integers(0, 3),
    noisy=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    transpose=st.booleans(),
    save_m0=st.booleans(),
)
def test_property_matches_reference(shape, dtype, num_history, noisy, seed, transpose, save_m0):
    x, out, history, coeffs, noise = make_case(tuple(shape), dtype, "cpu", num_history, noisy, seed)
    if transpose and len(shape) >= 2:
        x, out = x.transpose(0, -1), out.transpose(0, -1)
        history = [h.transpose(0, -1) for h in history]
        noise = None if noise is None else noise.transpose(0, -1)
    assert_matches_reference(x, out, history, coeffs, noise, save_m0)


@pytest.mark.parametrize("num_history,noisy,save_m0", [(0, False, True), (1, True, True), (2, True, True),
                                                       (3, True, True), (0, True, False), (2, False, False)])
def test_gradcheck(num_history, noisy, save_m0):
    x, out, history, coeffs, noise = make_case((3, 4), torch.float64, "cpu", num_history, noisy)
    out = out[:1]  # broadcast input: its gradient is summed
    tensors = [t.requires_grad_() for t in (x, out, *history)] + ([noise.requires_grad_()] if noisy else [])

    def step(x, out, *rest):
        hist, nz = (rest[:-1], rest[-1]) if noisy else (rest, None)
        x_next, m0 = ops.multistep_step(x, out, list(hist), coeffs, nz, save_m0)
        return (x_next, m0) if save_m0 else x_next

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
@pytest.mark.parametrize("num_history,noisy,save_m0", [(0, False, True), (2, True, True), (3, True, True),
                                                       (0, True, False)])
def test_opcheck(device, num_history, noisy, save_m0):
    x, out, history, coeffs, noise = make_case((2, 3, 4), torch.float32, device, num_history, noisy)
    for t in (x, out, *history):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.adjointdeis.multistep_step.default, (x, out, history, coeffs, noise, save_m0))


def test_compile_fullgraph():
    x, out, history, coeffs, noise = make_case((4, 8), torch.float32, "cpu", 2, True)

    def three_steps(x, out, m1, m2, coeffs, noise):
        x1, m0 = ops.multistep_step(x, out, [m1, m2], coeffs, noise)
        x2, m00 = ops.multistep_step(x1, out * 0.5, [m0, m1, m2], torch.cat([coeffs, coeffs[:1]]), None)
        return ops.multistep_step(x2, out * 0.25, [m00], coeffs, noise, save_m0=False)[0]

    compiled = torch.compile(three_steps, fullgraph=True)
    assert_close(compiled(x, out, *history, coeffs, noise), three_steps(x, out, *history, coeffs, noise))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c.update(out=c["out"].double()), "out has dtype"),
        (lambda c: c.update(out=torch.zeros(2, 5)), "out with shape"),
        (lambda c: c.update(history=[torch.zeros(3, 4)] * 4), "history holds at most 3"),
        (lambda c: c.update(history=[torch.zeros(3, 4)] * 3), "coeffs must have shape [8]"),
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
@pytest.mark.parametrize("num_history,noisy", [(0, False), (1, False), (2, True), (3, True)])
def test_cuda_matches_cpu(dtype, num_history, noisy):
    for shape in [(1,), (5,), (4, 4, 64, 64), (3, 7, 11)]:
        cpu = make_case(shape, dtype, "cpu", num_history, noisy)
        cuda = [t.cuda() if isinstance(t, torch.Tensor) else ([h.cuda() for h in t] if isinstance(t, list) else t)
                for t in cpu]
        for got, want in zip(ops.multistep_step(*cuda), ops.multistep_step(*cpu)):
            assert_close(got.cpu(), want, **KERNEL_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("save_m0", [True, False])
def test_cuda_misaligned_and_large(save_m0):
    x, out, history, coeffs, noise = make_case(((1 << 20) + 3,), torch.float32, "cuda", 2, True)
    assert_matches_reference(x[1:], out[1:], [h[1:] for h in history], coeffs, noise[1:], save_m0)
    assert_matches_reference(x, out, history, coeffs, noise, save_m0)


def out_buffers(x, out, history, noise, save_m0):
    """Fresh output buffers of multistep_step_out, poisoned with NaN so that an unwritten element shows."""
    shape = torch.broadcast_shapes(x.shape, out.shape, *(h.shape for h in history),
                                   *(() if noise is None else (noise.shape,)))
    full = lambda: torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
    return full(), full() if save_m0 else None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_history,noisy", [(0, False), (1, False), (2, True), (3, True)])
@pytest.mark.parametrize("save_m0", [True, False])
@pytest.mark.parametrize("layout", ["dense", "transposed", "broadcast"])
def test_out_form_writes_what_the_op_returns(device, dtype, shape, num_history, noisy, save_m0, layout):
    """multistep_step_out writes exactly multistep_step's results (the same kernel) into the caller's buffers,
    and its reference twin the reference's."""
    x, out, history, coeffs, noise = make_case(shape, dtype, device, num_history, noisy)
    if layout == "transposed" and len(shape) >= 2:
        x, out = x.transpose(0, -1), out.transpose(0, -1)
        history = [h.transpose(0, -1) for h in history]
        noise = None if noise is None else noise.transpose(0, -1)
    if layout == "broadcast" and len(shape) >= 2:
        out = out[:1]
        history = [h[..., :1] for h in history]
    want = ops.multistep_step(x, out, history, coeffs, noise, save_m0)
    want_ref = reference.multistep_step(x, out, history, coeffs, noise, save_m0)
    for impl, expected in ((ops.multistep_step_out, want), (reference.multistep_step_out, want_ref)):
        x_next, m0 = out_buffers(x, out, history, noise, save_m0)
        assert impl(x, out, history, coeffs, noise, x_next=x_next, m0=m0) is None
        assert torch.equal(x_next, expected[0])
        if save_m0:
            assert torch.equal(m0, expected[1])
    assert_close(want[0], want_ref[0], **KERNEL_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_history,noisy,save_m0", [(0, False, True), (2, True, True), (3, True, False)])
def test_out_form_opcheck_and_compile(device, num_history, noisy, save_m0):
    x, out, history, coeffs, noise = make_case((2, 3, 4), torch.float32, device, num_history, noisy)
    x_next, m0 = out_buffers(x, out, history, noise, save_m0)
    torch.library.opcheck(torch.ops.adjointdeis.multistep_step_out.default,
                          (x, out, history, coeffs, noise, x_next, m0))
    torch.library.opcheck(torch.ops.adjointdeis.multistep_step_out.default,
                          (x, out, history, coeffs, noise, x_next, m0, torch.ones((), dtype=torch.bool, device=device)))

    def two_steps(x, out, history, x_next, m0, spare):  # the second step writes into buffers the first did not
        finite = torch.ones((), dtype=torch.bool, device=x.device)
        ops.multistep_step_out(x, out, history, coeffs, noise, x_next=x_next, m0=m0)
        ops.multistep_step_out(x_next, out, history, coeffs, noise, x_next=spare, finite=finite)
        return spare, finite

    compiled = torch.compile(two_steps, fullgraph=True)
    x[0, 0, 0] = float("nan")  # reaches spare through both steps
    got = compiled(x, out, history, *out_buffers(x, out, history, noise, save_m0), torch.empty_like(x))
    want = two_steps(x, out, history, *out_buffers(x, out, history, noise, save_m0), torch.empty_like(x))
    assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    assert got[1].item() is False and want[1].item() is False


@pytest.mark.parametrize(
    "buffers,message",
    [
        (lambda c: dict(x_next=c["x"]), None),  # in place
        (lambda c: dict(x_next=c["x"], m0=c["owner"][:3]), None),  # both in place
        (lambda c: dict(x_next=c["owner"][:3], m0=c["x"]), None),  # in place of other inputs
        (lambda c: dict(x_next=c["owner"][1:]), "x_next shares memory with history[0]"),
        (lambda c: dict(x_next=c["owner"].view(-1)[:12].view(4, 3).T), "x_next must be contiguous"),
        (lambda c: dict(x_next=torch.empty(3, 4), m0=c["owner"][1:]), "m0 shares memory with history[0]"),
        (lambda c: dict(x_next=c["x"], m0=c["x"]), "m0 shares memory with x_next"),
        (lambda c: dict(x_next=torch.empty(3, 4), m0=None), None),
        (lambda c: dict(x_next=torch.empty(4, 3).T), "x_next must be contiguous"),
        (lambda c: dict(x_next=torch.empty(3, 5)), "x_next must have the operands' broadcast shape [3, 4]"),
        (lambda c: dict(x_next=torch.empty(3, 4, dtype=torch.float64)), "x_next has dtype"),
        (lambda c: dict(x_next=torch.empty(3, 4), m0=torch.empty(1, 4)), "m0 must have the operands' broadcast"),
        (lambda c: (lambda b: dict(x_next=b, m0=b))(torch.empty(3, 4)), "m0 shares memory with x_next"),
        (lambda c: (lambda b: dict(x_next=b[:3], m0=b[2:]))(torch.empty(5, 4)), "m0 shares memory with x_next"),
        (lambda c: (lambda b: dict(x_next=b[:3], m0=b[3:]))(torch.empty(6, 4)), None),
        (lambda c: dict(x_next=torch.empty(3, 4, device="meta")), "x_next is on meta"),
        (lambda c: dict(x_next=torch.empty(3, 4), finite=torch.ones((), dtype=torch.bool)), None),
        (lambda c: dict(x_next=torch.empty(3, 4), finite=torch.ones(())), "finite must be a 0-d bool tensor"),
        (lambda c: dict(x_next=torch.empty(3, 4), finite=torch.ones(1, dtype=torch.bool)),
         "finite must be a 0-d bool tensor"),
        (lambda c: dict(x_next=torch.empty(3, 4), finite=torch.ones((), dtype=torch.bool, device="meta")),
         "finite is on meta"),
        (lambda c: dict(x_next=torch.empty(3, 4), finite=c["x"].view(torch.bool)[1, 2]), "finite shares memory with x"),
        (lambda c: (lambda b: dict(x_next=b, finite=b.view(torch.bool)[0, 0]))(torch.empty(3, 4)),
         "finite shares memory with x_next"),
    ],
)
@pytest.mark.parametrize("impl", [ops.multistep_step_out, reference.multistep_step_out])
def test_out_form_bad_buffers_name_the_argument(impl, buffers, message):
    """A buffer of the wrong dtype, device, shape or layout, or one overlapping an input (other than being it) or
    the other output, raises naming it; buffers side by side in one allocation, and buffers that are inputs
    themselves (in place), are fine."""
    owner = torch.zeros(4, 4)
    case = dict(x=torch.zeros(3, 4), out=torch.zeros(1, 4), history=[owner[:3]], noise=torch.zeros(4),
                coeffs=torch.zeros(7, dtype=torch.float64), owner=owner)
    kwargs = buffers(case)
    call = lambda: impl(case["x"], case["out"], case["history"], case["coeffs"], case["noise"], **kwargs)
    if message is None:
        call()
        return
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message.replace("[", r"\[")):
        call()


@pytest.fixture
def three_threads():
    """Three intra-op threads (the session runs on one): CPU chunks are at least 32768 elements, so a tensor of
    3 * 32768 + 5 is split in three."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (2, 4, 17, 33), (3 * 32768 + 5,)])  # the last: three threads' chunks
@pytest.mark.parametrize("num_history", [1, 2, 3])
@pytest.mark.parametrize("targets", [("x", None), ("x", "history[-1]"), (None, "history[0]"), ("out", "noise"),
                                     ("history[0]", "x")])
def test_out_form_in_place_of_inputs_writes_what_the_op_returns(device, dtype, shape, num_history, targets,
                                                                three_threads):
    """An output buffer that is an input itself (x_next=x, m0=history[-1]: a loop stepping in place) gets exactly
    what multistep_step returns from the inputs' values before the step, from the op and from its twin."""
    for impl, step in ((ops.multistep_step_out, ops.multistep_step),
                       (reference.multistep_step_out, reference.multistep_step)):
        x, out, history, coeffs, noise = make_case(shape, dtype, device, num_history, True)
        inputs = {"x": x, "out": out, "noise": noise, **{f"history[{k}]": h for k, h in enumerate(history)},
                  "history[-1]": history[-1]}
        want = step(x, out, history, coeffs, noise)
        fresh = out_buffers(x, out, history, noise, True)
        x_next, m0 = (fresh[k] if name is None else inputs[name] for k, name in enumerate(targets))
        impl(x, out, history, coeffs, noise, x_next=x_next, m0=m0)
        assert torch.equal(x_next, want[0]) and torch.equal(m0, want[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (2, 4, 17, 33), (3 * 32768 + 5,)])  # the last: three threads' chunks
@pytest.mark.parametrize("bad", ["none", "nan", "inf", "-inf", "overflow"])
@pytest.mark.parametrize("in_place", [False, True])
def test_out_form_finite_flag_is_isfinite_of_x_next(device, dtype, shape, bad, in_place, three_threads):
    """`finite` ends False exactly when x_next holds a NaN or an infinity, wherever it is (the first element,
    one in a later thread's chunk, the last), including a value finite in the arithmetic that overflows in the
    stored dtype; a flag already False stays False; x_next and m0 are written as without the flag."""
    n = math.prod(shape)

    def case(where):
        x, out, history, coeffs, noise = make_case(shape, dtype, device, 2, True)
        if bad == "overflow":
            x.view(-1)[where] = torch.finfo(dtype).max
            coeffs[0] = 4.0  # a: x_next = 4 x + (terms of order one) overflows in the stored dtype
        elif bad != "none":
            x.view(-1)[where] = float(bad)
        return x, out, history, coeffs, noise

    for impl, step in ((ops.multistep_step_out, ops.multistep_step),
                       (reference.multistep_step_out, reference.multistep_step)):
        for where in sorted({0, n // 2 + 3, n - 1}):
            want = step(*case(where))
            for start in (True, False):
                x, out, history, coeffs, noise = case(where)
                x_next, m0 = (x, history[-1]) if in_place else out_buffers(x, out, history, noise, True)
                flag = torch.full((), start, dtype=torch.bool, device=device)
                impl(x, out, history, coeffs, noise, x_next=x_next, m0=m0, finite=flag)
                assert_close(x_next, want[0], rtol=0, atol=0, equal_nan=True)
                assert_close(m0, want[1], rtol=0, atol=0, equal_nan=True)
                assert bool(torch.isfinite(x_next).all()) is (bad == "none")
                assert flag.item() is (start and bad == "none"), (impl, where, start)


def test_out_form_is_not_differentiable():
    x, out, history, coeffs, noise = make_case((3, 4), torch.float32, "cpu", 1, False)
    with pytest.raises(RuntimeError, match="multistep_step_out: is not differentiable"):
        ops.multistep_step_out(x.requires_grad_(), out, history, coeffs, x_next=torch.empty(3, 4))
    with torch.no_grad():
        ops.multistep_step_out(x, out, history, coeffs, x_next=torch.empty(3, 4))


# torch.func transforms and forward-mode AD: the fused kernels' autograd formula is reverse mode only, so these
# run the twin; without that, forward mode dropped the tangents (zeros from torch.func.jvp, None from forward_ad).

def step_closed_form(coeffs, x, out, history, noise):
    """The step in float64 from its formula: ``m0 = p x + q out``, ``x_next = a x + b0 m0 + sum b_k m_k + c noise``
    (linear in the tensors, so also the tangent map)."""
    a, b0, b1, b2, c, p, q, *wide = coeffs.tolist()
    m0 = p * x + q * out
    x_next = a * x + b0 * m0 + sum(b * h for b, h in zip((b1, b2, *wide), history))
    return x_next + c * noise if noise is not None else x_next, m0


@pytest.mark.parametrize("num_history,noisy", [(0, False), (1, True), (2, False), (3, True)])
def test_forward_mode_ad_matches_closed_form(num_history, noisy):
    x, out, history, coeffs, noise = make_case((3, 5), torch.float64, "cpu", num_history, noisy)
    primals = (x, out[:1], *history, *([noise] if noisy else []))  # out broadcast
    tangents = tuple(torch.randn_like(t) for t in primals)

    def unpack(ts):
        return ts[0], ts[1], list(ts[2:2 + num_history]), ts[-1] if noisy else None

    def step(*ts):
        x, out, hist, nz = unpack(ts)
        return ops.multistep_step(x, out, hist, coeffs, nz)

    want_primal = step_closed_form(coeffs, *unpack(primals))
    want_tangent = step_closed_form(coeffs, *unpack(tangents))
    got_primal, got_tangent = torch.func.jvp(step, primals, tangents)
    for got, want in zip((*got_primal, *got_tangent), (*want_primal, *want_tangent)):
        assert_close(got, want.expand(3, 5), rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        for got, want in zip(step(*duals), want_tangent):
            tangent = torch.autograd.forward_ad.unpack_dual(got).tangent
            assert tangent is not None
            assert_close(tangent, want.expand(3, 5), rtol=1e-12, atol=1e-12)


def test_torch_func_transforms_match_autograd():
    x, out, (m1,), coeffs, noise = make_case((4, 3), torch.float64, "cpu", 1, True)

    def loss(x, out):
        x_next, m0 = ops.multistep_step(x, out, [m1], coeffs, noise)
        return (x_next.sin() * m0).sum()

    xr, outr = x.clone().requires_grad_(), out.clone().requires_grad_()
    want = torch.autograd.grad(loss(xr, outr), (xr, outr))  # the fused backward (gradcheck'd above)
    for got in (torch.func.grad(loss, argnums=(0, 1))(x, out),
                (torch.func.jacrev(loss, argnums=(0, 1))(x, out)), torch.func.jacfwd(loss, argnums=(0, 1))(x, out)):
        for g, w in zip(got, want):
            assert_close(g, w, rtol=1e-12, atol=1e-12)
    hess = torch.func.hessian(loss)(x, out)
    want_hess = torch.autograd.functional.hessian(lambda x: loss(x, out), x)
    assert_close(hess, want_hess, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save_m0", [True, False])
def test_vmap_matches_a_loop(save_m0):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)  # vmapped along dim 0
    out = torch.randn(3, 4, generator=g, dtype=torch.float64)  # vmapped along dim 1, logically (3,)
    m1 = torch.randn(5, 1, generator=g, dtype=torch.float64)  # not vmapped, broadcast
    noise = torch.randn((), dtype=torch.float64)
    coeffs = torch.randn(4, 7, generator=g, dtype=torch.float64)

    def step(x, out, coeffs):
        return ops.multistep_step(x, out, [m1], coeffs, noise, save_m0)

    for in_dims, rows in (((0, 1, None), [coeffs[0]] * 4), ((0, 1, 0), list(coeffs))):
        got = torch.func.vmap(step, in_dims=in_dims)(x, out, coeffs if in_dims[2] == 0 else coeffs[0])
        loop = [step(x[i], out[:, i], rows[i]) for i in range(4)]
        assert_close(got[0], torch.stack([r[0] for r in loop]), rtol=1e-12, atol=1e-12)
        if save_m0:
            assert_close(got[1], torch.stack([r[1] for r in loop]), rtol=1e-12, atol=1e-12)
        else:
            assert got[1].numel() == 0


def test_coefficients_that_require_grad_get_their_gradient():
    x, out, (m1, m2), coeffs, noise = make_case((4, 3), torch.float64, "cpu", 2, True)
    w, u = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    c = coeffs.clone().requires_grad_()
    x_next, m0 = ops.multistep_step(x, out, [m1, m2], c, noise)
    (grad,) = torch.autograd.grad((w * x_next).sum() + (u * m0).sum(), c)
    a, b0, b1, b2, cc, p, q = coeffs.tolist()
    m0_want = p * x + q * out
    total = b0 * w + u  # the adjoint of m0
    want = [(w * x).sum(), (w * m0_want).sum(), (w * m1).sum(), (w * m2).sum(), (w * noise).sum(),
            (total * x).sum(), (total * out).sum()]
    assert_close(grad, torch.stack(want), rtol=1e-12, atol=1e-12)


def test_out_form_refuses_transforms_and_tangents():
    x, out, history, coeffs, noise = make_case((3, 4), torch.float32, "cpu", 1, False)
    with pytest.raises(RuntimeError, match="multistep_step_out: is not supported under torch.func"):
        torch.func.jvp(lambda x: ops.multistep_step_out(x, out, history, coeffs, x_next=torch.empty(3, 4)), (x,),
                       (torch.ones_like(x),))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="multistep_step_out: .*forward-mode AD tangent"):
            ops.multistep_step_out(dual, out, history, coeffs, x_next=torch.empty(3, 4))
        ops.multistep_step_out(x, out, history, coeffs, x_next=torch.empty(3, 4))  # no tangent: runs


@pytest.mark.parametrize("impl", [ops.multistep_step_out, reference.multistep_step_out])
def test_out_form_bumps_the_version_of_what_it_writes(impl):
    """As torch's in-place ops: a backward through a tensor saved before the op overwrote it raises, instead of
    differentiating with the new values (the fused op wrote behind autograd's back: a silently wrong gradient)."""
    x, out, (m1,), coeffs, _ = make_case((3, 4), torch.float32, "cpu", 1, False)
    for name in ("x_next", "m0"):
        w = torch.ones(3, 4, requires_grad=True)
        saved = w * 2
        loss = (saved * saved).sum()  # saves `saved` for w's gradient
        buffers = dict(x_next=torch.empty(3, 4), m0=torch.empty(3, 4), finite=torch.ones((), dtype=torch.bool))
        buffers[name] = saved
        versions = {key: t._version for key, t in buffers.items()}
        with torch.no_grad():
            impl(x, out, [m1], coeffs, **buffers)
        assert all(t._version > versions[key] for key, t in buffers.items())
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_out_form_refuses_a_buffer_that_requires_grad():
    x, out, history, coeffs, _ = make_case((3, 4), torch.float32, "cpu", 1, False)
    for name in ("x_next", "m0"):
        buffers = dict(x_next=torch.empty(3, 4), m0=torch.empty(3, 4))
        buffers[name] = torch.zeros(3, 4, requires_grad=True)
        with pytest.raises(RuntimeError, match="multistep_step_out: is not differentiable, but an input or output"):
            ops.multistep_step_out(x, out, history, coeffs, **buffers)
        with torch.no_grad():  # as torch's in-place ops, allowed without grad mode
            ops.multistep_step_out(x, out, history, coeffs, **buffers)
