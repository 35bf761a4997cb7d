"""Flow matching end to end: every solver and gradient mode with a flow-prediction model on
FlowSchedule, against the closed-form Gaussian oracle (docs/math.md sections 1, 2, 4 and 6)."""

import math

import pytest
import torch
from torch.testing import assert_close

import adjointdeis as ad
from gaussian import GaussianEps, GaussianFlow, per_dimension
from nets import TinyConvNet

SOLVERS = [("ddim", 1), ("deis", 1), ("deis", 2), ("deis", 3), ("dpmpp", 1), ("dpmpp", 2), ("dpmpp", 3),
           ("heun", 2)]


def flow_oracle(shift=1.0, dim=6, batch=8, seed=0, **schedule_kwargs):
    """(schedule, eps oracle, the same data's exact flow-prediction model, x_T); both models share
    the parameters mu and s."""
    sched = ad.FlowSchedule(shift, **schedule_kwargs)
    flow = GaussianFlow(sched, *per_dimension(dim, seed))
    eps = GaussianEps(sched, *per_dimension(dim, seed))
    eps.mu, eps.s = flow.mu, flow.s
    x_T = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return sched, eps, flow, x_T


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("solver,order", SOLVERS)
def test_every_solver_reaches_the_exact_flow_map(solver, order, shift):
    sched, eps, flow, x_T = flow_oracle(shift)
    ts = sched.timesteps(100)
    with torch.no_grad():
        exact = eps.flow_map(x_T, ts[0], ts[-1])
        x = ad.sample(flow, x_T, sched, steps=100, solver=solver, order=order, prediction="flow")
    # Errors at N = 100: first order ~3e-2, second order and up ~1e-3 or less.
    assert (x - exact).abs().max() < (5e-2 if order == 1 else 3e-3), (x - exact).abs().max()


def test_heun_integrates_the_flow_ode_in_t():
    """On a FlowSchedule, Heun is the plain Heun method for dx/dt = v(x, t) with a last Euler step."""
    torch.manual_seed(0)
    net = TinyConvNet().double()
    x_T = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    sched = ad.FlowSchedule(shift=3.0, t_max=1.0)
    ts = sched.timesteps(6, "uniform")
    assert ts[0].item() == 1.0  # from pure noise: possible for Heun in flow variables
    with torch.no_grad():
        x = x_T
        for i in range(6):
            dt = ts[i + 1] - ts[i]
            v = net(x, ts[i].expand(3))
            pred = x + dt * v
            x = pred if i == 5 else x + dt / 2 * (v + net(pred, ts[i + 1].expand(3)))
        ours = ad.sample(net, x_T, sched, solver="heun", prediction="flow", spacing="uniform", steps=6)
    assert_close(ours, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpmpp", 2), ("dpmpp", 3), ("heun", 2)])
def test_start_at_t_one(solver, order):
    """From t = 1 (pure noise; lambda = -inf) on a uniform grid, converging to the exact map at the
    solver's order (dpmpp 3M as published is globally second order)."""
    sched, eps, flow, x_T = flow_oracle(3.0, t_max=1.0, t_min=1e-2)
    errors = []
    for n in (50, 200):
        ts = sched.timesteps(n, "uniform")
        with torch.no_grad():
            exact = eps.flow_map(x_T, 1.0, ts[-1])
            x = ad.sample(flow, x_T, sched, steps=n, solver=solver, order=order, prediction="flow", spacing="uniform")
        errors.append((x - exact).abs().max().item())
    # 4x the steps: error / 4 at first order, / 16 at second.
    assert errors[1] < errors[0] / (3 if order == 1 else 10), errors


@pytest.mark.parametrize("order,steps", [(1, 800), (2, 200)])
def test_sde_matches_the_data_distribution(order, steps):
    sched, eps, flow, _ = flow_oracle(2.0, dim=4)
    mu, s = eps.mu.detach(), eps.s.detach()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 4, dtype=torch.float64, generator=g)
    with torch.no_grad():
        x = ad.sample(flow, x_T, sched, steps=steps, solver="dpmpp", order=order, sde=True, generator=g,
                      prediction="flow")
    # The law at t_min: N(alpha mu, alpha^2 s^2 + sigma^2); standard errors over 20k samples.
    alpha, sigma = sched.alpha(sched.t_min).item(), sched.sigma(sched.t_min).item()
    std = (alpha**2 * s**2 + sigma**2).sqrt()
    assert ((x.mean(0) - alpha * mu).abs() < 4 * std / 141 + 0.01 * std).all()
    assert ((x.std(0) - std).abs() < 4 * std / 200 + 0.01 * std).all()


