"""Conservativity diagnostics (docs/math.md section 9): zero for an exact score, the closed form for a rotated field,
clearly nonzero for the shipped digits model."""

import math

import pytest
import torch
from torch.testing import assert_close

import adjointdeis as ad
from adjointdeis import diagnostics
from gaussian import GaussianEps, per_dimension

DIM = 16
T = 0.4


@pytest.fixture(scope="module")
def setup():
    sched = ad.VPSchedule.linear()
    mu, s = per_dimension(DIM, seed=4)
    x = torch.randn(12, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sched, mu, s, x


class RotatedEps(torch.nn.Module):
    """The Gaussian's exact eps plus ``c K (x - mu)`` with K antisymmetric: a field that is not a gradient."""

    def __init__(self, sched, mu, s, K, c):
        super().__init__()
        self.exact, self.mu, self.K, self.c = GaussianEps(sched, mu, s), mu, K, c

    def forward(self, x, t):
        return self.exact(x, t) + self.c * (x - self.mu) @ self.K.T


def rotation(seed=1):
    a = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (a - a.T) / math.sqrt(2 * DIM)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_exact_gaussian_score_is_conservative(setup, prediction):
    sched, mu, s, x = setup
    with torch.no_grad():
        model = GaussianEps(sched, mu, s)
    if prediction != "eps":
        model = ad.PredictionAdapter(model, sched, "eps", prediction)
    g = torch.Generator().manual_seed(3)
    asym = diagnostics.jacobian_asymmetry(model, x, T, probes=8, schedule=sched, prediction=prediction, generator=g)
    circ = diagnostics.loop_circulation(model, x, T, radius=0.5, points=16, schedule=sched, prediction=prediction,
                                        generator=g)
    # Rounding only: ||J - J^T||^2 / ||J||^2 ~ 1e-16 gives a ratio ~ 1e-8.
    assert asym.per_sample.shape == (12,) and asym.estimate < 1e-6 and float(asym.per_sample.max()) < 1e-6
    assert circ.per_sample.shape == (12,) and circ.estimate < 1e-12


def test_eps_model_needs_no_schedule(setup):
    sched, mu, s, x = setup
    model = GaussianEps(sched, mu, s).requires_grad_(False)
    asym = diagnostics.jacobian_asymmetry(model, x, T, probes=4)
    assert asym.estimate < 1e-6


def test_rotated_field_matches_its_closed_form(setup):
    sched, mu, s, x = setup
    K, c = rotation(), 0.3
    model = RotatedEps(sched, mu, s, K, c)
    t = torch.tensor(T, dtype=torch.float64)
    alpha, sigma = float(sched.alpha(t)), float(sched.sigma(t))
    D = sigma / (alpha**2 * s**2 + sigma**2)
    want = 2 * c * K.norm() / torch.sqrt((D**2).sum() + c**2 * K.norm() ** 2)

    asym = diagnostics.jacobian_asymmetry(model, x.repeat(8, 1), T, probes=64, schedule=sched,
                                          generator=torch.Generator().manual_seed(5))
    assert 0.3 < float(want) < 0.9
    assert asym.stderr < 0.02 * float(want)
    assert abs(asym.estimate - float(want)) < 5 * asym.stderr

    # Circulation: with s = -eps/sigma, J_s - J_s^T = -(2c/sigma) K, so C = pi r^2 e2.(J_s - J_s^T) e1 exactly;
    # the normaliser integral |s . dl| by fine quadrature of the closed-form field.
    radius = 0.3
    planes = diagnostics.random_planes(x, torch.Generator().manual_seed(6))
    circ = diagnostics.loop_circulation(model, x, T, radius=radius, points=64, schedule=sched, planes=planes)
    e1, e2 = planes[:, 0], planes[:, 1]
    exact = -(2 * math.pi * radius**2 * c / sigma) * ((e2 @ K) * e1).sum(1)
    theta = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)[:-1, None, None]
    pos = x + radius * (theta.cos() * e1 + theta.sin() * e2)
    field = -(D * (pos - alpha * mu) / sigma + c * (pos - mu) @ K.T / sigma)
    dl = radius * (theta.cos() * e2 - theta.sin() * e1)
    normaliser = (field * dl).sum(-1).abs().mean(0) * 2 * math.pi
    want_loops = exact / normaliser
    assert float(want_loops.abs().mean()) > 0.02
    assert_close(circ.per_sample, want_loops, rtol=2e-3, atol=1e-6)
    assert math.isclose(circ.estimate, float(want_loops.abs().mean()), rel_tol=2e-3)
    assert math.isclose(circ.stderr, float(want_loops.abs().std() / math.sqrt(len(x))), rel_tol=2e-2)


