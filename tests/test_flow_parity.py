"""Flow-matching parity with diffusers, step for step (docs/math.md sections 1, 4; diffusers' float32 floor).

Both loops drive the same model at the same times: the model takes ``1000 t`` (diffusers' flow
convention, ``timestep = 1000 sigma``); ours is called with the schedule time t and scales it.

- ``FlowMatchEulerDiscreteScheduler``: our "ddim" on a FlowSchedule is exactly the Euler step; its
  grid starts at t = 1 and ends at zero (``denoise_to_zero``).
- ``FlowMatchHeunDiscreteScheduler``: our "heun" (flow variables; last step Euler, 2N - 1 evaluations).
- ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``: our
  "dpmpp" 2M and 3M.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from adjointdeis import FlowSchedule, sample
from gaussian import GaussianFlow, per_dimension
from nets import TinyConvNet

RTOL = 1e-5
# diffusers' Heun forms its derivative as (x - (x - sigma out)) / sigma in float32, which cancels: on
# the random net at 2 steps it sits 1.3e-5 from a float64 run, ours 2e-7 (measured when written).
HEUN_RTOL = 3e-5
SHAPE = (4, 2, 6, 6)
TIME_SCALE = 1000.0


def models():
    """The exact flow of Gaussian data and a small random conv net, both taking 1000 t."""
    torch.manual_seed(0)
    net = TinyConvNet(cond_dim=1)
    oracle = GaussianFlow(FlowSchedule(), *per_dimension(SHAPE[-1], seed=3))
    return {"oracle": lambda x, t: oracle(x, t / TIME_SCALE), "net": lambda x, t: net(x, t / 100.0)}


MODELS = models()


def diffusers_states(scheduler, model, x_T):
    """diffusers' loop (the model at ``timestep``); every state the model sees and the result, in float64."""
    x, states = x_T, []
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            states.append(x.to(torch.float64))
            out = model(x, timestep.to(torch.float32).expand(x.shape[0]))
            x = scheduler.step(out, timestep, x).prev_sample
    return states + [x.to(torch.float64)]


def our_states(model, x_T, schedule, grid, **kwargs):
    states = []

    def recording(x, t):
        states.append(x.to(torch.float64).clone())
        return model(x, TIME_SCALE * t)

    with torch.no_grad():
        result = sample(recording, x_T, schedule, timesteps=grid, prediction="flow", **kwargs)
    return states + [result.to(torch.float64)]


def grid_to_zero(sigmas):
    """Our grid for diffusers sigmas ending at 0: the last sigma becomes a placeholder and the
    step lands on zero noise (``denoise_to_zero``)."""
    grid = sigmas.to(torch.float64).clone()
    assert grid[-1] == 0
    grid[-1] = grid[-2] / 2
    return grid


def assert_same_states(ours, theirs, rtol=RTOL):
    assert len(ours) == len(theirs), f"{len(ours) - 1} evaluations against diffusers' {len(theirs) - 1}"
    for i, (got, want) in enumerate(zip(ours, theirs)):
        error = ((got - want).norm() / want.norm()).item()
        assert error <= rtol, f"state {i} of {len(theirs) - 1}: relative error {error:.3e} > {rtol:g}"


def initial_noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 5, 28])
def test_euler_matches_flow_match_euler(model, shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    assert scheduler.sigmas[0] == 1.0 and scheduler.sigmas[-1] == 0.0
    x_T = initial_noise()
    theirs = diffusers_states(scheduler, MODELS[model], x_T)
    ours = our_states(MODELS[model], x_T, FlowSchedule(shift, t_max=1.0), grid_to_zero(scheduler.sigmas),
                      solver="ddim", denoise_to_zero=True)
    assert_same_states(ours, theirs)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_heun_matches_flow_match_heun(model, shift, steps):
    """diffusers' flow Heun also ends with an Euler step to zero: 2N - 1 evaluations for N steps."""
    scheduler = FlowMatchHeunDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    grid = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]])
    assert len(grid) == steps + 1 and len(scheduler.timesteps) == 2 * steps - 1
    x_T = initial_noise()
    theirs = diffusers_states(scheduler, MODELS[model], x_T)
    ours = our_states(MODELS[model], x_T, FlowSchedule(shift, t_max=1.0), grid_to_zero(grid), solver="heun",
                      denoise_to_zero=True)
    assert_same_states(ours, theirs, HEUN_RTOL)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps", [1, 3, 10, 25])
def test_dpmpp_matches_dpmsolver_flow(model, order, shift, final, steps):
    scheduler = DPMSolverMultistepScheduler(solver_order=order, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=shift, final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    x_T = initial_noise()
    # diffusers calls flow models at its (integer) timesteps; drive both at the sigma the step uses.
    sigmas = iter(scheduler.sigmas.tolist())
    at_sigma = lambda x, t: MODELS[model](x, TIME_SCALE * torch.full_like(t, next(sigmas)))
    theirs = diffusers_states(scheduler, at_sigma, x_T)
    grid = scheduler.sigmas.to(torch.float64)
    if final == "zero":
        grid = grid_to_zero(grid)
    ours = our_states(MODELS[model], x_T, FlowSchedule(shift), grid, solver="dpmpp", order=order,
                      denoise_to_zero=final == "zero")
    assert_same_states(ours, theirs)