def exact_gradients(eps, x_T, t0, t1, cond):
    """d/d(x_T, cond, mu, s) of sum(flow_map^2), the exact PF-ODE solution."""
    loss = eps.flow_map(x_T, t0, t1, cond).pow(2).sum()
    return torch.autograd.grad(loss, [x_T, cond, eps.mu, eps.s])


def sampled_gradients(eps, flow, x_T, cond, sched, **kwargs):
    x = ad.sample(flow, x_T, sched, cond=cond, prediction="flow", parameters=[eps.mu, eps.s], **kwargs)
    return torch.autograd.grad(x.pow(2).sum(), [x_T, cond, eps.mu, eps.s])


@pytest.mark.parametrize("grad", ["discrete", "autograd"])
@pytest.mark.parametrize("solver", ["dpmpp", "heun"])
def test_exact_gradients_with_a_flow_model(grad, solver):
    sched, eps, flow, x_T = flow_oracle(2.0, batch=4)
    x_T.requires_grad_()
    cond = torch.full((4, 6), 0.2, dtype=torch.float64, requires_grad=True)
    ts = sched.timesteps(200)
    want = exact_gradients(eps, x_T, ts[0], ts[-1], cond)
    got = sampled_gradients(eps, flow, x_T, cond, sched, steps=200, solver=solver, grad=grad)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-3


def test_discrete_equals_autograd_for_a_flow_sde():
    sched, eps, flow, x_T = flow_oracle(2.0, batch=4)
    x_T.requires_grad_()
    cond = torch.full((4, 6), 0.2, dtype=torch.float64, requires_grad=True)
    grads = [sampled_gradients(eps, flow, x_T, cond, sched, steps=8, sde=True, grad=grad,
                               generator=torch.Generator().manual_seed(5)) for grad in ("discrete", "autograd")]
    for g, w in zip(*grads):
        assert relative_error(g, w) < 1e-10


@pytest.mark.parametrize("form", ["eps", "x0"])
def test_adjoint_gradients_converge_with_a_flow_model(form):
    sched, eps, flow, x_T = flow_oracle(2.0, batch=4)
    x_T.requires_grad_()
    cond = torch.full((4, 6), 0.2, dtype=torch.float64, requires_grad=True)
    ts = sched.timesteps(10)
    want = exact_gradients(eps, x_T, ts[0], ts[-1], cond)
    errors = []
    for n in (100, 400):
        got = sampled_gradients(eps, flow, x_T, cond, sched, steps=n, grad="adjoint", adjoint_form=form,
                                adjoint_order=2)
        errors.append(max(relative_error(g, w) for g, w in zip(got, want)))
    # Second order: a 4x finer grid cuts the error ~16x.
    assert errors[1] < errors[0] / 8 and errors[1] < 2e-2, errors