def test_batch_of_one_reports_the_probe_jackknife(setup):
    sched, mu, s, x = setup
    model = RotatedEps(sched, mu, s, rotation(), 0.3)
    one = diagnostics.jacobian_asymmetry(model, x[:1], T, probes=32, schedule=sched,
                                         generator=torch.Generator().manual_seed(2))
    assert one.stderr == float(one.per_sample_stderr[0]) > 0


def test_probes_are_batched_into_one_model_call(setup):
    sched, mu, s, x = setup
    calls = []
    exact = GaussianEps(sched, mu, s).requires_grad_(False)

    def counted(y, t):
        calls.append(y.shape[0])
        return exact(y, t)

    diagnostics.jacobian_asymmetry(counted, x, T, probes=5, schedule=sched)
    diagnostics.loop_circulation(counted, x, T, points=7, schedule=sched)
    assert calls == [5 * len(x), 7 * len(x)]


@pytest.fixture(scope="module")
def digits():
    from adjointdeis import zoo
    from adjointdeis.zoo.data import load_digits_split

    entry = zoo.load("digits")
    entry.model.requires_grad_(False)
    _, _, test_x, test_y = load_digits_split()
    return entry, test_x[:24], test_y[:24]


def test_digits_model_is_clearly_not_conservative(digits):
    entry, x0, labels = digits
    t = 50
    tt = torch.tensor(float(t), dtype=torch.float64)
    x = float(entry.schedule.alpha(tt)) * x0 + float(entry.schedule.sigma(tt)) * torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(0))
    asym = diagnostics.jacobian_asymmetry(entry.model, x, t, probes=8, schedule=entry.schedule, cond=labels,
                                          generator=torch.Generator().manual_seed(1))
    circ = diagnostics.loop_circulation(entry.model, x, t, radius=1.0, points=16, schedule=entry.schedule,
                                        cond=labels, generator=torch.Generator().manual_seed(2))
    # Measured 0.125 +- 0.004 and 0.046 +- 0.006 (32 digits); the exact Gaussian score gives < 1e-6 and < 1e-12.
    assert asym.estimate > 0.05 and asym.estimate > 10 * asym.stderr
    # The circulation is mean |C| over random planes: zero for a true score whatever the planes, so 4 standard
    # errors above zero is a clear (one-sided p ~ 3e-5) nonzero.
    assert circ.estimate > 0.01 and circ.estimate > 4 * circ.stderr


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(probes=1), ValueError, "probes must be an integer >= 2"),
        (dict(prediction="score"), ValueError, "unknown prediction"),
        (dict(prediction="x0", schedule=None), ValueError, "needs the schedule"),
        (dict(t=torch.ones(3)), ValueError, r"t must be a number or a \(batch,\)"),
        (dict(x=torch.ones(4, 2, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(model=lambda x, t: x[:, :1]), ValueError, "the model returned shape"),
        (dict(model=lambda x, t: x.to(torch.complex128)), TypeError, "the model must return a real floating-point"),
        (dict(model=lambda x, t: x.round().long()), TypeError, "the model must return a real floating-point"),
        (dict(model=lambda x, t: [0.0]), TypeError, "the model must return a real floating-point"),
        (dict(cond=3), TypeError, "cond must be None, a tensor or a dict of tensors"),
        (dict(cond={"labels": 3}), TypeError, "cond must be None, a tensor or a dict of tensors"),
        (dict(generator=3), TypeError, "generator must be a torch.Generator"),
        (dict(t="a"), TypeError, r"t must be a number or a \(batch,\)"),
        (dict(x=torch.ones(0, DIM, dtype=torch.float64)), ValueError, "at least one sample"),
        (dict(t=0.0), ValueError, r"t\[0\]=0.0 has sigma_t = 0"),
        (dict(t=torch.tensor([0.5, 0.4, 0.0, 0.3])), ValueError, r"t\[2\]=0.0 has sigma_t = 0"),
    ],
)
def test_bad_arguments(setup, kwargs, error, message):
    sched, mu, s, x = setup
    args = dict(model=GaussianEps(sched, mu, s).requires_grad_(False), x=x[:4], t=T, schedule=sched)
    args.update(kwargs)
    probes = args.pop("probes", 4)
    with pytest.raises(error, match=message):
        diagnostics.jacobian_asymmetry(args.pop("model"), args.pop("x"), args.pop("t"), probes=probes, **args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(points=2), "points must be an integer >= 3"),
        (dict(radius=0.0), "radius must be a finite number > 0"),
        (dict(radius=True), "radius must be a finite number > 0"),
        (dict(planes=torch.zeros(4, 3, DIM)), "planes must have shape"),
        (dict(planes="e1 e2"), "planes must be a real floating-point tensor"),
        (dict(planes=torch.zeros(4, 2, DIM, dtype=torch.float64)), "planes must hold two orthonormal directions"),
        (dict(planes=torch.ones(4, 2, DIM, dtype=torch.float64) / 4), "planes must hold two orthonormal directions"),
        (dict(t=0.0), "has sigma_t = 0"),
        (dict(model=lambda x, t: x.to(torch.complex128)), "the model must return a real floating-point"),
        (dict(model=lambda x, t: x.round().long()), "the model must return a real floating-point"),
    ],
)
def test_bad_loop_arguments(setup, kwargs, message):
    sched, mu, s, x = setup
    t, model = kwargs.pop("t", T), kwargs.pop("model", GaussianEps(sched, mu, s))
    with pytest.raises(ValueError, match=message):
        diagnostics.loop_circulation(model, x[:4], t, schedule=sched, **kwargs)


