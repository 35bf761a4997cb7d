"""Consistency-trajectory (gamma) sampling and the score_from_ctm adapter, with the exact Gaussian flow map as the
two-time model (docs/math.md sections 6 and 8)."""

import math

import pytest
import torch
from torch.testing import assert_close

import adjointdeis as ad
from gaussian import GaussianEps, per_dimension

DIM = 3
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


class GaussianCTM(torch.nn.Module):
    """The exact two-time model of data ~ N(mu, diag(s^2)) on the EDM schedule (alpha = 1, sigma = t).

    The jump is the closed-form flow map ``Phi(x, t, u) = mu + (x - mu) k(u)/k(t)``, ``k(t) = sqrt(s^2 + t^2)``;
    output="g" returns CTM's ``g = (Phi - (u/t) x) / (1 - u/t)``, which at ``u = t`` is the denoiser
    ``mu + (x - mu) s^2 / (s^2 + t^2)``. With ``cond`` the mean is ``mu + cond``.
    """

    def __init__(self, mu, s, output="g"):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.as_tensor(mu, dtype=torch.float64).clone())
        self.s = torch.nn.Parameter(torch.as_tensor(s, dtype=torch.float64).clone())
        self.output = output

    def forward(self, x, t, u, cond=None):
        shape = (-1,) + (1,) * (x.dim() - 1)
        t, u = t.to(torch.float64).view(shape), u.to(torch.float64).view(shape)
        mu = self.mu if cond is None else self.mu + cond
        s2 = self.s**2
        jump = mu + (x - mu) * torch.sqrt((s2 + u**2) / (s2 + t**2))
        if self.output == "jump":
            return jump.to(x.dtype)
        same = u == t
        ratio = u / t
        g = (jump - ratio * x) / torch.where(same, torch.ones_like(ratio), 1 - ratio)
        return torch.where(same, mu + (x - mu) * s2 / (s2 + t**2), g).to(x.dtype)


@pytest.fixture(scope="module")
def gaussian():
    mu, s = per_dimension(DIM, seed=3)
    return mu, s, GaussianEps(ad.EDMSchedule(SIGMA_MIN, SIGMA_MAX), mu, s)


