"""sample() against the closed-form Gaussian oracle, and its behaviour at the edges."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import adjointdeis as ad
from adjointdeis import ops, planning
from adjointdeis.solvers import build_plan
from gaussian import GaussianEps, per_dimension

DIM = 16
STEPS = [20, 40, 80, 160]
SCHEDULES = {
    "vp_linear": lambda: ad.VPSchedule.linear(),
    "vp_cosine": lambda: ad.VPSchedule.cosine(),
    "vp_discrete": lambda: ad.VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)),
    "flow": lambda: ad.FlowSchedule(),
}


def oracle(schedule_name, seed=0):
    sched = SCHEDULES[schedule_name]()
    model = GaussianEps(sched, *per_dimension(DIM, seed))
    x_T = torch.randn(64, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return sched, model, x_T


def adapted(model, sched, prediction):
    return model if prediction == "eps" else ad.PredictionAdapter(model, sched, "eps", prediction)


def errors(schedule_name, prediction, solver, order):
    sched, model, x_T = oracle(schedule_name)
    result = []
    for n in STEPS:
        ts = sched.timesteps(n)
        with torch.no_grad():
            exact = model.flow_map(x_T, ts[0], ts[-1])
            x = ad.sample(adapted(model, sched, prediction), x_T, sched, steps=n, solver=solver,
                          order=order, prediction=prediction, lower_order_final=False)
        result.append((x - exact).abs().max().item())
    return result


def slope(errs):
    """Least-squares slope of -log(error) against log(N)."""
    xs = [math.log(n) for n in STEPS]
    ys = [-math.log(e) for e in errs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_convergence_order(schedule_name, prediction):
    errs = {(solver, order): errors(schedule_name, prediction, solver, order)
            for solver, order in [("ddim", 1), ("dpmpp", 2), ("deis", 2), ("dpmpp", 3), ("deis", 3), ("heun", 2)]}
    assert abs(slope(errs["ddim", 1]) - 1) < 0.3
    for order_two in [("dpmpp", 2), ("deis", 2), ("heun", 2)]:
        assert abs(slope(errs[order_two]) - 2) < 0.3, (order_two, errs[order_two])
    for solver in ("dpmpp", "deis"):
        # The order-1 warm-up caps the global order at 2; third order still wins from N = 40.
        third, second = errs[solver, 3], errs[solver, 2]
        assert all(e3 < e2 for n, e3, e2 in zip(STEPS, third, second) if n >= 40), (solver, third, second)


def run_rows_from_exact_history(model, sched, plan, ts, x_T, first_row):
    """Runs plan rows from `first_row` on, with the state and history taken from the exact solution."""
    points = [model.flow_map(x_T, ts[0], t) for t in ts]
    history = []
    for j in range(first_row):
        out = model(points[j], ts[j].expand(x_T.shape[0]))
        _, m0 = ops.multistep_step(points[j], out, [], plan.coeffs[j])
        history = [m0] + history[:1]
    # Rows before first_row computed m with their own (p, q): same time, same conversion.
    x = points[first_row]
    for row in range(first_row, len(plan)):
        out = model(x, ts[plan.eval_index[row]].expand(x_T.shape[0]))
        x, m0 = ops.multistep_step(x, out, history[:plan.num_history[row]], plan.coeffs[row])
        history = [m0] + history[:1]
    return x


def exact_start_errors(schedule_name, solver, third_order="published"):
    sched, model, x_T = oracle(schedule_name)
    errs = []
    with torch.no_grad():
        for n in STEPS:
            ts = sched.timesteps(n)
            points = [ad.solvers.GridPoint(a, s) for a, s in zip(sched.alpha(ts).tolist(), sched.sigma(ts).tolist())]
            plan = build_plan(points, solver, 3, "eps", lower_order_final=False, third_order=third_order)
            x = run_rows_from_exact_history(model, sched, plan, ts, x_T, first_row=2)
            errs.append((x - model.flow_map(x_T, ts[0], ts[-1])).abs().max().item())
    return errs


@pytest.mark.parametrize("schedule_name", ["vp_linear", "flow"])
@pytest.mark.parametrize("solver,third_order", [("deis", "published"), ("dpmpp", "taylor")])
def test_third_order_with_exact_start(schedule_name, solver, third_order):
    errs = exact_start_errors(schedule_name, solver, third_order)
    assert slope(errs) > 2.7, errs


@pytest.mark.parametrize("schedule_name", ["vp_linear", "flow"])
def test_published_dpmpp_3m_is_second_order(schedule_name):
    """The published 3M update halves the D2 weight (see solvers._dpmpp_row): order 2 even
    from an exact start, while the Taylor-weighted variant is far more accurate."""
    published = exact_start_errors(schedule_name, "dpmpp", "published")
    taylor = exact_start_errors(schedule_name, "dpmpp", "taylor")
    assert 1.7 < slope(published) < 2.5, published
    assert all(t < p / 3 for t, p in zip(taylor[1:], published[1:])), (taylor, published)


def test_edm_schedule_heun_and_dpmpp():
    sched = ad.EDMSchedule()
    model = GaussianEps(sched, *per_dimension(DIM))
    x_T = 80.0 * torch.randn(32, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for solver in ("heun", "dpmpp"):
            errs = []
            for n in STEPS:
                ts = sched.timesteps(n, "karras")
                x = ad.sample(model, x_T, sched, steps=n, solver=solver, spacing="karras", lower_order_final=False)
                errs.append((x - model.flow_map(x_T, ts[0], ts[-1])).abs().max().item())
            assert abs(slope(errs) - 2) < 0.3, (solver, errs)


@pytest.mark.parametrize("schedule_name", ["vp_linear", "flow"])
def test_dpmsolver_and_the_heun_second_order_converge(schedule_name):
    """The noise-prediction DPM-Solver at orders 1-3 and the "heun" second-order form of both DPM-Solvers."""
    def errs(solver, order, second_order="midpoint"):
        sched, model, x_T = oracle(schedule_name)
        out = []
        for n in STEPS:
            ts = sched.timesteps(n)
            with torch.no_grad():
                x = ad.sample(model, x_T, sched, steps=n, solver=solver, order=order, lower_order_final=False,
                              second_order=second_order)
            out.append((x - model.flow_map(x_T, ts[0], ts[-1])).abs().max().item())
        return out

    assert abs(slope(errs("dpmsolver", 1)) - 1) < 0.3
    second = {}
    for solver, form in [("dpmsolver", "midpoint"), ("dpmsolver", "heun"), ("dpmpp", "heun")]:
        second[solver, form] = errs(solver, 2, form)
        assert abs(slope(second[solver, form]) - 2) < 0.3, (solver, form, second[solver, form])
    third = errs("dpmsolver", 3)
    assert all(e3 < e2 for n, e3, e2 in zip(STEPS, third, second["dpmsolver", "midpoint"]) if n >= 40), third


@pytest.mark.parametrize("solver,order", [("dpmsolver", 2), ("dpmpp", 3)])
def test_new_sde_forms_match_the_data_distribution(solver, order):
    """The noise-prediction SDE-DPM-Solver-2 and SDE-DPM-Solver++(3M) sample the data's law (4000 samples)."""
    sched = ad.VPSchedule.linear()
    mu, s = per_dimension(4)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(4000, 4, dtype=torch.float64, generator=g)
    with torch.no_grad():
        x = ad.sample(GaussianEps(sched, mu, s), x_T, sched, steps=200, solver=solver, order=order, sde=True,
                      generator=g)
    # Standard errors of the mean and the std over 4000 samples: s/63 and s/89, plus 2% for the bias.
    assert ((x.mean(0) - mu).abs() < 4 * s / 63 + 0.02 * s).all(), x.mean(0) - mu
    assert ((x.std(0) - s).abs() < 4 * s / 89 + 0.02 * s).all(), x.std(0) - s


