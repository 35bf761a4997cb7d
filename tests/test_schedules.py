import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize

from adjointdeis.diffusers import FusedMultistepScheduler, schedule_from_config
from adjointdeis.schedules import (
    CosineVPSchedule,
    DiscreteVPSchedule,
    EDMSchedule,
    FlowSchedule,
    LinearVPSchedule,
    NoiseSchedule,
    VPSchedule,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import (
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EDMEulerScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

F64 = torch.float64
BETA_SCHEDULE_CONFIGS = {
    "linear": dict(beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(),
}
SCHEDULE_FACTORIES = {
    "vp_linear": lambda: VPSchedule.linear(),
    "vp_cosine": lambda: VPSchedule.cosine(),
    "vp_discrete_linear": lambda: schedule_from_config({}),
    "vp_discrete_cosine": lambda: schedule_from_config(dict(beta_schedule="squaredcos_cap_v2")),
    "flow": lambda: FlowSchedule(),
    "flow_shift_3": lambda: FlowSchedule(shift=3.0),
    "edm": lambda: EDMSchedule(),
    "edm_rho_3": lambda: EDMSchedule(sigma_min=0.01, sigma_max=20.0, rho=3.0),
}
VP_SCHEDULE_NAMES = [name for name in SCHEDULE_FACTORIES if name.startswith("vp")]


@pytest.fixture(params=list(SCHEDULE_FACTORIES), ids=list(SCHEDULE_FACTORIES))
def schedule(request) -> NoiseSchedule:
    return SCHEDULE_FACTORIES[request.param]()


def times_inside(schedule: NoiseSchedule, count: int = 4001) -> torch.Tensor:
    """Times covering the grid range densely, geometrically near t_min and t_max."""
    if isinstance(schedule, DiscreteVPSchedule):
        return torch.cat([torch.logspace(-6, 0, 200, dtype=F64), torch.linspace(1.0, schedule.t_max, count, dtype=F64)])
    low, high = max(schedule.t_min * 1e-3, 1e-12), schedule.t_max
    geometric = torch.logspace(math.log10(low), math.log10(high), count, dtype=F64)
    return torch.cat([geometric, torch.linspace(low, high, count, dtype=F64)])


def vp_linear_log_alpha_reference(t: np.ndarray, beta_min: float = 0.1, beta_max: float = 20.0) -> np.ndarray:
    return -(beta_max - beta_min) * t**2 / 4 - beta_min * t / 2


def dpm_solver_linear_inverse_lambda(lam: np.ndarray, beta_min: float = 0.1, beta_max: float = 20.0) -> np.ndarray:
    """DPM-Solver's NoiseScheduleVP.inverse_lambda for the linear schedule, in NumPy."""
    tmp = 2.0 * (beta_max - beta_min) * np.logaddexp(-2.0 * lam, 0.0)
    delta = beta_min**2 + tmp
    return tmp / (np.sqrt(delta) + beta_min) / (beta_max - beta_min)


def one_minus_exp_series(x: float) -> float:
    """1 - exp(x) for |x| < 1e-3 by its Taylor series (truncation below 1e-18 relative)."""
    return -x * (1 + x / 2 * (1 + x / 3 * (1 + x / 4 * (1 + x / 5 * (1 + x / 6)))))


def assert_equal_increments(values: torch.Tensor, rtol: float = 1e-11) -> None:
    increments = values[1:] - values[:-1]
    scale = (values[-1] - values[0]).abs() / (values.numel() - 1)
    torch.testing.assert_close(increments, increments.mean().expand_as(increments), rtol=0, atol=rtol * scale)


def unshift(t: torch.Tensor, shift: float) -> torch.Tensor:
    return t / (shift - (shift - 1) * t)


def apply_shift(u, shift: float):
    return shift * u / (1 + (shift - 1) * u)


def test_linear_vp_log_alpha_matches_closed_form():
    t = np.linspace(0.0, 1.0, 1001)
    ours = VPSchedule.linear().log_alpha(torch.from_numpy(t))
    np.testing.assert_allclose(ours.numpy(), vp_linear_log_alpha_reference(t), rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", VP_SCHEDULE_NAMES)
def test_vp_alpha_squared_plus_sigma_squared_is_one(name):
    schedule = SCHEDULE_FACTORIES[name]()
    t = times_inside(schedule)
    total = schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=4e-16)
    assert schedule.is_variance_preserving


def test_non_vp_schedules_say_so():
    assert not FlowSchedule().is_variance_preserving
    assert not EDMSchedule().is_variance_preserving


def test_linear_vp_sigma_accurate_where_naive_formula_loses_digits():
    schedule = VPSchedule.linear()
    t_values = [1e-12, 1e-10, 1e-8, 1e-6, 1e-5]
    ours = schedule.sigma(torch.tensor(t_values, dtype=F64))
    reference = [math.sqrt(one_minus_exp_series(2 * vp_linear_log_alpha_reference(t))) for t in t_values]
    torch.testing.assert_close(ours, torch.tensor(reference, dtype=F64), rtol=2e-15, atol=0)
    naive = torch.sqrt(1 - schedule.alpha(torch.tensor(1e-10, dtype=F64)) ** 2)
    assert abs(naive.item() / reference[1] - 1) > 1e-9
    log_sigma_reference = torch.log(torch.tensor(reference, dtype=F64))
    torch.testing.assert_close(schedule.log_sigma(torch.tensor(t_values, dtype=F64)), log_sigma_reference, rtol=1e-15, atol=0)


def test_cosine_vp_log_alpha_matches_integral_of_tangent_near_zero():
    s = 0.008
    schedule = VPSchedule.cosine(s=s)
    offset = math.pi / 2 * s / (1 + s)
    t_values = [1e-9, 1e-7, 1e-5, 1e-3, 1e-2, 0.1]
    reference = []
    for t in t_values:
        angle = math.pi / 2 * t / (1 + s)
        integral, _ = integrate.quad(lambda x: math.tan(offset + x), 0.0, angle, epsabs=0, epsrel=1e-13)
        reference.append(-integral)
    ours = schedule.log_alpha(torch.tensor(t_values, dtype=F64))
    torch.testing.assert_close(ours, torch.tensor(reference, dtype=F64), rtol=1e-13, atol=0)
    sigma_reference = [math.sqrt(-math.expm1(2 * value)) for value in reference]
    ours_sigma = schedule.sigma(torch.tensor(t_values, dtype=F64))
    torch.testing.assert_close(ours_sigma, torch.tensor(sigma_reference, dtype=F64), rtol=1e-13, atol=0)


def test_cosine_vp_alpha_matches_closed_form_away_from_zero():
    s = 0.008
    t = np.linspace(0.05, 0.999, 500)
    reference = np.cos(np.pi / 2 * (t + s) / (1 + s)) / np.cos(np.pi / 2 * s / (1 + s))
    ours = VPSchedule.cosine(s=s).alpha(torch.from_numpy(t))
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-12, atol=0)
    lam_at_t_max = VPSchedule.cosine().half_log_snr(0.9946).item()
    alpha_at_t_max = math.cos(math.pi / 2 * (0.9946 + s) / (1 + s)) / math.cos(math.pi / 2 * s / (1 + s))
    assert lam_at_t_max == pytest.approx(math.log(alpha_at_t_max) - 0.5 * math.log1p(-alpha_at_t_max**2), rel=1e-12)


@pytest.mark.parametrize("s", [0.008, 1.0, 2.0, 1e6, 1e12, 1e20])
def test_cosine_vp_is_exact_for_every_offset(s):
    """alpha against a 60-digit closed form, and the inverse, also where the offset angle nears pi/2 (large s)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    S = mpmath.mpf(s)
    angle = lambda t: mpmath.cos((mpmath.mpf(t) + S) / (1 + S) * mpmath.pi / 2)
    schedule, t = VPSchedule.cosine(s=s, t_max=0.9), [1e-3, 0.1, 0.5, 0.9]
    want = torch.tensor([float(angle(u) / angle(0)) for u in t], dtype=F64)
    torch.testing.assert_close(schedule.alpha(torch.tensor(t, dtype=F64)), want, rtol=4e-15, atol=0)
    back = schedule.time_from_half_log_snr(schedule.half_log_snr(torch.tensor(t, dtype=F64)))
    torch.testing.assert_close(back, torch.tensor(t, dtype=F64), rtol=4e-15, atol=0)


def test_schedule_inputs_that_are_not_real_numbers_name_the_argument():
    vp = VPSchedule.linear()
    for call, name in ((lambda: vp.alpha("0.5"), "t"), (lambda: vp.time_from_half_log_snr("x"), "lam"),
                       (lambda: VPSchedule.from_alphas_cumprod("abc"), "alphas_cumprod"),
                       (lambda: VPSchedule.from_alphas_cumprod(np.array([0.9, 0.5], dtype=complex)),
                        "alphas_cumprod")):
        with pytest.raises(TypeError, match=f"^{name} must be real numbers"):
            call()
    with pytest.raises(ValueError, match=r"rho=0.005 \(karras_rho\)"):
        EDMSchedule(rho=0.005).timesteps(4, "karras")


def test_half_log_snr_round_trip(schedule):
    t = times_inside(schedule)
    back = schedule.time_from_half_log_snr(schedule.half_log_snr(t))
    if isinstance(schedule, DiscreteVPSchedule):
        torch.testing.assert_close(back, t, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(back, t, rtol=1e-12, atol=0)


@settings(max_examples=200, deadline=None)
@given(fraction=st.floats(min_value=1e-9, max_value=1.0 - 1e-9))
def test_half_log_snr_round_trip_property(fraction):
    for schedule in (VPSchedule.linear(), VPSchedule.cosine(), FlowSchedule()):
        t = torch.tensor(fraction * schedule.t_max, dtype=F64)
        back = schedule.time_from_half_log_snr(schedule.half_log_snr(t))
        assert back.item() == pytest.approx(t.item(), rel=1e-12)


def test_half_log_snr_strictly_decreasing(schedule):
    low = 1e-6 if isinstance(schedule, DiscreteVPSchedule) else schedule.t_min * 1e-3
    for t in (
        torch.logspace(math.log10(low), math.log10(schedule.t_max), 3000, dtype=F64).clamp(max=schedule.t_max),
        torch.linspace(low, schedule.t_max, 3000, dtype=F64),
    ):
        lam = schedule.half_log_snr(t)
        assert torch.isfinite(lam).all()
        assert (lam[1:] < lam[:-1]).all()


def test_half_log_snr_is_log_alpha_minus_log_sigma(schedule):
    t = times_inside(schedule, count=200)
    expected = torch.log(schedule.alpha(t)) - torch.log(schedule.sigma(t))
    torch.testing.assert_close(schedule.half_log_snr(t), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.log_alpha(t), torch.log(schedule.alpha(t)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("lam", [-8.0, -3.0, -0.5, 0.0, 1.0, 4.0, 9.0])
def test_inverse_matches_root_finder(lam):
    for schedule, upper in ((VPSchedule.linear(), 5.0), (VPSchedule.cosine(), 1.0 - 1e-12)):
        def residual(t):
            return schedule.half_log_snr(t).item() - lam

        root = optimize.brentq(residual, 0.0, upper, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
        assert schedule.time_from_half_log_snr(lam).item() == pytest.approx(root, rel=1e-12)


def test_linear_vp_logsnr_grid_matches_dpm_solver_inverse():
    schedule = VPSchedule.linear(t_min=1e-4)
    endpoints = np.array([schedule.t_max, schedule.t_min])
    log_alpha = vp_linear_log_alpha_reference(endpoints)
    lam_ends = log_alpha - 0.5 * np.log(-np.expm1(2 * log_alpha))
    reference = dpm_solver_linear_inverse_lambda(np.linspace(lam_ends[0], lam_ends[1], 21))
    np.testing.assert_allclose(schedule.timesteps(20, "logsnr").numpy(), reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "quadratic", "karras"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_spacing_shape_endpoints_and_invariant(schedule, spacing, steps):
    grid = schedule.timesteps(steps, spacing)
    assert grid.shape == (steps + 1,)
    assert grid.dtype == F64 and grid.device.type == "cpu"
    assert (grid[1:] < grid[:-1]).all()
    assert grid[0].item() == schedule.t_max
    assert grid[-1].item() == schedule.t_min
    shift = schedule.shift if isinstance(schedule, FlowSchedule) else 1.0
    if spacing == "uniform":
        assert_equal_increments(unshift(grid, shift))
    elif spacing == "quadratic":
        assert_equal_increments(torch.sqrt(unshift(grid, shift)))
    elif spacing == "logsnr":
        assert_equal_increments(schedule.half_log_snr(grid))
    else:
        rho = schedule.rho if isinstance(schedule, EDMSchedule) else 7.0
        assert_equal_increments(torch.exp(-schedule.half_log_snr(grid) / rho))


def test_default_spacing_is_logsnr(schedule):
    torch.testing.assert_close(schedule.timesteps(9), schedule.timesteps(9, "logsnr"), rtol=0, atol=0)


def test_quadratic_spacing_matches_dpm_solver_time_quadratic():
    schedule = VPSchedule.linear()
    reference = np.linspace(math.sqrt(schedule.t_max), math.sqrt(schedule.t_min), 11) ** 2
    np.testing.assert_allclose(schedule.timesteps(10, "quadratic").numpy(), reference, rtol=1e-15, atol=0)


def test_edm_karras_grid_matches_closed_form_and_uses_rho():
    for rho in (7.0, 3.0):
        schedule = EDMSchedule(sigma_min=0.002, sigma_max=80.0, rho=rho)
        ramp = np.linspace(0, 1, 19)
        reference = (80.0 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
        np.testing.assert_allclose(schedule.timesteps(18, "karras").numpy(), reference, rtol=1e-13, atol=0)


@pytest.mark.parametrize("sigma_schedule,spacing", [("karras", "karras"), ("exponential", "logsnr")])
def test_edm_grids_match_diffusers(sigma_schedule, spacing):
    theirs = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_schedule=sigma_schedule)
    theirs.set_timesteps(12)
    ours = EDMSchedule(sigma_min=0.002, sigma_max=80.0, rho=7.0).timesteps(11, spacing)
    torch.testing.assert_close(ours, theirs.sigmas[:-1].to(F64), rtol=1e-6, atol=0)


def test_edm_closed_forms():
    schedule = EDMSchedule()
    t = torch.logspace(-3, 2, 50, dtype=F64)
    torch.testing.assert_close(schedule.alpha(t), torch.ones_like(t), rtol=0, atol=0)
    torch.testing.assert_close(schedule.sigma(t), t, rtol=0, atol=0)
    torch.testing.assert_close(schedule.half_log_snr(t), -torch.log(t), rtol=1e-15, atol=0)
    assert schedule.t_min == 0.002 and schedule.t_max == 80.0


def test_flow_closed_forms_and_endpoint_one():
    schedule = FlowSchedule()
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    torch.testing.assert_close(schedule.alpha(t), 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(schedule.sigma(t), t, rtol=0, atol=0)
    torch.testing.assert_close(schedule.half_log_snr(t), torch.log((1 - t) / t), rtol=1e-13, atol=1e-15)
    assert schedule.alpha(1.0).item() == 0.0
    assert schedule.sigma(1.0).item() == 1.0
    assert schedule.half_log_snr(1.0).item() == -math.inf
    assert schedule.time_from_half_log_snr(-math.inf).item() == 1.0


@pytest.mark.parametrize("bad_time", [0.0, -0.1, 1.5, math.nan])
def test_flow_rejects_times_outside_zero_one(bad_time):
    schedule = FlowSchedule()
    for method in (schedule.alpha, schedule.sigma, schedule.half_log_snr, schedule.log_alpha, schedule.model_time):
        with pytest.raises(ValueError, match=r"\bt="):
            method(bad_time)


def test_out_of_domain_element_is_named_by_index():
    with pytest.raises(ValueError, match=re.escape("t[1, 0]=1.5")):
        FlowSchedule().sigma(torch.tensor([[0.5, 0.25], [1.5, 0.5]], dtype=F64))


@pytest.mark.parametrize("shift", [0.5, 3.0, 7.0])
def test_flow_shift_is_a_log_snr_offset(shift):
    u = np.linspace(0.001, 0.999, 200)
    shifted = torch.from_numpy(apply_shift(u, shift))
    schedule = FlowSchedule(shift=shift)
    expected = schedule.half_log_snr(torch.from_numpy(u)) - math.log(shift)
    torch.testing.assert_close(schedule.half_log_snr(shifted), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shift", [0.5, 3.0, 7.0])
def test_flow_uniform_grid_is_shift_formula_of_uniform_u(shift):
    schedule = FlowSchedule(shift=shift, t_min=0.002, t_max=0.995)
    u_max = schedule.t_max / (shift - (shift - 1) * schedule.t_max)
    u_min = schedule.t_min / (shift - (shift - 1) * schedule.t_min)
    reference = apply_shift(np.linspace(u_max, u_min, 16), shift)
    np.testing.assert_allclose(schedule.timesteps(15, "uniform").numpy(), reference, rtol=1e-13, atol=0)


def test_flow_shift_does_not_change_logsnr_or_karras_spacing():
    for spacing in ("logsnr", "karras"):
        shifted = FlowSchedule(shift=3.0, t_min=0.01, t_max=0.99)
        plain = FlowSchedule(shift=1.0, t_min=0.01, t_max=0.99)
        torch.testing.assert_close(shifted.timesteps(10, spacing), plain.timesteps(10, spacing), rtol=1e-13, atol=0)


@pytest.mark.parametrize("shift,steps", [(1.0, 10), (3.0, 10), (3.0, 28), (6.0, 4)])
def test_flow_uniform_grid_matches_diffusers_flow_match_euler(shift, steps):
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    theirs.set_timesteps(steps)
    first_sigma = theirs.sigmas[0].item()
    last_sigma = theirs.sigmas[-2].to(F64).item()
    assert first_sigma == 1.0
    schedule = FlowSchedule(shift=shift, t_min=apply_shift(theirs.sigma_min, shift), t_max=1.0)
    ours = schedule.timesteps(steps - 1, "uniform")
    torch.testing.assert_close(ours, theirs.sigmas[:-1].to(F64), rtol=1e-6, atol=0)
    assert ours[-1].item() == pytest.approx(last_sigma, rel=1e-6)


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_flow_from_t_one_needs_uniform_or_quadratic(spacing):
    schedule = FlowSchedule(t_max=1.0)
    assert schedule.timesteps(5, "uniform")[0].item() == 1.0
    assert schedule.timesteps(5, "quadratic")[0].item() == 1.0
    with pytest.raises(ValueError, match=spacing):
        schedule.timesteps(5, spacing)


@pytest.mark.parametrize("beta_schedule", list(BETA_SCHEDULE_CONFIGS))
def test_diffusers_config_betas_and_alphas_cumprod_match_diffusers(beta_schedule):
    config = BETA_SCHEDULE_CONFIGS[beta_schedule]
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, **config)
    ours = schedule_from_config(dict(num_train_timesteps=1000, beta_schedule=beta_schedule, **config))
    assert isinstance(ours, DiscreteVPSchedule) and isinstance(ours, VPSchedule)
    assert ours.num_train_timesteps == 1000
    assert ours.alphas_cumprod.dtype == F64
    products = ours.alphas_cumprod
    betas = torch.cat([1 - products[:1], 1 - products[1:] / products[:-1]])
    torch.testing.assert_close(betas, theirs.betas.to(F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(products, theirs.alphas_cumprod.to(F64), rtol=5e-5, atol=0)


def test_from_betas_accepts_tensor_numpy_and_list():
    betas = np.linspace(1e-4, 0.02, 1000)
    expected = torch.from_numpy(np.cumprod(1 - betas))
    for given_betas in (betas, torch.from_numpy(betas), torch.from_numpy(betas).float(), betas.tolist()):
        schedule = VPSchedule.from_betas(given_betas)
        rtol = 1e-5 if isinstance(given_betas, torch.Tensor) and given_betas.dtype == torch.float32 else 1e-14
        torch.testing.assert_close(schedule.alphas_cumprod, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("beta_schedule", list(BETA_SCHEDULE_CONFIGS))
def test_discrete_alpha_sigma_exact_at_integer_timesteps(beta_schedule):
    theirs = DDPMScheduler(beta_schedule=beta_schedule, **BETA_SCHEDULE_CONFIGS[beta_schedule])
    products = theirs.alphas_cumprod.to(F64)
    schedule = VPSchedule.from_alphas_cumprod(theirs.alphas_cumprod)
    n = torch.arange(1000, dtype=F64)
    assert torch.equal(schedule.sigma(n), torch.sqrt(1 - products))
    assert torch.equal(schedule.alpha(n), torch.sqrt(products))
    assert torch.equal(schedule.sigma(torch.arange(1000)), torch.sqrt(1 - products))
    torch.testing.assert_close(schedule.sigma(n), torch.sqrt(1 - theirs.alphas_cumprod).to(F64), rtol=2e-7, atol=0)
    lam_reference = 0.5 * (torch.log(products) - torch.log(1 - products))
    torch.testing.assert_close(schedule.half_log_snr(n), lam_reference, rtol=1e-14, atol=1e-14)
    assert schedule.t_min == 0.0 and schedule.t_max == 999.0
    torch.testing.assert_close(schedule.model_time(n), n, rtol=0, atol=0)


def test_discrete_lambda_is_piecewise_linear_between_integers():
    schedule = schedule_from_config({})
    products = schedule.alphas_cumprod.numpy()
    lam_nodes = 0.5 * (np.log(products) - np.log1p(-products))
    left = np.arange(999)
    for fraction in (0.25, 0.5, 0.9):
        expected = lam_nodes[:-1] + fraction * (lam_nodes[1:] - lam_nodes[:-1])
        ours = schedule.half_log_snr(torch.from_numpy(left + fraction))
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-13, atol=1e-13)
    t = torch.from_numpy(left + 0.5)
    lam = torch.from_numpy(0.5 * (lam_nodes[:-1] + lam_nodes[1:]))
    torch.testing.assert_close(schedule.alpha(t), torch.sqrt(torch.sigmoid(2 * lam)), rtol=1e-13, atol=0)
    torch.testing.assert_close(schedule.sigma(t), torch.sqrt(torch.sigmoid(-2 * lam)), rtol=1e-13, atol=0)


def test_discrete_schedule_with_unit_first_alphas_cumprod():
    betas = np.concatenate([[0.0], np.linspace(1e-4, 0.02, 99)])
    schedule = VPSchedule.from_betas(betas)
    assert schedule.alphas_cumprod[0].item() == 1.0
    assert schedule.half_log_snr(0.0).item() == math.inf
    assert schedule.sigma(0.0).item() == 0.0
    t = torch.cat([torch.logspace(-9, 0, 100, dtype=F64), torch.linspace(1, 99, 500, dtype=F64)[1:]])
    lam = schedule.half_log_snr(t)
    assert torch.isfinite(lam).all() and (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(schedule.time_from_half_log_snr(lam), t, rtol=1e-12, atol=1e-12)
    total = schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=4e-16)


DIFFUSERS_STEP_COUNTS = [1, 2, 3, 7, 10, 20, 25, 50, 100, 333, 500]


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_discrete_spacings_reproduce_diffusers_timesteps(spacing, steps_offset):
    config = dict(timestep_spacing=spacing, steps_offset=steps_offset, final_sigmas_type="sigma_min")
    for beta_schedule in BETA_SCHEDULE_CONFIGS:
        betas_config = BETA_SCHEDULE_CONFIGS[beta_schedule]
        reference = DPMSolverMultistepScheduler(beta_schedule=beta_schedule, **betas_config, **config)
        schedule = VPSchedule.from_alphas_cumprod(reference.alphas_cumprod)
        for steps in DIFFUSERS_STEP_COUNTS:
            reference.set_timesteps(steps)
            grid = schedule.timesteps(steps, spacing, steps_offset=steps_offset)
            assert grid.shape == (steps + 1,) and grid.dtype == F64
            assert grid[-1].item() == 0.0
            assert torch.equal(grid[:-1], reference.timesteps.to(F64)), (beta_schedule, steps)
            sigma_ve = schedule.sigma(grid) / schedule.alpha(grid)
            torch.testing.assert_close(sigma_ve, reference.sigmas.to(F64), rtol=2e-6, atol=0)


@pytest.mark.parametrize("beta_schedule", list(BETA_SCHEDULE_CONFIGS))
def test_diffusers_config_schedule_sigmas_match_diffusers(beta_schedule):
    config = BETA_SCHEDULE_CONFIGS[beta_schedule]
    reference = DPMSolverMultistepScheduler(beta_schedule=beta_schedule, timestep_spacing="trailing", **config)
    reference.set_timesteps(20)
    schedule = schedule_from_config(dict(beta_schedule=beta_schedule, **config))
    grid = schedule.timesteps(20, "trailing")
    sigma_ve = schedule.sigma(grid[:-1]) / schedule.alpha(grid[:-1])
    torch.testing.assert_close(sigma_ve, reference.sigmas[:-1].to(F64), rtol=5e-5, atol=0)


def test_trailing_spacing_keeps_intended_steps_where_diffusers_overshoots():
    reference = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    reference.set_timesteps(61)
    assert reference.timesteps[-1].item() == -1
    grid = VPSchedule.from_alphas_cumprod(reference.alphas_cumprod).timesteps(61, "trailing")
    assert grid.shape == (62,)
    assert torch.equal(grid[:-1], reference.timesteps[:61].to(F64))


def test_discrete_spacing_that_repeats_a_timestep_is_rejected():
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedule_from_config({}).timesteps(1000, "trailing")


def test_steps_offset_only_with_diffusers_spacings():
    schedule = schedule_from_config({})
    with pytest.raises(ValueError, match="steps_offset"):
        schedule.timesteps(10, "logsnr", steps_offset=1)
    with pytest.raises(ValueError, match="steps_offset"):
        schedule.timesteps(10, "leading", steps_offset=0.5)


@pytest.mark.parametrize("bad_steps", [0, -3, 2.5, True, "10"])
def test_timesteps_rejects_bad_steps(schedule, bad_steps):
    with pytest.raises(ValueError, match=r"\bsteps\b"):
        schedule.timesteps(bad_steps)


def test_unknown_spacing_lists_valid_ones(schedule):
    with pytest.raises(ValueError) as info:
        schedule.timesteps(10, "cubic")
    for name in ("uniform", "logsnr", "quadratic", "karras"):
        assert repr(name) in str(info.value)
    if isinstance(schedule, DiscreteVPSchedule):
        for name in ("linspace", "leading", "trailing"):
            assert repr(name) in str(info.value)
    else:
        with pytest.raises(ValueError, match="'uniform'"):
            schedule.timesteps(10, "trailing")


def test_check_grid_returns_float64_cpu_copy():
    schedule = FlowSchedule()
    given_grid = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float32)
    checked = schedule.check_grid(given_grid)
    assert checked.dtype == F64 and checked.device.type == "cpu"
    torch.testing.assert_close(checked, given_grid.to(F64), rtol=0, atol=0)
    as_float64 = given_grid.to(F64)
    assert schedule.check_grid(as_float64).data_ptr() != as_float64.data_ptr()
    torch.testing.assert_close(schedule.check_grid([0.9, 0.5, 0.1]), torch.tensor([0.9, 0.5, 0.1], dtype=F64))
    torch.testing.assert_close(schedule.check_grid(np.array([0.9, 0.5])), torch.tensor([0.9, 0.5], dtype=F64))
    discrete = schedule_from_config({})
    torch.testing.assert_close(discrete.check_grid([999, 500, 0]), torch.tensor([999.0, 500.0, 0.0], dtype=F64))


@pytest.mark.parametrize(
    "grid,message",
    [
        (torch.tensor([[0.9, 0.5]], dtype=F64), "1-D"),
        (torch.tensor([9, 5]), "floating-point"),
        (np.array([9, 5]), "floating-point"),
        (torch.tensor([0.5], dtype=F64), "at least 2"),
        (torch.tensor([0.9, math.nan], dtype=F64), re.escape("timesteps[1]=nan")),
        (torch.tensor([0.9, -math.inf], dtype=F64), "finite"),
        (
            torch.tensor([0.9, 0.6, 0.4, 0.5], dtype=F64),
            re.escape("timesteps must be strictly decreasing; timesteps[3]=0.5 >= timesteps[2]=0.4"),
        ),
        (torch.tensor([0.9, 0.4, 0.4], dtype=F64), re.escape("timesteps[2]=0.4 >= timesteps[1]=0.4")),
        (torch.tensor([1.5, 0.5], dtype=F64), re.escape("timesteps[0]=1.5 is outside the time domain (0, 1]")),
        (torch.tensor([0.5, 0.0], dtype=F64), re.escape("timesteps[1]=0.0 is outside")),
        ([[0.5], [0.25, 0.1]], "timesteps"),
    ],
)
def test_check_grid_errors(grid, message):
    with pytest.raises(ValueError, match=message):
        FlowSchedule().check_grid(grid)


def test_check_grid_domains_of_each_schedule():
    with pytest.raises(ValueError, match=re.escape("[0, 999]")):
        schedule_from_config({}).check_grid([1000.0, 10.0])
    with pytest.raises(ValueError, match=re.escape("[0, 1)")):
        VPSchedule.cosine().check_grid([1.0, 0.5])
    with pytest.raises(ValueError, match=re.escape("[0, inf)")):
        VPSchedule.linear().check_grid([1.0, -0.5])
    with pytest.raises(ValueError, match=re.escape("[0, inf)")):
        EDMSchedule().check_grid([80.0, -1.0])
    EDMSchedule().check_grid([80.0, 1.0, 0.0])
    VPSchedule.linear().check_grid([1.0, 0.5, 0.0])


@pytest.mark.parametrize(
    "build,argument",
    [
        (lambda: VPSchedule.linear(beta_min=20.0, beta_max=0.1), "beta_min"),
        (lambda: VPSchedule.linear(beta_min=1.0, beta_max=1.0), "beta_min"),
        (lambda: VPSchedule.linear(beta_min=-0.1), "beta_min"),
        (lambda: VPSchedule.linear(beta_max=math.inf), "beta_max"),
        (lambda: VPSchedule.linear(t_min=0.5, t_max=0.1), "t_min"),
        (lambda: VPSchedule.linear(t_min=-1e-3), "t_min"),
        (lambda: VPSchedule.cosine(t_max=1.0), "t_max"),
        (lambda: VPSchedule.cosine(s=-0.1), "s"),
        (lambda: VPSchedule.cosine(t_min=0.9, t_max=0.5), "t_min"),
        (lambda: FlowSchedule(t_min=0.0), "t_min"),
        (lambda: FlowSchedule(t_max=1.5), "t_max"),
        (lambda: FlowSchedule(t_min=0.5, t_max=0.5), "t_min"),
        (lambda: FlowSchedule(shift=0.0), "shift"),
        (lambda: FlowSchedule(shift=math.nan), "shift"),
        (lambda: EDMSchedule(sigma_min=-0.002), "sigma_min"),
        (lambda: EDMSchedule(sigma_min=0.0), "sigma_min"),
        (lambda: EDMSchedule(sigma_min=100.0), "sigma_max"),
        (lambda: EDMSchedule(rho=0.0), "rho"),
        (lambda: VPSchedule.from_alphas_cumprod([0.9, 0.95, 0.5]), "alphas_cumprod"),
        (lambda: VPSchedule.from_alphas_cumprod([0.9, 0.9, 0.5]), "alphas_cumprod"),
        (lambda: VPSchedule.from_alphas_cumprod([1.2, 0.5]), "alphas_cumprod"),
        (lambda: VPSchedule.from_alphas_cumprod([0.9, 0.0]), "alphas_cumprod"),
        (lambda: VPSchedule.from_alphas_cumprod([0.9, -0.1]), "alphas_cumprod"),
        (lambda: VPSchedule.from_alphas_cumprod([0.9]), "alphas_cumprod"),
        (lambda: VPSchedule.from_alphas_cumprod([[0.9, 0.5]]), "alphas_cumprod"),
        (lambda: VPSchedule.from_alphas_cumprod([0.9, math.nan]), "alphas_cumprod"),
        (lambda: VPSchedule.from_betas([0.1, 1.0]), "betas"),
        (lambda: VPSchedule.from_betas([-0.1, 0.2]), "betas"),
        (lambda: VPSchedule.from_betas([0.1, 0.0, 0.2]), "betas"),
        (lambda: schedule_from_config(dict(beta_schedule="sigmoid")), "beta_schedule"),
        (lambda: schedule_from_config(dict(num_train_timesteps=1)), "num_train_timesteps"),
        (lambda: schedule_from_config(dict(beta_end=1.5)), "beta_end"),
    ],
)
def test_constructor_errors_name_the_argument(build, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        build()


def test_unknown_beta_schedule_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        schedule_from_config(dict(beta_schedule="sigmoid"))
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        assert repr(name) in str(info.value)


def test_vp_schedule_itself_is_abstract():
    with pytest.raises(TypeError):
        VPSchedule()
    assert isinstance(VPSchedule.linear(), LinearVPSchedule)
    assert isinstance(VPSchedule.cosine(), CosineVPSchedule)


def test_inverse_rejects_nan_and_out_of_range_lambda():
    with pytest.raises(ValueError, match=r"\blam\b"):
        VPSchedule.linear().time_from_half_log_snr(math.nan)
    discrete = schedule_from_config({})
    lam_range = discrete.half_log_snr(torch.tensor([999.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match=r"\blam\b"):
        discrete.time_from_half_log_snr(lam_range[1] + 0.1)
    with pytest.raises(ValueError, match=r"\blam\b"):
        discrete.time_from_half_log_snr(lam_range[0] - 0.1)
    assert discrete.time_from_half_log_snr(lam_range[0]).item() == 999.0
    assert discrete.time_from_half_log_snr(lam_range[1]).item() == 0.0
    with pytest.raises(ValueError, match=r"\blam\b"):
        VPSchedule.cosine().time_from_half_log_snr(-math.inf)


def test_methods_keep_shape_and_return_float64(schedule):
    t = torch.linspace(schedule.t_max, schedule.t_min, 6, dtype=torch.float32).reshape(2, 3)
    methods = (
        schedule.log_alpha,
        schedule.alpha,
        schedule.sigma,
        schedule.log_sigma,
        schedule.half_log_snr,
        schedule.model_time,
    )
    for method in methods:
        result = method(t)
        assert result.shape == (2, 3) and result.dtype == F64
        scalar = method(float(t[0, 1]))
        assert scalar.shape == () and scalar.dtype == F64
    back = schedule.time_from_half_log_snr(schedule.half_log_snr(t.to(F64)))
    assert back.shape == (2, 3) and back.dtype == F64
    torch.testing.assert_close(schedule.model_time(t), t.to(F64), rtol=0, atol=0)


@pytest.mark.parametrize(
    "schedule_repr,build",
    [
        (
            "VPSchedule.linear(beta_min=0.2, beta_max=10.0, t_min=0.0001, t_max=1.0)",
            lambda: VPSchedule.linear(0.2, 10.0, 1e-4, 1.0),
        ),
        ("VPSchedule.cosine(s=0.008, t_min=0.001, t_max=0.9946)", lambda: VPSchedule.cosine()),
        ("FlowSchedule(shift=3.0, t_min=0.001, t_max=0.999)", lambda: FlowSchedule(shift=3.0)),
        ("EDMSchedule(sigma_min=0.002, sigma_max=80.0, rho=7.0)", lambda: EDMSchedule()),
    ],
)
def test_repr_shows_parameters(schedule_repr, build):
    assert repr(build()) == schedule_repr


def test_discrete_repr_shows_size_and_ends():
    text = repr(schedule_from_config({}))
    assert "num_train_timesteps=1000" in text and "alphas_cumprod[0]=0.9999" in text


@pytest.mark.parametrize("beta_schedule", list(BETA_SCHEDULE_CONFIGS))
def test_schedule_from_config_in_float32_is_diffusers_own(beta_schedule):
    theirs = DDPMScheduler(beta_schedule=beta_schedule, **BETA_SCHEDULE_CONFIGS[beta_schedule])
    ours = schedule_from_config(theirs.config, torch.float32)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod.to(F64))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        schedule_from_config(DDPMScheduler(rescale_betas_zero_snr=True).config)
    flow = schedule_from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert isinstance(flow, FlowSchedule) and flow.shift == 3.0


@pytest.mark.parametrize("config,key", [
    (dict(use_flow_sigmas="false"), "use_flow_sigmas"),            # a truthy string: was read as a flow schedule
    (dict(rescale_betas_zero_snr="false"), "rescale_betas_zero_snr"),
    (dict(use_flow_sigmas=1, flow_shift=3.0), "use_flow_sigmas"),
])
def test_schedule_from_config_switch_that_is_not_a_bool_names_the_key(config, key):
    """As the scheduler's config: a switch is True or False; diffusers' JSON configs hold nothing else."""
    with pytest.raises(TypeError, match=rf"\b{key} must be True or False"):
        schedule_from_config(config)
    with pytest.raises(TypeError, match=rf"\b{key} must be True or False"):
        FusedMultistepScheduler(**config)


def test_schedule_from_config_trained_betas_must_cover_num_train_timesteps():
    """diffusers spaces its timesteps over num_train_timesteps: with fewer trained_betas they index past the
    table's end (its set_timesteps clamps them to the last level), so the schedule raises as the scheduler does."""
    betas = np.linspace(1e-4, 0.02, 500)
    for config in (dict(trained_betas=betas.tolist(), num_train_timesteps=1000), dict(trained_betas=betas.tolist())):
        with pytest.raises(ValueError, match=r"trained_betas has 500 entries but num_train_timesteps is 1000"):
            schedule_from_config(config)
    theirs = DDPMScheduler(trained_betas=betas.tolist(), num_train_timesteps=500)
    ours = schedule_from_config(theirs.config, torch.float32)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod.to(F64))


@pytest.mark.parametrize("dtype,error", [(torch.float16, ValueError), (torch.int64, ValueError),
                                         ("float32", TypeError)])
def test_schedule_from_config_dtype_is_float64_or_float32(dtype, error):
    with pytest.raises(error, match=r"^dtype must be torch.float64 or torch.float32"):
        schedule_from_config({}, dtype)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DPMSolverMultistepScheduler])