def noise(batch, dtype=torch.float64, seed=0):
    return SIGMA_MAX * torch.randn(batch, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def karras(steps, to_zero=False):
    sigmas = ad.EDMSchedule(SIGMA_MIN, SIGMA_MAX).timesteps(steps, "karras")
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if to_zero else sigmas


@pytest.mark.parametrize("output", ["g", "jump"])
@pytest.mark.parametrize("steps", [1, 2, 5, 17])
@pytest.mark.parametrize("to_zero", [False, True])
def test_gamma_zero_reproduces_the_exact_ode_solution(gaussian, output, steps, to_zero):
    mu, s, oracle = gaussian
    x_T = noise(64)
    sigmas = karras(steps, to_zero)
    with torch.no_grad():
        got = ad.sample_ctm(GaussianCTM(mu, s, output), x_T, sigmas, gamma=0.0, output=output)
        want = oracle.flow_map(x_T, SIGMA_MAX, float(sigmas[-1]))
    assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_gamma_zero_in_float32(gaussian):
    mu, s, oracle = gaussian
    x_T = noise(64)
    with torch.no_grad():
        got = ad.sample_ctm(GaussianCTM(mu, s), x_T.float(), karras(5), gamma=0.0)
        want = oracle.flow_map(x_T, SIGMA_MAX, SIGMA_MIN)
    assert got.dtype == torch.float32
    assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def z_scores(samples, mean, var):
    """Per-dimension z-scores of the sample mean and the sample variance against Gaussian N(mean, var)."""
    n = samples.shape[0]
    z_mean = (samples.mean(0) - mean) / torch.sqrt(var / n)
    z_var = (samples.var(0) - var) / (var * math.sqrt(2.0 / (n - 1)))
    return torch.cat([z_mean, z_var]).abs()


@pytest.mark.parametrize("gamma", [0.5, 1.0])
@pytest.mark.parametrize("output", ["g", "jump"])
def test_stochastic_sampling_matches_the_distribution(gaussian, gamma, output):
    mu, s, _ = gaussian
    n, steps = 20_000, 4
    x_T = noise(n, seed=1)
    sigmas = karras(steps)
    u_last = math.sqrt(1 - gamma**2) * SIGMA_MIN  # the last jump lands at u and adds no noise: x ~ N(mu, s^2 + u^2)
    with torch.no_grad():
        x = ad.sample_ctm(GaussianCTM(mu, s, output), x_T, sigmas, gamma=gamma, output=output,
                          generator=torch.Generator().manual_seed(2))
        # 5 standard errors: a false alarm has probability ~ 6e-7 per statistic.
        assert z_scores(x, mu, s**2 + u_last**2).max() < 5.0
        # The same test catches a model whose data scale is 5% off (power check of the tolerance).
        wrong = ad.sample_ctm(GaussianCTM(mu, 1.05 * s, output), x_T, sigmas, gamma=gamma, output=output,
                              generator=torch.Generator().manual_seed(2))
        assert z_scores(wrong, mu, s**2 + u_last**2).max() > 5.0


def test_conditioning_is_passed_to_the_model(gaussian):
    mu, s, oracle = gaussian
    x_T = noise(16)
    shift = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    with torch.no_grad():
        got = ad.sample_ctm(GaussianCTM(mu, s), x_T, karras(3), cond=shift)
        want = oracle.flow_map(x_T, SIGMA_MAX, SIGMA_MIN, cond=shift)
    assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_gradients_flow_through_sample_ctm(gaussian):
    mu, s, _ = gaussian
    oracle = GaussianEps(ad.EDMSchedule(SIGMA_MIN, SIGMA_MAX), mu, s)
    x_T = noise(4).requires_grad_()
    model = GaussianCTM(mu, s)
    weights = torch.randn(4, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (ad.sample_ctm(model, x_T, karras(4)) * weights).sum().backward()
    exact_x_T = x_T.detach().clone().requires_grad_()
    (oracle.flow_map(exact_x_T, SIGMA_MAX, SIGMA_MIN) * weights).sum().backward()
    assert_close(x_T.grad, exact_x_T.grad, rtol=1e-10, atol=1e-12)
    assert_close(model.mu.grad, oracle.mu.grad, rtol=1e-10, atol=1e-12)
    assert_close(model.s.grad, oracle.s.grad, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph(gaussian):
    mu, s, _ = gaussian
    model = GaussianCTM(mu, s)
    sigmas = karras(4).tolist()
    x_T = noise(8).float()

    def run(x):
        return ad.sample_ctm(model, x, sigmas, gamma=0.0)

    with torch.no_grad():
        assert_close(torch.compile(run, fullgraph=True)(x_T), run(x_T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output", ["g", "jump"])
def test_score_from_ctm_is_the_denoiser(gaussian, output):
    mu, s, oracle = gaussian
    denoiser = ad.score_from_ctm(GaussianCTM(mu, s, output), output=output)
    x = noise(32) / 10
    t = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64).repeat(8)
    with torch.no_grad():
        want = x - t[:, None] * oracle(x, t)
        assert_close(denoiser(x, t), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("output", ["g", "jump"])
def test_score_from_ctm_with_sample_converges_to_the_exact_solution(gaussian, output):
    mu, s, oracle = gaussian
    sched = ad.EDMSchedule(SIGMA_MIN, SIGMA_MAX)
    denoiser = ad.score_from_ctm(GaussianCTM(mu, s, output), output=output)
    x_T = noise(64)
    errors = []
    with torch.no_grad():
        want = oracle.flow_map(x_T, SIGMA_MAX, SIGMA_MIN)
        for steps in (20, 40, 80, 160):
            got = ad.sample(denoiser, x_T, sched, steps=steps, solver="dpmpp", order=2, spacing="karras",
                            prediction="x0")
            errors.append(float((got - want).abs().max()))
    assert all(later < earlier / 3 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 2e-3, errors


def test_score_from_ctm_gradients_match_the_eps_oracle(gaussian):
    """grad="discrete" through ad.sample on the jump-form adapter (forward-mode dG/du inside the reverse pass)
    equals the gradient of the same sampler on the exact noise prediction: x_T, the conditioning and parameters."""
    mu, s, _ = gaussian
    sched = ad.EDMSchedule(SIGMA_MIN, SIGMA_MAX)
    weights = torch.randn(4, DIM, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    shift = torch.full((DIM,), 0.25, dtype=torch.float64)
    grads = []
    for model, prediction in ((ad.score_from_ctm(GaussianCTM(mu, s, "jump"), output="jump"), "x0"),
                              (GaussianEps(sched, mu, s), "eps")):
        x_T = noise(4).requires_grad_()
        cond = shift.clone().requires_grad_()
        x0 = ad.sample(model, x_T, sched, steps=6, solver="dpmpp", order=2, spacing="karras", prediction=prediction,
                       cond=cond, grad="discrete")
        (x0 * weights).sum().backward()
        params = dict(model.named_parameters())
        grads.append([x_T.grad, cond.grad, params[next(k for k in params if k.endswith("mu"))].grad,
                      params[next(k for k in params if k.endswith(".s") or k == "s")].grad])
    for got, want in zip(*grads):
        assert got is not None and float(want.abs().max()) > 0
        assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), "1"])
def test_gamma_outside_the_unit_interval(gaussian, gamma):
    mu, s, _ = gaussian
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0 and <= 1"):
        ad.sample_ctm(GaussianCTM(mu, s), noise(2), karras(2), gamma=gamma)


def test_wrong_output_shape_names_the_model_and_the_shapes(gaussian):
    def truncating_model(x, t, u):
        return x[:, :2]

    with pytest.raises(ValueError, match=r"truncating_model returned shape \[2, 2\] for x of shape \[2, 3\]"):
        ad.sample_ctm(truncating_model, noise(2), karras(2))
    with pytest.raises(ValueError, match=r"truncating_model returned shape \[2, 2\]"):
        ad.score_from_ctm(truncating_model)(noise(2), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "sigmas,message",
    [
        ([80.0, 10.0, 10.0, 1.0], r"strictly decreasing; sigmas\[2\]=10.0 >= sigmas\[1\]=10.0"),
        ([1.0, 2.0], "strictly decreasing"),
        ([80.0, 1.0, -0.5], r"sigmas must be >= 0; sigmas\[2\]=-0.5"),
        ([80.0], "at least 2 noise levels"),
        ([80.0, float("inf"), 1.0], "finite"),
        (torch.ones(2, 2), "1-D"),
        (torch.tensor([3, 2, 1]), "floating-point"),
        ("abc", "sequence of numbers"),
    ],
)
def test_bad_sigmas(gaussian, sigmas, message):
    mu, s, _ = gaussian
    with pytest.raises(ValueError, match=message):
        ad.sample_ctm(GaussianCTM(mu, s), noise(2), sigmas)


def test_unknown_output(gaussian):
    mu, s, _ = gaussian
    with pytest.raises(ValueError, match="output must be one of 'g', 'jump'; got output='x0'"):
        ad.sample_ctm(GaussianCTM(mu, s), noise(2), karras(2), output="x0")
    with pytest.raises(ValueError, match="output must be one of 'g', 'jump'; got output='x0'"):
        ad.score_from_ctm(GaussianCTM(mu, s), output="x0")