def test_renoise_rows_re_noise_the_data_prediction():
    """solver="renoise": every step is alpha_t x0-hat + sigma_t xi, xi drawn from the generator in order."""
    sched, model, x_T = oracle("vp_linear")
    ts = sched.timesteps(3)
    with torch.no_grad():
        got = ad.sample(model, x_T, sched, timesteps=ts, solver="renoise", generator=torch.Generator().manual_seed(4))
        g, x = torch.Generator().manual_seed(4), x_T
        for s, t in zip(ts[:-1], ts[1:]):
            x0 = (x - sched.sigma(s) * model(x, s.expand(len(x)))) / sched.alpha(s)
            x = sched.alpha(t) * x0 + sched.sigma(t) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert_close(got, x, rtol=1e-12, atol=1e-12)


def test_diffusers_timestep_convention():
    """N timesteps with steps=N: the end is implied (zero noise by default, or the schedule's t_min)."""
    sched, model, x_T = oracle("vp_discrete")
    timesteps = torch.tensor([999.0, 799.0, 599.0, 399.0, 199.0], dtype=torch.float64)
    with torch.no_grad():
        implied = ad.sample(model, x_T, sched, steps=5, timesteps=timesteps)
        explicit = ad.sample(model, x_T, sched, timesteps=torch.cat([timesteps, torch.zeros(1)]), denoise_to_zero=True)
        assert torch.equal(implied, explicit)
        to_t_min = ad.sample(model, x_T, sched, steps=5, timesteps=timesteps, denoise_to_zero=False)
        assert torch.equal(to_t_min, ad.sample(model, x_T, sched, timesteps=torch.cat([timesteps, torch.zeros(1)])))
        # A last timestep at t_min: its step is the identity (diffusers' DDIM with set_alpha_to_one=False).
        ending = torch.tensor([999.0, 666.0, 333.0, 0.0], dtype=torch.float64)
        identity = ad.sample(model, x_T, sched, steps=4, timesteps=ending, denoise_to_zero=False, solver="ddim")
        assert torch.equal(identity, ad.sample(model, x_T, sched, timesteps=ending, solver="ddim"))
        # ... and with denoise_to_zero the last step goes from t = 0 to zero noise: x0-hat there.
        cleaner = ad.sample(model, x_T, sched, steps=4, timesteps=ending, solver="ddim")
        zero = torch.zeros(1, dtype=torch.float64)
        x0_hat = (identity - sched.sigma(zero) * model(identity, zero.expand(len(x_T)))) / sched.alpha(zero)
        assert_close(cleaner, x0_hat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["deis", "dpmsolver"])