def test_adjoint_from_pure_noise_to_zero_noise():
    """A FlowMatch-style grid, t = 1 down to zero noise: the step to zero noise is differentiated exactly, the
    continuous adjoint (x0 form, 2M) runs on a log-SNR grid of its own after the grid's first step (from t = 1,
    with the exact limit of its coefficients), and converges to the exact gradient of the flow map from 1 to 0."""
    sched, eps, flow, x_T = flow_oracle(1.0, batch=4, t_max=1.0)
    x_T.requires_grad_()
    cond = torch.full((4, 6), 0.2, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad((flow.mu + cond + x_T * flow.s).pow(2).sum(), [x_T, cond, flow.mu, flow.s])
    timesteps = sched.timesteps(40, "uniform")[:-1]  # diffusers' convention: the end is zero noise
    errors = []
    for adjoint_steps in (50, 200):
        got = sampled_gradients(eps, flow, x_T, cond, sched, steps=40, timesteps=timesteps, grad="adjoint",
                                adjoint_form="x0", adjoint_order=2, adjoint_steps=adjoint_steps)
        errors.append(max(relative_error(g, w) for g, w in zip(got, want)))
    assert errors[1] < errors[0] / 5 and errors[1] < 1e-2, errors
    with pytest.raises(ValueError, match="adjoint_form='x0'"):
        sampled_gradients(eps, flow, x_T, cond, sched, steps=40, timesteps=timesteps, grad="adjoint")


def test_adjoint_sde_gradient_with_a_flow_model():
    """The reverse SDE is linear in x for Gaussian data: dx_0/dx_T = (k(t1)/k(t0))^2 alpha(t0)/alpha(t1)."""
    sched, eps, flow, x_T = flow_oracle(1.0, batch=4, dim=3)
    x_T.requires_grad_()
    ts = sched.timesteps(10)
    t0, t1 = ts[0], ts[-1]
    s = eps.s.detach()
    k = lambda t: torch.sqrt(sched.alpha(t) ** 2 * s**2 + sched.sigma(t) ** 2)
    exact = (k(t1) / k(t0)) ** 2 * sched.alpha(t0) / sched.alpha(t1)
    errors = []
    for n in (400, 1600):
        x = ad.sample(flow, x_T, sched, steps=n, sde=True, grad="adjoint", adjoint_form="x0", adjoint_order=2,
                      prediction="flow", generator=torch.Generator().manual_seed(1), parameters=[])
        got = torch.autograd.grad(x.sum(), x_T)[0]
        errors.append(((got - exact) / exact).abs().max().item())
    assert errors[1] < errors[0] / 8 and errors[1] < 5e-3, errors


@pytest.mark.parametrize("kwargs,message", [
    (dict(timesteps=[1.2, 0.5, 0.1]), r"timesteps\[0\]"),
    (dict(timesteps=[0.9, 0.5, 0.0]), r"timesteps\[2\]"),
    (dict(timesteps=[0.9, 0.5, -0.1]), r"timesteps\[2\]"),
])
def test_grid_outside_zero_one_is_rejected(kwargs, message):
    sched, _, flow, x_T = flow_oracle()
    with pytest.raises(ValueError, match=message):
        ad.sample(flow, x_T, sched, prediction="flow", **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(t_max=1.5), "t_max"), (dict(t_min=0.0), "t_min"), (dict(t_min=-0.5), "t_min"),
    (dict(t_min=math.nan), "t_min"), (dict(shift=0.0), "shift"), (dict(shift=-2.0), "shift"),
])
def test_schedule_outside_zero_one_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ad.FlowSchedule(**kwargs)


def test_solvers_needing_alpha_at_t_one():
    """DEIS and DPM-Solver start from t = 1 by their data-form limit; the noise-prediction SDE (no such limit)
    and an eps model (no x0 there) say so."""
    sched, eps, flow, x_T = flow_oracle(t_max=1.0)
    for solver in ("deis", "dpmsolver"):
        assert torch.isfinite(ad.sample(flow, x_T, sched, solver=solver, prediction="flow", spacing="uniform")).all()
    with pytest.raises(ValueError, match="sde=True needs alpha > 0"):
        ad.sample(flow, x_T, sched, solver="dpmsolver", sde=True, prediction="flow", spacing="uniform")
    with pytest.raises(ValueError, match="start the grid below t = 1"):
        ad.sample(eps, x_T, sched, solver="deis", prediction="eps", spacing="uniform")