def test_zero_terminal_snr_config_error_advises_what_works(scheduler_class):
    """A zero-SNR config has no DiscreteVPSchedule, and neither has the scheduler's own alphas_cumprod (DDPM's ends
    at 0; DPM-Solver's at 2**-24, above the entry before it); the error points to the scheduler, which runs."""
    theirs = scheduler_class(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    with pytest.raises(ValueError) as info:
        schedule_from_config(theirs.config)
    assert "rescale_betas_zero_snr" in str(info.value) and "FusedMultistepScheduler" in str(info.value)
    with pytest.raises(ValueError, match="alphas_cumprod must"):
        VPSchedule.from_alphas_cumprod(theirs.alphas_cumprod)
    ours = FusedMultistepScheduler.from_config(theirs.config)
    ours.set_timesteps(5)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        x = ours.step(0.5 * x, t, x).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name,key", [("EDMEulerScheduler", "sigma_data"), ("EDMDPMSolverMultistepScheduler", "sigma_data"),
                                      ("CosineDPMSolverMultistepScheduler", "sigma_data"),
                                      ("CMStochasticIterativeScheduler", "sigma_data"), ("ScoreSdeVeScheduler", "sigma_max"),
                                      ("DDPMWuerstchenScheduler", "scaler")])
def test_schedule_from_config_of_a_non_vp_scheduler_names_a_key(name, key):
    """These configs carry no betas: read as a VP config they gave diffusers' default linear betas, a schedule of
    another model (an EDM model's sigma runs from 0.002 to 80, the default betas' from 0.01 to 157)."""
    import diffusers

    config = getattr(diffusers, name)().config
    assert not any(k in config for k in ("beta_start", "beta_end", "beta_schedule", "trained_betas"))
    with pytest.raises(ValueError, match=rf"scheduler config: {key} is a key of a scheduler whose noise schedule"):
        schedule_from_config(config)
    # an Euler config registers sigma_min / sigma_max beside its betas: still the betas' schedule
    euler = diffusers.EulerDiscreteScheduler()
    euler.register_to_config(sigma_min=0.1, sigma_max=10.0)
    assert torch.equal(schedule_from_config(euler.config, torch.float32).alphas_cumprod,
                       euler.alphas_cumprod.to(F64))


@pytest.mark.parametrize("key,value", [("invert_sigmas", True), ("use_dynamic_shifting", True), ("shift_terminal", 0.1)])
def test_schedule_from_config_of_flow_match_keys_a_schedule_cannot_honour(key, value):
    """FlowMatch's invert_sigmas (the model's time and sign), use_dynamic_shifting (the shift is set by mu at each
    set_timesteps) and shift_terminal (the grid's end): a FlowSchedule would silently sample something else (for
    FLUX's config, the grid of shift 3 instead of exp(mu)), so they raise naming the key; the scheduler honours
    them."""
    import diffusers

    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, **{key: value})
    with pytest.raises(ValueError, match=rf"scheduler config: {key}=.*FusedMultistepScheduler"):
        schedule_from_config(theirs.config)
    assert schedule_from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config).shift == 3.0
    ours = FusedMultistepScheduler.from_config(theirs.config)
    ours.set_timesteps(4, **({"mu": 1.0} if key == "use_dynamic_shifting" else {}))
    assert len(ours.timesteps) == 4