def test_noise_prediction_solvers_start_at_pure_noise(solver):
    """From a flow grid's t = 1 (alpha = 0) the eps-form step is its limit, the data-form DDIM step; the history
    restarts after it, and the solver still converges at second order."""
    from gaussian import GaussianFlow
    sched = ad.FlowSchedule(t_max=1.0)
    model = GaussianFlow(sched, *per_dimension(DIM))
    x_T = torch.randn(64, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ts = sched.timesteps(8, "uniform")
    points = [ad.solvers.GridPoint(a, s) for a, s in zip(sched.alpha(ts).tolist(), sched.sigma(ts).tolist())]
    plan = build_plan(points, solver, 3, "flow", lower_order_final=False)
    assert plan.rows[0] == build_plan(points, "ddim", 1, "flow").rows[0]
    assert plan.num_history[:4] == (0, 0, 1, 2)
    errs = {}
    for name, order in ((solver, 2), ("ddim", 1)):
        errs[name] = []
        for n in STEPS:
            ts = sched.timesteps(n, "uniform")
            with torch.no_grad():
                x = ad.sample(model, x_T, sched, timesteps=ts, solver=name, order=order, prediction="flow",
                              lower_order_final=False)
            errs[name].append((x - model.flow_map(x_T, ts[0], ts[-1])).abs().max().item())
    # The uniform-t grid's last step is a long jump in log-SNR, so the slope is still rising (1.6 at N <= 160).
    assert slope(errs[solver]) > 1.5 and errs[solver][-1] < errs["ddim"][-1] / 5, errs
    assert all(e < d for e, d in zip(errs[solver], errs["ddim"])), errs


def test_a_zero_length_step_is_the_identity_and_restarts_the_history():
    sched = ad.VPSchedule.linear()
    ts = torch.tensor([1.0, 0.7, 0.5, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    points = [ad.solvers.GridPoint(a, s) for a, s in zip(sched.alpha(ts).tolist(), sched.sigma(ts).tolist())]
    for solver in ("dpmpp", "deis", "dpmsolver"):
        plan = build_plan(points, solver, 3, "eps", lower_order_final=False)
        assert plan.num_history == (0, 1, 0, 0, 1, 2), (solver, plan.num_history)
        assert plan.rows[2][:5] == (1.0, 0.0, 0.0, 0.0, 0.0)
        full = build_plan(points[3:], solver, 3, "eps", lower_order_final=False)
        assert plan.rows[3:] == full.rows  # after the restart: the plan of the grid that starts there


def test_denoise_to_zero_lands_on_the_data_mean_map():
    sched, model, x_T = oracle("vp_linear")
    with torch.no_grad():
        x = ad.sample(model, x_T, sched, steps=200, solver="dpmpp", order=2, denoise_to_zero=True)
        exact = model.flow_map(x_T, sched.t_max, 0.0)
    assert_close(x, exact, rtol=0, atol=2e-3)


def test_sde_matches_the_data_distribution():
    sched = ad.VPSchedule.linear()
    mu, s = per_dimension(4)
    model = GaussianEps(sched, mu, s)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 4, dtype=torch.float64, generator=g)
    with torch.no_grad():
        # Steps enough for the discretisation bias (O(1/N) at order 1) to fall below 1%.
        for order, steps in ((1, 800), (2, 200)):
            x = ad.sample(model, x_T, sched, steps=steps, solver="dpmpp", order=order, sde=True, generator=g)
            # Standard errors of the mean and the std over 20k samples: s/141 and s/200.
            assert ((x.mean(0) - mu).abs() < 4 * s / 141 + 0.01 * s).all(), (order, x.mean(0) - mu)
            assert ((x.std(0) - s).abs() < 4 * s / 200 + 0.01 * s).all(), (order, x.std(0) - s)


def test_sde_reproducible_from_the_generator_seed():
    sched, model, x_T = oracle("vp_linear")
    runs = [ad.sample(model, x_T, sched, steps=10, sde=True, generator=torch.Generator().manual_seed(seed))
            for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_noise_source_replaces_the_generator():
    """noise(row, x) supplies the stochastic rows' noise: the same draws as the generator give the same sample,
    the rows it is asked for are the plan's noisy ones, in order, and it cannot be combined with a generator; the
    draws as one tensor give the same sample."""
    sched, model, x_T = oracle("vp_linear")
    g = torch.Generator().manual_seed(3)
    asked = []

    def noise(row, x):
        asked.append(row)
        return torch.randn(x.shape, generator=g, dtype=x.dtype)

    from_source = ad.sample(model, x_T, sched, steps=6, order=2, sde=True, noise=noise)
    from_generator = ad.sample(model, x_T, sched, steps=6, order=2, sde=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(from_source, from_generator)
    assert asked == list(range(6))
    with pytest.raises(ValueError, match="not both"):
        ad.sample(model, x_T, sched, steps=6, sde=True, noise=noise, generator=g)
    with pytest.raises(TypeError, match="noise must be callable"):
        ad.sample(model, x_T, sched, steps=6, sde=True, noise=3.0)
    # The noises themselves, one (N, *x.shape) tensor: the draws the source handed out, the same sample.
    draws = torch.randn(6, *x_T.shape, generator=torch.Generator().manual_seed(3), dtype=x_T.dtype)
    assert torch.equal(ad.sample(model, x_T, sched, steps=6, order=2, sde=True, noise=draws), from_generator)


def test_batch_independence_and_dtypes():
    sched, model, x_T = oracle("vp_linear")
    with torch.no_grad():
        full = ad.sample(model, x_T, sched, steps=12)
        parts = torch.cat([ad.sample(model, x_T[i:i + 1], sched, steps=12) for i in range(3)])
        assert_close(full[:3], parts, rtol=1e-13, atol=1e-13)
        f32 = ad.sample(model.float(), x_T.float(), sched, steps=12)
        assert_close(f32.double(), full, rtol=1e-4, atol=1e-4)
        bf16 = ad.sample(model.float(), x_T.bfloat16(), sched, steps=12)
        assert bf16.dtype == torch.bfloat16
        assert_close(bf16.double(), full, rtol=0.05, atol=0.05)


def test_classifier_free_guidance():
    sched, model, x_T = oracle("vp_linear")
    cond = torch.full((64, DIM), 0.5, dtype=torch.float64)
    uncond = torch.zeros(64, DIM, dtype=torch.float64)
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return model(x, t, c)

    with torch.no_grad():
        w = 3.0
        guided = ad.sample(counting, x_T, sched, steps=10, cond=cond, uncond=uncond, guidance_scale=w)
        assert calls == [128] * 10  # one batched call per step

        # Guidance on an affine-in-cond model equals conditioning on the extrapolated cond.
        direct = ad.sample(model, x_T, sched, steps=10, cond=uncond + w * (cond - uncond))
        assert_close(guided, direct, rtol=1e-12, atol=1e-12)

        per_sample = torch.tensor([1.0, 3.0] * 32, dtype=torch.float64).view(64, 1)
        mixed = ad.sample(model, x_T, sched, steps=10, cond=cond, uncond=uncond, guidance_scale=per_sample)
        assert_close(mixed[1::2], guided[1::2], rtol=1e-12, atol=1e-12)
        plain = ad.sample(model, x_T, sched, steps=10, cond=cond)
        assert_close(mixed[0::2], plain[0::2], rtol=1e-12, atol=1e-12)

        dict_model = lambda x, t, c: model(x, t, c["shift"])
        dict_guided = ad.sample(dict_model, x_T, sched, steps=10, cond={"shift": cond},
                                uncond={"shift": uncond}, guidance_scale=w)
        assert_close(dict_guided, guided, rtol=1e-12, atol=1e-12)


def test_explicit_timesteps_equal_generated_grid():
    sched, model, x_T = oracle("vp_cosine")
    with torch.no_grad():
        a = ad.sample(model, x_T, sched, steps=9, spacing="quadratic")
        b = ad.sample(model, x_T, sched, timesteps=sched.timesteps(9, "quadratic"))
    assert torch.equal(a, b)


def test_compile_whole_sample_fullgraph():
    sched = ad.VPSchedule.linear()
    net = torch.nn.Sequential(torch.nn.Linear(DIM + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, DIM))
    model = lambda x, t: net(torch.cat([x, t[:, None]], 1))
    x_T = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))

    def run(x):
        return ad.sample(model, x, sched, steps=6, solver="dpmpp", order=3)

    with torch.no_grad():
        assert_close(torch.compile(run, fullgraph=True)(x_T), run(x_T), rtol=1e-5, atol=1e-5)
    # A closure's name is a cell, and torch 2.13's tracer cannot delete one (DELETE_DEREF): the loop has none.
    assert planning.run_plan.__code__.co_cellvars == ()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(solver="euler"), ValueError, "unknown solver"),
        (dict(prediction="score"), ValueError, "unknown prediction"),
        (dict(solver="ddim", order=2), ValueError, "supports order"),
        (dict(solver="heun", order=3), ValueError, "supports order"),
        (dict(solver="deis", sde=True), ValueError, "sde=True"),
        (dict(steps=None, timesteps=torch.tensor([0.5, 0.7, 0.1], dtype=torch.float64)), ValueError, "decreasing"),
        (dict(timesteps=torch.tensor([0.7, 0.5, 0.1], dtype=torch.float64)), ValueError, "timesteps has 3 values"),
        (dict(solver="dpmsolver", sde=True, order=3), ValueError, "sde=True"),
        (dict(second_order="trapezoid"), ValueError, "second_order"),
        (dict(threshold=(0.9, 1.0)), TypeError, "DynamicThreshold"),
        (dict(guidance_scale=2.0), ValueError, "uncond"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    sched, model, x_T = oracle("vp_linear")
    with pytest.raises(error, match=message):
        ad.sample(model, x_T, sched, **{"steps": 5, **kwargs})


def test_order_is_checked_whatever_plans_are_cached():
    """2.0 and True equal 2 and 1 as dict keys: they raise whether or not a plan of order 2 or 1 is cached; a
    NumPy integer is its int."""
    sched, model, x_T = oracle("vp_linear")
    for cached in (False, True):
        if cached:
            for order in (1, 2):
                ad.sample(model, x_T, sched, steps=4, order=order)
        for order in (2.0, True):
            with pytest.raises(ValueError, match="supports order 1/2/3"):
                ad.sample(model, x_T, sched, steps=4, order=order)
    assert torch.equal(ad.sample(model, x_T, sched, steps=4, order=np.int64(2)),
                       ad.sample(model, x_T, sched, steps=4, order=2))


def test_model_output_errors():
    sched, model, x_T = oracle("vp_linear")
    with pytest.raises(ValueError, match="model returned shape"):
        ad.sample(lambda x, t: x[:, :3], x_T, sched, steps=3)
    with pytest.raises(FloatingPointError, match="NaN"):
        ad.sample(lambda x, t: torch.full_like(x, float("nan")), x_T, sched, steps=3)
    with pytest.raises(TypeError, match="x_T"):
        ad.sample(model, torch.zeros(3, dtype=torch.long), sched, steps=3)


@pytest.mark.cuda
def test_cuda_sample_matches_cpu_without_host_sync():
    sched, model, x_T = oracle("vp_linear")
    cuda_model = lambda x, t: torch.tanh(x) * 0.5 + t[:, None].to(x) * 1e-3
    with torch.no_grad():
        want = ad.sample(cuda_model, x_T.float(), sched, steps=10, solver="dpmpp", order=3)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ad.sample(cuda_model, x_T.float().cuda(), sched, steps=10, solver="dpmpp", order=3,
                            check_finite=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
def test_cuda_graph_captures_a_whole_sample_call(sde):
    """After one warm-up run, a whole ``sample`` call captures into a CUDA graph (the coefficient tables are
    the warm-up's, the finiteness check is skipped while capturing); replays on new noise match eager runs."""
    sched, _, x_T = oracle("vp_linear")
    model = lambda x, t: torch.tanh(x) * 0.5 + t[:, None].to(x) * 1e-3
    static = x_T.float().cuda()
    run = lambda: ad.sample(model, static, sched, steps=10, order=2, sde=sde, generator=None)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # warm-up: uploads the plan's tables
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        for seed in (1, 2):
            static.copy_(torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed)))
            if sde:
                torch.cuda.manual_seed(seed)
            graph.replay()
            if sde:
                torch.cuda.manual_seed(seed)
            assert_close(out, run(), rtol=1e-6, atol=1e-6)


def test_a_plan_uploads_its_tables_once_per_device_and_dtype(monkeypatch):
    from adjointdeis import planning
    from adjointdeis.planning import device_tables, plan_sampling

    monkeypatch.setattr(planning, "_DEVICE_TABLES", {})  # the suite's earlier runs may have filled the memo

    sched = ad.VPSchedule.linear()
    plan = plan_sampling(sched, 8, "logsnr", None, False, "dpmpp", 2, "eps")
    again = plan_sampling(sched, 8, "logsnr", None, False, "dpmpp", 2, "eps")
    first = device_tables(plan, torch.device("cpu"), torch.float32)
    assert all(a is b for a, b in zip(first, device_tables(again, torch.device("cpu"), torch.float32)))
    assert device_tables(plan, torch.device("cpu"), torch.float64)[1].dtype == torch.float64
    assert torch.equal(first[0], plan.steps.coeffs) and first[1].dtype == torch.float32


def test_plans_are_reused_for_equal_schedules_and_rebuilt_when_one_changes(monkeypatch):
    from adjointdeis import planning
    from adjointdeis.planning import plan_sampling

    monkeypatch.setattr(planning, "_PLANS", {})
    args = (8, "logsnr", None, False, "dpmpp", 2, "eps")
    plan = plan_sampling(ad.VPSchedule.linear(), *args)
    assert plan_sampling(ad.VPSchedule.linear(), *args) is plan  # equal by value: the memo's plan
    assert plan_sampling(ad.VPSchedule.linear(beta_max=19.0), *args) is not plan
    assert plan_sampling(ad.VPSchedule.linear(), 9, *args[1:]) is not plan
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sched = ad.VPSchedule.from_betas(betas)
    discrete = plan_sampling(sched, *args)
    for name, value in list(vars(sched).items()):  # the same object, changed in place
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            value.mul_(0.5)
    changed = plan_sampling(sched, *args)
    assert changed is not discrete and changed.steps != discrete.steps
    fresh = planning._plan_on_grid(sched, *planning.sampling_grid(sched, 8, "logsnr", None, False),
                                   changed.settings)
    assert changed == fresh
    monkeypatch.setattr(planning, "PLANS_KEPT", 2)
    monkeypatch.setattr(planning, "_PLANS", {})
    for n in (3, 4, 5):
        plan_sampling(ad.VPSchedule.linear(), n, *args[1:])
    assert len(planning._PLANS) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_the_finiteness_check_finds_every_nan_and_inf(dtype):
    from adjointdeis.planning import all_finite

    x = torch.randn(3, 5, 7).to(dtype)
    assert all_finite(x) and all_finite(x[:, ::2]) and all_finite(x[:0])
    for value in (float("nan"), float("inf"), -float("inf")):
        for index in ((0, 0, 0), (1, 2, 3), (2, 4, 6)):
            y = x.clone()
            y[index] = value
            assert not all_finite(y) and not all_finite(y.transpose(0, 2))
    huge = torch.full((4, 3), torch.finfo(dtype).max, dtype=dtype)  # finite, but their sum overflows
    assert all_finite(huge) and all_finite(-huge)
    huge[2, 1] = float("nan")
    assert not all_finite(huge)
    with pytest.raises(FloatingPointError, match="not finite"):
        ad.sample(lambda x, t: torch.full_like(x, float("nan")), torch.randn(2, 3), ad.VPSchedule.linear(), steps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [0, -1])
def test_a_recycling_run_finds_a_nan_made_in_its_last_step(dtype, value, where):
    """A CPU run large enough to step in place checks its last state in the last step's kernel (not in a pass
    after the loop): a NaN or an infinity that only the last model evaluation returns, in one element, first or
    last, raises; the same run without the check returns it; and a callback, which may change the last state
    after the kernel ran, leaves the check to the pass after the loop."""
    sched = ad.VPSchedule.linear()
    x_T = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)  # recycled: >= 128 KiB
    calls = []

    def model(x, t):
        calls.append(None)
        eps = _toy_eps(x, t)
        if len(calls) == 6:  # the last of six evaluations
            eps.view(-1)[where] = value
        return eps

    with pytest.raises(FloatingPointError, match="not finite"):
        ad.sample(model, x_T, sched, steps=6, solver="dpmpp", order=2)
    calls.clear()
    unchecked = ad.sample(model, x_T, sched, steps=6, solver="dpmpp", order=2, check_finite=False)
    assert not torch.isfinite(unchecked.view(-1)[where]) and torch.isfinite(unchecked.view(-1)[1:-1]).all()
    calls.clear()
    assert torch.isfinite(ad.sample(_toy_eps, x_T, sched, steps=6, solver="dpmpp", order=2)).all()

    def spoiling(info):  # writes a NaN into the last state after its kernel
        if info.row == 5:
            info.x_next.view(-1)[where] = float("nan")

    with pytest.raises(FloatingPointError, match="not finite"):
        ad.sample(_toy_eps, x_T, sched, steps=6, solver="dpmpp", order=2, callback=spoiling)