def test_numpy_and_tensor_numbers_are_accepted(setup):
    """probes, points and radius may be NumPy numbers or 0-d tensors (as elsewhere in the API), with the same
    result as Python numbers."""
    import numpy as np

    sched, mu, s, x = setup
    model = RotatedEps(sched, mu, s, rotation(), 0.3)
    planes = diagnostics.random_planes(x, torch.Generator().manual_seed(6))
    want = diagnostics.loop_circulation(model, x, T, radius=0.5, points=8, schedule=sched, planes=planes)
    for radius, points in ((np.float32(0.5), np.int64(8)), (torch.tensor(0.5), 8)):
        got = diagnostics.loop_circulation(model, x, T, radius=radius, points=points, schedule=sched, planes=planes)
        assert torch.equal(got.per_sample, want.per_sample)
    want = diagnostics.jacobian_asymmetry(model, x, T, probes=4, schedule=sched,
                                          generator=torch.Generator().manual_seed(1))
    got = diagnostics.jacobian_asymmetry(model, x, T, probes=np.int64(4), schedule=sched,
                                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(got.per_sample, want.per_sample)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_asymmetry_under_no_grad_and_inference_mode(setup, context):
    """The JVPs and VJPs run whatever the caller's context: under inference_mode the asymmetry was nan for an exact
    score and wrong for a rotated field, silently. The same values as outside, for points made in that context."""
    sched, mu, s, x = setup
    model = RotatedEps(sched, mu, s, rotation(), 0.3)
    want = diagnostics.jacobian_asymmetry(model, x, T, probes=4, schedule=sched,
                                          generator=torch.Generator().manual_seed(1))
    with context():
        inside = x.clone()
        got = diagnostics.jacobian_asymmetry(model, inside, T, probes=4, schedule=sched,
                                             generator=torch.Generator().manual_seed(1))
    assert want.estimate > 0.1
    assert_close(got.per_sample, want.per_sample, rtol=1e-12, atol=0)


def test_asymmetry_refuses_a_model_without_reverse_mode_gradients(setup):
    sched, mu, s, x = setup
    exact = GaussianEps(sched, mu, s).requires_grad_(False)

    def under_no_grad(y, t):
        with torch.no_grad():
            return exact(y, t)

    with pytest.raises(ValueError, match="no reverse-mode one"):
        diagnostics.jacobian_asymmetry(under_no_grad, x, T, probes=4, schedule=sched)


@pytest.mark.cuda
def test_conservativity_table_on_cuda_equals_the_cpu_table(setup):
    """The table's noise is drawn on the CPU and moved to the data's device (it was added to CUDA data as a CPU
    tensor): the same rows on both devices, for a field that is far from conservative (values well above
    rounding)."""
    sched, mu, s, x = setup
    field = torch.eye(DIM, dtype=torch.float64) + 0.3 * rotation()
    tables = []
    for device in ("cpu", "cuda"):
        m, f = mu.to(device), field.to(device)
        tables.append(diagnostics.conservativity_table({"rotated": (lambda y, t: (y - m) @ f.T, "eps")}, sched,
                                                       x.to(device), [0.3, 0.7], probes=4, points=8, radius=0.5))
    for cpu, cuda in zip(*tables):
        assert cpu.asymmetry.estimate > 0.1 and cpu.circulation.estimate > 1e-3
        assert math.isclose(cpu.asymmetry.estimate, cuda.asymmetry.estimate, rel_tol=1e-9)
        assert math.isclose(cpu.circulation.estimate, cuda.circulation.estimate, rel_tol=1e-9)
