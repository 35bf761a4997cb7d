"""``sample`` against diffusers' multistep schedulers, every intermediate state, step for step.

diffusers is the independent oracle (docs/math.md section 4): ``DPMSolverMultistepScheduler``
("dpmsolver++" and "sde-dpmsolver++", solver_type "midpoint") and ``DEISMultistepScheduler``
("deis", "logrho"). Both samplers run the same deterministic fake model from the same x_T; the
model records the state it is called with, so the N states a run visits plus its result are
compared one by one, through the public ``sample`` only.

How a diffusers configuration maps onto our call:

- discrete VP: ``VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)`` (the float32 products
  diffusers itself uses; rebuilding them from ``betas`` in float64 moves sigma near t = 0 by 1e-4
  relative), ``timesteps`` = ``scheduler.timesteps`` followed by 0;
- flow (``use_flow_sigmas``): ``FlowSchedule`` with t = diffusers' sigma, ``timesteps`` =
  ``scheduler.sigmas`` (the model is called with sigma, not diffusers' truncated integer timestep);
- ``final_sigmas_type="zero"`` -> ``denoise_to_zero=True`` (the grid's endpoint is then unused: 0
  for VP, half the last sigma for flow); ``"sigma_min"`` -> the grid ends at diffusers' last sigma
  (VP t = 0), ``denoise_to_zero=False``. DEIS always ends at sigma_min.
- ``DDIMScheduler`` (eta = 0, ``clip_sample=False``) is a second oracle for ``solver="ddim"``.

diffusers computes in float32; we run in float64 (x_T float64) and in float32, and every state
must agree to 1e-5 relative to its norm. The one exception is DEIS order 3, whose float32
coefficients alone are off by more than that: it is compared with diffusers' DEIS run in float64
(:func:`upcast_deis`; orders 1-2 are compared with both). The SDE noise: in float32 both draw from generators with
the same seed (diffusers draws ``randn(x.shape, float32)`` once per step after the model call, as
we do; its one extra draw, on the step to zero noise, comes last and is multiplied by 0); in
float64 our draws are float64, so diffusers is handed the same draws as ``variance_noise``.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler

from adjointdeis import FlowSchedule, VPSchedule, sample
from adjointdeis.diffusers.config import PREDICTION_TYPES

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

SHAPE = (2, 3, 8, 8)
RTOL = 1e-5
DTYPES = [torch.float64, torch.float32]
DIFFUSERS_PREDICTION = {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}
DPMPP_SOLVERS = [("ddim", 1), ("dpmpp", 1), ("dpmpp", 2), ("dpmpp", 3)]
SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0)]
STEPS = [8, 20]
FINALS = ["zero", "sigma_min"]


def fake_model(x, t, time_scale):
    """A smooth nonlinear model output for x (batch, *shape) at model times t (batch,), in float64 inside.

    With tau = time_scale * t in [0, 1]: ``(0.5 + 0.4 tau) x + 0.3 (1 - tau) sin(2 x + 3 tau)``. Read as
    eps it is 0.9 x at pure noise, so x0-hat stays moderate and its conversion well conditioned in
    float32; the nonlinearity acts along the way.
    """
    tau = (t.to(torch.float64) * time_scale).reshape(-1, *([1] * (x.dim() - 1)))
    xd = x.to(torch.float64)
    return ((0.5 + 0.4 * tau) * xd + 0.3 * (1 - tau) * torch.sin(2 * xd + 3 * tau)).to(x.dtype)


def initial_noise(dtype, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def diffusers_states(scheduler, x_T, time_scale, flow, generator=None, noises=None, precision=torch.float32):
    """diffusers' denoising loop; every state it visits and its result, in float64.

    Args:
        scheduler: a diffusers scheduler after ``set_timesteps``.
        x_T: (batch, *shape) initial noise, cast to `precision` (float32 as diffusers computes;
            float64 only for a scheduler passed through :func:`upcast_deis`).
        flow: call the model with the step's sigma instead of its integer timestep.
        generator: SDE noise generator; noises: or the SDE noise of each step, explicitly.
    """
    x = x_T.to(precision)
    states = []
    for i, timestep in enumerate(scheduler.timesteps):
        states.append(x.to(torch.float64))
        model_time = scheduler.sigmas[i] if flow else timestep
        out = fake_model(x, model_time.expand(x.shape[0]), time_scale)
        extra = {"generator": generator} if generator is not None else {}
        if noises is not None:
            extra["variance_noise"] = noises[i]
        x = scheduler.step(out, timestep, x, **extra).prev_sample
    return states + [x.to(torch.float64)]


def our_states(x_T, schedule, grid, time_scale, **kwargs):
    """``sample`` from x_T along `grid`; every state the model is called with and the result, in float64."""
    states = []

    def recording_model(x, t):
        states.append(x.to(torch.float64).clone())
        return fake_model(x, t, time_scale)

    result = sample(recording_model, x_T, schedule, timesteps=grid, **kwargs)
    assert result.dtype == x_T.dtype
    return states + [result.to(torch.float64)]


def assert_same_states(ours, theirs):
    assert len(ours) == len(theirs), f"{len(ours) - 1} steps against diffusers' {len(theirs) - 1}"
    for i, (got, want) in enumerate(zip(ours, theirs)):
        error = ((got - want).norm() / want.norm()).item()
        assert error <= RTOL, f"state {i} of {len(theirs) - 1}: relative error {error:.3e} > {RTOL:g}"


def vp_grid(scheduler):
    """Our (N+1,) grid for a discrete-VP diffusers scheduler: its timesteps, then t = 0."""
    return torch.cat([scheduler.timesteps.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


def flow_grid(scheduler):
    """Our (N+1,) grid for a flow-sigma scheduler: its sigmas; a final zero becomes half the last sigma."""
    grid = scheduler.sigmas.to(torch.float64).clone()
    if grid[-1] == 0:
        grid[-1] = grid[-2] / 2
    return grid


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("solver,order", DPMPP_SOLVERS)
def test_dpmpp_matches_diffusers_vp(solver, order, prediction, spacing, steps_offset, final, steps, dtype):
    scheduler = DPMSolverMultistepScheduler(
        solver_order=order, prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing,
        steps_offset=steps_offset, final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    x_T = initial_noise(dtype)
    theirs = diffusers_states(scheduler, x_T, 1e-3, flow=False)
    ours = our_states(x_T, VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod), vp_grid(scheduler), 1e-3,
                      solver=solver, order=order, prediction=prediction, denoise_to_zero=final == "zero")
    assert_same_states(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("solver,order", DPMPP_SOLVERS)
def test_dpmpp_matches_diffusers_flow(solver, order, shift, final, steps, dtype):
    scheduler = DPMSolverMultistepScheduler(
        solver_order=order, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
        final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    x_T = initial_noise(dtype)
    theirs = diffusers_states(scheduler, x_T, 1.0, flow=True)
    ours = our_states(x_T, FlowSchedule(shift), flow_grid(scheduler), 1.0,
                      solver=solver, order=order, prediction="flow", denoise_to_zero=final == "zero")
    assert_same_states(ours, theirs)


@pytest.mark.parametrize("steps", [1, 2, 3, 14, 15])
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_order_schedule_matches_diffusers(order, lower_order_final, final, steps):
    """Warm-up and lowered final orders at the edges: 1-3 steps, and 14/15 around diffusers' threshold."""
    scheduler = DPMSolverMultistepScheduler(
        solver_order=order, lower_order_final=lower_order_final, final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    x_T = initial_noise(torch.float64)
    theirs = diffusers_states(scheduler, x_T, 1e-3, flow=False)
    ours = our_states(x_T, VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod), vp_grid(scheduler), 1e-3,
                      solver="dpmpp", order=order, lower_order_final=lower_order_final,
                      denoise_to_zero=final == "zero")
    assert_same_states(ours, theirs)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_matches_diffusers_other_betas(order, beta_schedule):
    scheduler = DPMSolverMultistepScheduler(solver_order=order, beta_schedule=beta_schedule)
    scheduler.set_timesteps(12)
    x_T = initial_noise(torch.float64)
    theirs = diffusers_states(scheduler, x_T, 1e-3, flow=False)
    ours = our_states(x_T, VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod), vp_grid(scheduler), 1e-3,
                      solver="dpmpp", order=order, denoise_to_zero=True)
    assert_same_states(ours, theirs)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing,steps_offset", [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_matches_diffusers_ddim_scheduler(prediction, spacing, steps_offset, set_alpha_to_one, steps):
    """``solver="ddim"`` against ``DDIMScheduler`` (eta = 0), a second, independent DDIM oracle.

    DDIMScheduler steps from timestep t to ``t - num_train_timesteps // N``; with these spacings that
    is the next timestep of its grid, and past the last one it lands on ``final_alpha_cumprod``:
    alpha = 1 (``set_alpha_to_one``, our ``denoise_to_zero``) or ``alphas_cumprod[0]`` (our t = 0).
    Its default ``clip_sample=True`` clamps x0-hat to [-1, 1], which we do not model: turned off.
    """
    scheduler = DDIMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing,
                              steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // steps
    assert (scheduler.timesteps[:-1] - scheduler.timesteps[1:] == stride).all() and scheduler.timesteps[-1] < stride
    x_T = initial_noise(torch.float64)
    theirs = diffusers_states(scheduler, x_T, 1e-3, flow=False)
    ours = our_states(x_T, VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod), vp_grid(scheduler), 1e-3,
                      solver="ddim", prediction=prediction, denoise_to_zero=set_alpha_to_one)
    assert_same_states(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", FINALS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("order", [1, 2])
def test_sde_dpmpp_matches_diffusers(order, prediction, final, steps, dtype):
    flow = prediction == "flow"
    scheduler = DPMSolverMultistepScheduler(
        solver_order=order, algorithm_type="sde-dpmsolver++", prediction_type=DIFFUSERS_PREDICTION[prediction],
        use_flow_sigmas=flow, flow_shift=3.0 if flow else 1.0, final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    x_T = initial_noise(dtype)
    seed = 1234
    if dtype == torch.float32:
        noise_kwargs = {"generator": torch.Generator().manual_seed(seed)}
    else:
        draws = torch.Generator().manual_seed(seed)
        noises = [torch.randn(SHAPE, generator=draws, dtype=dtype).to(torch.float32) for _ in range(steps)]
        if final == "zero":
            noises[-1] = torch.zeros(SHAPE)
        noise_kwargs = {"noises": noises}
    time_scale = 1.0 if flow else 1e-3
    theirs = diffusers_states(scheduler, x_T, time_scale, flow=flow, **noise_kwargs)
    if flow:
        schedule, grid = FlowSchedule(3.0), flow_grid(scheduler)
    else:
        schedule, grid = VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod), vp_grid(scheduler)
    ours = our_states(x_T, schedule, grid, time_scale, solver="dpmpp", order=order, prediction=prediction, sde=True,
                      generator=torch.Generator().manual_seed(seed), denoise_to_zero=final == "zero")
    assert_same_states(ours, theirs)


DEIS_ORACLES = [(1, torch.float32), (2, torch.float32), (1, torch.float64), (2, torch.float64), (3, torch.float64)]


def upcast_deis(scheduler):
    """Makes a ``DEISMultistepScheduler`` compute in float64: same algorithm, same sigma values.

    Its third-order weights are differences of two evaluations of a quadratic in log(rho), computed in
    float32 to about 1e-5 relative, and they are large and of alternating sign (-38, 24, -7 on the
    third step of a 20-step trailing grid); that rounding alone moves a 20-step trajectory by up to
    2.3e-5 relative, while the same run in float64 agrees with ours to 7e-8. Its step keeps the
    sample's dtype, so upcasting the sigma table after ``set_timesteps`` is all it takes.
    """
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    return scheduler


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("order,oracle_dtype", DEIS_ORACLES, ids=lambda v: str(v).replace("torch.", "diffusers_"))
def test_deis_matches_diffusers(order, oracle_dtype, prediction, spacing, steps_offset, steps, dtype):
    """Orders 1-2 against diffusers as it ships (float32) and in float64; order 3 in float64 only."""
    scheduler = DEISMultistepScheduler(
        solver_order=order, prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing,
        steps_offset=steps_offset)
    scheduler.set_timesteps(steps)
    if oracle_dtype == torch.float64:
        upcast_deis(scheduler)
    x_T = initial_noise(dtype)
    theirs = diffusers_states(scheduler, x_T, 1e-3, flow=False, precision=oracle_dtype)
    ours = our_states(x_T, VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod), vp_grid(scheduler), 1e-3,
                      solver="deis", order=order, prediction=prediction)
    assert_same_states(ours, theirs)


@pytest.mark.parametrize("steps", [1, 2, 3, 14, 15])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_deis_order_schedule_matches_diffusers(lower_order_final, steps):
    scheduler = DEISMultistepScheduler(solver_order=3, lower_order_final=lower_order_final)
    scheduler.set_timesteps(steps)
    upcast_deis(scheduler)
    x_T = initial_noise(torch.float64)
    theirs = diffusers_states(scheduler, x_T, 1e-3, flow=False, precision=torch.float64)
    ours = our_states(x_T, VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod), vp_grid(scheduler), 1e-3,
                      solver="deis", order=3, lower_order_final=lower_order_final)
    assert_same_states(ours, theirs)