def test_the_solver_registry_describes_every_solver():
    from adjointdeis.solvers import SOLVERS, check_solver, resolve_order

    sched = ad.VPSchedule.linear()
    ts = sched.timesteps(5)
    points = [ad.solvers.GridPoint(a, s) for a, s in zip(sched.alpha(ts).tolist(), sched.sigma(ts).tolist())]
    assert list(SOLVERS) == ["ddim", "deis", "dpmpp", "dpmsolver", "heun", "renoise"]
    assert SOLVERS["ddim"].alias_of == "dpmpp" and SOLVERS["ddim"].orders == (1,)
    assert build_plan(points, "ddim", 1, "eps") == build_plan(points, "dpmpp", 1, "eps")
    assert build_plan(points, "ddim", 1, "eps", sde=True) == build_plan(points, "dpmpp", 1, "eps", sde=True)
    for name, entry in SOLVERS.items():
        assert check_solver(name) is entry and resolve_order(name, None, False) == entry.default_order
        for order in entry.orders:
            assert len(build_plan(points, name, order, "eps")) == entry.evaluations(5)
        for order in entry.sde_orders:
            assert resolve_order(name, order, True) == order
    assert SOLVERS["heun"].evaluations(5) == 9


def test_plans_are_immutable_and_hand_out_their_own_tensors():
    sched = ad.VPSchedule.linear()
    ts = sched.timesteps(4)
    points = [ad.solvers.GridPoint(a, s) for a, s in zip(sched.alpha(ts).tolist(), sched.sigma(ts).tolist())]
    plan = build_plan(points, "dpmpp", 2, "eps")
    want = plan.coeffs.clone()
    plan.coeffs.zero_()
    assert torch.equal(plan.coeffs, want)
    with pytest.raises(AttributeError):
        plan.rows = ()


def test_callback_sees_every_evaluation_without_changing_the_sample():
    sched, model, x_T = oracle("vp_linear")
    seen = []
    with torch.no_grad():
        plain = ad.sample(model, x_T, sched, steps=6, solver="dpmpp", order=3)
        watched = ad.sample(model, x_T, sched, steps=6, solver="dpmpp", order=3, callback=seen.append)
    assert torch.equal(plain, watched)
    ts = sched.timesteps(6)
    assert [info.step for info in seen] == list(range(6)) and all(info.starts_step for info in seen)
    for info in seen:
        assert info.t.item() == pytest.approx(ts[info.step].item(), rel=1e-15)
        assert torch.equal(info.output, model(info.x, info.t.expand(len(x_T))))
    assert torch.equal(seen[-1].x_next, watched)


def _toy_eps(x, t):
    return 0.3 * x + 0.1 * torch.sin(t.view(-1, *([1] * (x.dim() - 1))) * 7.0)


@pytest.fixture
def runs(monkeypatch):
    """The planning.Spares of every run_plan call made in the test, in order."""
    made = []

    class Recorded(planning.Spares):
        def __init__(self):
            super().__init__()
            made.append(self)

    monkeypatch.setattr(planning, "Spares", Recorded)
    return made


@pytest.mark.parametrize("solver,order,sde", [("dpmpp", 2, False), ("dpmpp", 3, False), ("ddim", 1, False),
                                              ("dpmpp", 2, True), ("heun", 2, False)])
def test_a_cpu_run_recycles_the_tensors_it_dropped_and_nothing_anyone_holds(solver, order, sde, runs, monkeypatch):
    """A CPU run steps in place, or writes its steps into the tensors it dropped (a few buffers in all, not two
    fresh ones per step), with the same result as a run that allocates every state and one where every state is
    held elsewhere; what the model, a callback or the caller still holds (names, views, weak references) is never
    overwritten."""
    sched = ad.VPSchedule.linear()
    x_T = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))  # 128 KiB: planning.RECYCLE_BYTES
    x_T_copy = x_T.clone()
    kwargs = dict(steps=12, solver=solver, order=order, sde=sde)

    rows = []
    free = ad.sample(_toy_eps, x_T, sched, generator=torch.Generator().manual_seed(1),
                     callback=lambda info: rows.append(info.row), **kwargs)
    assert len(rows) >= 12 and runs[-1].fresh <= 6  # 2 per row without recycling
    in_place = ad.sample(_toy_eps, x_T, sched, generator=torch.Generator().manual_seed(1), **kwargs)
    assert runs[-1].fresh <= 3 and runs[-1].in_place >= len(rows) - 1  # no callback: x_next in place of x
    with monkeypatch.context() as m:
        m.setattr(planning, "_recycles", lambda x: False)
        allocating = ad.sample(_toy_eps, x_T, sched, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(in_place, allocating) and torch.equal(free, allocating)
    ad.sample(_toy_eps, x_T[:1], sched, **kwargs)
    assert len(runs) == 2  # a state below 128 KiB allocates: malloc's free lists are quicker than the check

    held, copies, views, weak = [], [], [], []

    def keeping_model(x, t):  # caches its inputs three ways
        held.append(x)
        copies.append(x.clone())
        views.append(x[0])
        weak.append(__import__("weakref").ref(x))
        return _toy_eps(x, t)

    infos = []
    kept = ad.sample(keeping_model, x_T, sched, generator=torch.Generator().manual_seed(1), callback=infos.append,
                     **kwargs)
    assert torch.equal(kept, free)
    assert torch.equal(x_T, x_T_copy)
    for x, copy, view in zip(held, copies, views):
        assert torch.equal(x, copy) and torch.equal(view, copy[0])
    for info, nxt in zip(infos, infos[1:]):
        assert torch.equal(info.x_next, nxt.x)  # the states the callback kept are intact

    held.clear()
    copies.clear()
    ad.sample(lambda x, t: (held.append(x), copies.append(x.clone()), _toy_eps(x, t))[2], x_T, sched,
              generator=torch.Generator().manual_seed(1), **kwargs)  # no callback: the loop would step in place
    assert len(held) >= 12 and all(torch.equal(x, copy) for x, copy in zip(held, copies))
    with monkeypatch.context() as m:  # a model returning its input (out is x itself)
        m.setattr(planning, "_recycles", lambda x: False)
        want = ad.sample(lambda x, t: x, x_T, sched, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(ad.sample(lambda x, t: x, x_T, sched, generator=torch.Generator().manual_seed(1), **kwargs),
                       want)

    views.clear()
    only_views = []
    ad.sample(lambda x, t: (only_views.append((x[1:], x[1:].clone())), _toy_eps(x, t))[1], x_T, sched,
              generator=torch.Generator().manual_seed(1), **kwargs)
    assert all(torch.equal(view, copy) for view, copy in only_views)
    only_weak = []
    ad.sample(lambda x, t: (only_weak.append((__import__("weakref").ref(x), x.clone())), _toy_eps(x, t))[1], x_T,
              sched, generator=torch.Generator().manual_seed(1), **kwargs)
    assert all(ref() is None or torch.equal(ref(), copy) for ref, copy in only_weak)


def test_a_cpu_run_leaves_its_free_buffers_to_the_next_run_and_nothing_anyone_holds(runs, monkeypatch):
    """What a finished CPU run no longer needs (its history buffer) is kept for the next run of that shape, which
    then allocates one buffer fewer (no pages to fault in again when glibc has trimmed its heap) and gives the same
    sample; what a callback kept stays intact; RETAIN_BYTES bounds it and empty_cache frees it."""
    sched = ad.VPSchedule.linear()
    x_T = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(steps=8, solver="dpmpp", order=2)
    with monkeypatch.context() as m:
        m.setattr(planning, "_recycles", lambda x: False)
        want = ad.sample(_toy_eps, x_T, sched, **kwargs)
    planning.empty_cache()
    assert planning.RETAINED.nbytes == 0
    first = ad.sample(_toy_eps, x_T, sched, **kwargs)
    assert runs[-1].reused == 0 and planning.RETAINED.nbytes == x_T.nbytes  # the history buffer
    second = ad.sample(_toy_eps, x_T, sched, **kwargs)
    assert runs[-1].reused == 1 and runs[-1].fresh == runs[0].fresh - 1
    assert torch.equal(first, want) and torch.equal(second, want) and first.data_ptr() != second.data_ptr()
    ad.sample(_toy_eps, torch.cat([x_T, x_T]), sched, **kwargs)  # another shape takes nothing kept
    assert len(runs) == 3 and runs[-1].reused == 0 and planning.RETAINED.nbytes == 3 * x_T.nbytes

    kept = []
    ad.sample(_toy_eps, x_T, sched, callback=lambda info: kept.append((info.converted, info.converted.clone())),
              **kwargs)
    ad.sample(_toy_eps, x_T, sched, **kwargs)
    assert all(torch.equal(m0, copy) for m0, copy in kept)  # the callback's history never reached the next run

    with torch.inference_mode():  # a buffer made in inference mode is never a normal run's, nor the reverse
        planning.empty_cache()
        inferred = ad.sample(_toy_eps, x_T, sched, **kwargs)
    normal = ad.sample(_toy_eps, x_T, sched, **kwargs)
    assert runs[-1].reused == 0 and not normal.is_inference() and torch.equal(normal, want)
    assert torch.equal(inferred, want)

    planning.empty_cache()
    x = x_T.clone().requires_grad_()
    ad.sample(_toy_eps, x, sched, **kwargs)  # rows with grad leave nothing
    assert planning.RETAINED.nbytes == 0
    monkeypatch.setattr(planning, "RETAIN_BYTES", x_T.nbytes - 1)
    ad.sample(_toy_eps, x_T, sched, **kwargs)
    assert planning.RETAINED.nbytes == 0
    monkeypatch.setattr(planning, "RETAIN_BYTES", 64 << 20)
    ad.sample(_toy_eps, x_T, sched, **kwargs)
    assert planning.RETAINED.nbytes > 0
    ad.empty_cache()
    assert planning.RETAINED.nbytes == 0


def test_concurrent_cpu_runs_share_the_kept_buffers_safely():
    """Threads sampling at once take and leave kept buffers under a lock: each gets its sequential sample."""
    import threading

    sched = ad.VPSchedule.linear()
    starts = [torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    want = [ad.sample(_toy_eps, x, sched, steps=10, solver="dpmpp", order=2) for x in starts]
    got = [[] for _ in starts]

    def work(k):
        for _ in range(5):
            got[k].append(ad.sample(_toy_eps, starts[k], sched, steps=10, solver="dpmpp", order=2))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(starts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(x, w) for xs, w in zip(got, want) for x in xs) and all(len(xs) == 5 for xs in got)


_TRACED_IMPORT = """
import sys
def tracer(frame, event, arg):  # reads the locals of planning's frames, as a debugger's watch would
    if frame.f_code.co_filename.endswith("planning.py"):
        frame.f_locals
    return tracer
sys.settrace(tracer)
from adjointdeis import planning
sys.settrace(None)
print(planning._NOBODY == planning._nobody())
"""


def test_the_ownership_counts_measured_at_import_ignore_a_tracer():
    """A tracer that reads f_locals holds references of its own; counts measured under it at import would make the
    run loop judge a tensor held elsewhere free, and overwrite it."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TRACED_IMPORT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1:] == ["True"]


@pytest.mark.parametrize("solver", ["dpmpp", "heun"])
def test_rows_run_with_grad_neither_recycle_nor_keep_what_they_drop(solver, runs):
    """Under grad mode a dropped state may be in the graph: those rows allocate, hold no dropped tensor (memory
    stays what it was) and give the no-grad run's sample; with truncation the constant rows before it recycle."""
    sched = ad.VPSchedule.linear()
    x_T = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    plan = planning.plan_sampling(sched, 6, "logsnr", None, False, solver, 2, "eps")
    with torch.no_grad():
        want = planning.run_plan(_toy_eps, x_T, plan)
    held = []
    got = planning.run_plan(_toy_eps, x_T, plan, callback=lambda info: held.append(len(runs[-1].dropped)))
    assert torch.equal(got, want) and held == [0] * len(held) and runs[-1].fresh == 0
    x = x_T.clone().requires_grad_()
    got = planning.run_plan(_toy_eps, x, plan, grad_from=planning.truncation_row(plan, 2))
    assert torch.equal(got.detach(), want) and runs[-1].fresh + runs[-1].reused > 0


@pytest.mark.parametrize("solver, options", [("dpmpp", {}), ("dpmpp", dict(sde=True)), ("ddim", {}), ("deis", {}),
                                             ("dpmsolver", {}), ("dpmsolver", dict(sde=True, order=2))])
def test_a_grid_that_reaches_zero_noise_before_its_end(solver, options):
    """A discrete schedule whose first beta is 0 has alpha = 1 at timestep 0, so diffusers' N timesteps ending at
    0 reach zero noise one step before the implied end: that step is first order (an infinite log-SNR step) and
    the last one, from zero noise to zero noise, is the identity. Oracle: the N - 1 step run on the same grid."""
    betas = torch.linspace(0.0, 0.02, 1000, dtype=torch.float64)
    sched = ad.VPSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    model = lambda x, t: 0.1 * x + 0.01 * t[:, None]  # noqa: E731
    x_T = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(steps):
        generator = torch.Generator().manual_seed(1) if options.get("sde") else None
        return ad.sample(model, x_T, sched, steps=steps, timesteps=[999, 600, 300, 0], solver=solver,
                         generator=generator, **options)

    assert torch.equal(run(4), run(3))


class _TimedMLP(torch.nn.Module):
    """eps(x, t) = tanh(x W + b) (1 + t / 1000) on the last axis."""

    def __init__(self, dim=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        return torch.tanh(x @ self.weight + self.bias) * (1 + t.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) / 1000)


@pytest.mark.parametrize("shape", [(2, 6), (8, 512, 6)])  # the second recycles buffers (>= 128 KiB) but in forward AD
@pytest.mark.parametrize("solver,order", [("dpmpp", 2), ("deis", 3), ("heun", 2)])
def test_forward_mode_ad_through_sample_matches_the_discrete_adjoint(shape, solver, order):
    """torch.func.jvp and forward_ad through sample: w . (J v) equals (J^T w) . v from the exact discrete adjoint
    (before, the fused step dropped the tangents: zeros from torch.func.jvp, None from forward_ad)."""
    sched, model = ad.VPSchedule.linear(), _TimedMLP().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, v, w = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    run = lambda x: ad.sample(model, x, sched, steps=6, solver=solver, order=order)
    xr = x.clone().requires_grad_()
    (vjp,) = torch.autograd.grad(ad.sample(model, xr, sched, steps=6, solver=solver, order=order, grad="discrete"),
                                 xr, w)
    want = (vjp * v).sum()
    sample, tangent = torch.func.jvp(run, (x,), (v,))
    assert_close(sample, run(x), rtol=1e-12, atol=1e-12)
    assert_close((w * tangent).sum(), want, rtol=1e-10, atol=1e-10)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(run(torch.autograd.forward_ad.make_dual(x, v))).tangent
    assert tangent is not None
    assert_close((w * tangent).sum(), want, rtol=1e-10, atol=1e-10)


def test_torch_func_grad_vmap_and_jacrev_through_sample():
    """torch.func.grad through sample with a functional_call model (the parameters reach the model through the
    transform, not as the module's), jacrev, and vmap, against plain autograd and a loop."""
    sched, model = ad.VPSchedule.linear(), _TimedMLP()
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x):
        functional = lambda x, t: torch.func.functional_call(model, params, (x, t))
        return (ad.sample(functional, x, sched, steps=5) ** 2).sum()

    want = torch.autograd.grad((ad.sample(model, x, sched, steps=5, grad="discrete") ** 2).sum(),
                               list(model.parameters()))
    got = torch.func.grad(loss)(params, x)
    for name, w in zip(params, want):
        assert_close(got[name], w, rtol=1e-10, atol=1e-10)
    frozen = model.requires_grad_(False)
    jac = torch.func.jacrev(lambda x: ad.sample(frozen, x, sched, steps=5))(x)
    want_jac = torch.autograd.functional.jacobian(lambda x: ad.sample(frozen, x, sched, steps=5, grad="autograd"), x)
    assert_close(jac, want_jac, rtol=1e-10, atol=1e-10)
    with_parameters = torch.func.jacrev(lambda x: ad.sample(frozen, x, sched, steps=5, parameters=[]))(x)
    assert_close(with_parameters, want_jac, rtol=1e-10, atol=1e-10)  # parameters= has no effect under a transform
    batched = torch.func.vmap(lambda x: ad.sample(frozen, x[None], sched, steps=5)[0])(x)  # check_finite skipped
    assert_close(batched, torch.cat([ad.sample(frozen, row[None], sched, steps=5) for row in x]),
                 rtol=1e-12, atol=1e-12)


def test_own_backward_modes_refuse_torch_func_transforms():
    sched, model = ad.VPSchedule.linear(), _TimedMLP()
    x = torch.randn(2, 6, dtype=torch.float64)
    for grad in ("discrete", "adjoint"):
        with pytest.raises(RuntimeError, match=f"grad='{grad}' runs its own backward pass"):
            torch.func.grad(lambda x: ad.sample(model, x, sched, steps=4, grad=grad).sum())(x)
    with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match="grad='discrete' runs its own"):
        ad.sample(model, torch.autograd.forward_ad.make_dual(x, x), sched, steps=4, grad="discrete")
