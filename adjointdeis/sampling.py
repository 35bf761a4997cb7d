"""``sample``: multistep exponential-integrator sampling with one fused kernel per step."""

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import ops
from .gradients import (ADJOINT_FORMS, GRAD_MODES, STATE_MODES, AdjointConfig, Conditioning, SamplerSpec,
                        _Sampler, model_parameters)
from .models import evaluate_model
from .schedules import FlowSchedule, NoiseSchedule
from .solvers import PREDICTIONS, GridPoint, StepPlan, build_plan, resolve_order


def sampling_grid(sched: NoiseSchedule, steps: int, spacing: str = "logsnr",
                  timesteps: Tensor | None = None, denoise_to_zero: bool = False) -> tuple[Tensor, list[GridPoint]]:
    """The time grid of a sampling run and its (alpha, sigma) points.

    Args:
        sched: the noise schedule.
        steps: number of steps N (ignored when `timesteps` is given).
        spacing: grid spacing for ``sched.timesteps``.
        timesteps: optional explicit grid, (N+1,) strictly decreasing, noisiest first.
        denoise_to_zero: replace the grid's last point by zero noise (alpha=1, sigma=0),
            as diffusers' ``final_sigmas_type="zero"``.

    Returns:
        ``(ts, points)``: ts (N+1,) float64 times (its last entry unused when denoising to
        zero), points the N+1 grid points.
    """
    if timesteps is None:
        ts = sched.timesteps(steps, spacing)
    else:
        ts = sched.check_grid(timesteps)
        if ts.numel() < 2:
            raise ValueError(f"timesteps must hold at least 2 times (one step), got {ts.numel()}")
    alphas, sigmas = sched.alpha(ts).tolist(), sched.sigma(ts).tolist()
    points = [GridPoint(a, s) for a, s in zip(alphas, sigmas)]
    if denoise_to_zero:
        points[-1] = GridPoint(1.0, 0.0)
    return ts, points


def sample(model: Callable, x_T: Tensor, sched: NoiseSchedule, steps: int = 20, solver: str = "dpmpp",
           order: int | None = None, spacing: str = "logsnr", prediction: str = "eps",
           cond=None, guidance_scale: float | Tensor | None = None, uncond=None, sde: bool = False,
           generator: torch.Generator | None = None, timesteps: Tensor | None = None,
           lower_order_final: bool = True, denoise_to_zero: bool = False, third_order: str = "published",
           grad: str | None = None, adjoint_order: int = 1, adjoint_form: str = "eps",
           adjoint_steps: int | None = None, states: str = "recorded",
           parameters: Iterable[Tensor] | None = None, progress: bool = False,
           check_finite: bool = True) -> Tensor:
    """Samples from a diffusion or flow model, noise to data, one fused kernel per step.

    Args:
        model: ``model(x, t)`` or ``model(x, t, cond)`` -> tensor shaped like x; t is (batch,)
            in the schedule's model-time units.
        x_T: (batch, *shape) initial noise (scaled for the schedule: ``sigma(t_max)``-sized
            for EDM, standard normal for VP and flow).
        sched: the noise schedule.
        steps: number of steps N >= 1.
        solver: "ddim" | "deis" | "dpmpp" | "heun".
        order: solver order (ddim 1; deis/dpmpp 1-3; heun 2); None picks the solver's default.
            "heun" is EDM's second-order Heun with a last Euler step (2N - 1 model evaluations); on a
            :class:`FlowSchedule` it integrates ``dx/dt = eps - x0`` in t, elsewhere in EDM's
            ``(x/alpha, sigma/alpha)`` (see :func:`heun_variable`).
        spacing: "uniform" | "logsnr" | "quadratic" | "karras" (plus diffusers spacings for
            discrete schedules).
        prediction: what the model outputs: "eps" | "x0" | "v" | "flow".
        cond: conditioning passed to the model (tensor or dict of tensors).
        guidance_scale: classifier-free guidance scale (scalar or tensor broadcastable to the
            output); requires `uncond`.
        uncond: the unconditional conditioning, same structure as `cond`.
        sde: stochastic DPM-Solver++ (orders 1 and 2), noise drawn from `generator`.
        generator: torch.Generator for the SDE noise (reproducible runs).
        timesteps: explicit (N+1,) grid, strictly decreasing; overrides steps and spacing.
        lower_order_final: lower the order on the final steps when N < 15 (as diffusers).
        denoise_to_zero: the last step lands on zero noise instead of the grid's last time.
        third_order: for dpmpp order 3, "published" (DPM-Solver++(3M) exactly as in the paper
            and diffusers, which is globally second order) or "taylor" (third order).
        grad: how gradients flow to x_T, the conditioning and the model's parameters:
            "discrete" (exact gradient of the computed sample, one model re-run per step in the
            backward pass; the default when any of them requires grad), "adjoint"
            (AdjointDEIS, the continuous adjoint), "autograd" (plain autograd through every
            step, keeping all activations), or None. Under ``torch.no_grad()`` no graph is built.
        adjoint_order: AdjointDEIS order, 1 or 2 (2M).
        adjoint_form: "eps" (the paper's) or "x0" (the data-prediction form, stable on coarse grids).
        adjoint_steps: steps of the adjoint grid (uniform in log-SNR between the sampling grid's
            ends); None uses the sampling grid.
        states: "recorded" (states from a forward solve on the adjoint grid) or "resolved"
            (re-solved backwards from the sample by DDIM inversion; ODE only).
        parameters: tensors to differentiate besides x_T and cond; default: the parameters of
            `model` that require grad when it is an nn.Module.
        progress: show a tqdm progress bar.
        check_finite: after the loop (one host sync), raise if the sample is not finite.

    Returns:
        (batch, *shape) the sample, x_T's dtype and device, attached to autograd per `grad`.

    Raises:
        ValueError for an unknown solver, prediction or gradient option, an unsupported order,
        steps < 1, a bad grid, missing uncond, or a model output of the wrong shape;
        FloatingPointError when the result is not finite (NaN or Inf in a model output).
    """
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
        raise TypeError("x_T must be a floating-point tensor with a leading batch dimension")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if guidance_scale is not None and (cond is None or uncond is None):
        raise ValueError("guidance_scale needs both cond and uncond")
    rows, t_eval, eval_index, num_history, noisy, starts_step = _plan_constants(
        sched, steps, spacing, None if timesteps is None else tuple(torch.as_tensor(timesteps, dtype=torch.float64).tolist()),
        denoise_to_zero, solver, order, prediction, sde, lower_order_final, third_order)
    plan = StepPlan(torch.tensor(rows, dtype=torch.float64), eval_index, num_history, noisy, starts_step)
    t_eval = torch.tensor(t_eval, dtype=torch.float64)
    conditioning = Conditioning(cond, uncond, guidance_scale)
    params = model_parameters(model, parameters)
    mode = _gradient_mode(grad, x_T, conditioning.leaves(), params)
    run = dict(generator=generator, progress=progress, check_finite=check_finite)
    if mode is None:
        with torch.no_grad():
            return run_plan(model, x_T, plan, t_eval, cond=cond, guidance_scale=guidance_scale, uncond=uncond, **run)
    if mode == "autograd":
        return run_plan(model, x_T, plan, t_eval, cond=cond, guidance_scale=guidance_scale, uncond=uncond, **run)

    spec = SamplerSpec(model=model, plan=plan, t_eval=t_eval, conditioning=conditioning, num_params=len(params),
                       mode=mode, prediction=prediction)
    adjoint_plan = None
    if mode == "adjoint":
        spec.adjoint, adjoint_plan = _adjoint_config(
            sched, steps, spacing, timesteps, denoise_to_zero, solver, order, prediction, sde, lower_order_final,
            third_order, adjoint_order, adjoint_form, adjoint_steps, states)

    def record_run(x_start, cond_, uncond_, w_):
        kwargs = dict(cond=cond_, guidance_scale=w_, uncond=uncond_, **run)
        if mode == "discrete":
            record = {"rows": []}
            x = run_plan(model, x_start, plan, t_eval, record=record, **kwargs)
            return x, record["rows"], []
        record = {"grid": []}
        x = run_plan(model, x_start, plan, t_eval, record=record if adjoint_plan is None else None, **kwargs)
        if adjoint_plan is not None and states == "recorded":
            record = {"grid": []}
            run_plan(model, x_start, adjoint_plan[0], adjoint_plan[1], record=record, **kwargs)
        return x, [], record["grid"]

    return _Sampler.apply(spec, record_run, x_T, *conditioning.leaves(), *params)


def _gradient_mode(grad, x_T, cond_leaves, params) -> str | None:
    if grad is not None and grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; choose one of {', '.join(GRAD_MODES)} or None")
    if not torch.is_grad_enabled():
        return None
    wants = x_T.requires_grad or any(t.requires_grad for t in cond_leaves) or bool(params)
    if grad is None:
        return "discrete" if wants else None
    return grad


def _adjoint_config(sched, steps, spacing, timesteps, denoise_to_zero, solver, order, prediction, sde,
                    lower_order_final, third_order, adjoint_order, adjoint_form, adjoint_steps, states):
    """The AdjointDEIS grid and, for a grid of its own with recorded states, the plan that records them."""
    if adjoint_order not in (1, 2):
        raise ValueError(f"adjoint_order must be 1 or 2, got {adjoint_order}")
    if adjoint_form not in ADJOINT_FORMS:
        raise ValueError(f"adjoint_form must be one of {', '.join(ADJOINT_FORMS)}, got {adjoint_form!r}")
    if states not in STATE_MODES:
        raise ValueError(f"states must be one of {', '.join(STATE_MODES)}, got {states!r}")
    if denoise_to_zero:
        raise ValueError("grad='adjoint' integrates the continuous adjoint from the grid's last time; "
                         "it cannot start at zero noise (denoise_to_zero=True): use grad='discrete'")
    if sde and states == "resolved":
        raise ValueError("states='resolved' re-solves the ODE backwards; an SDE sample needs states='recorded'")
    ts, points = sampling_grid(sched, steps, spacing, timesteps, False)
    plan = None
    if adjoint_steps is not None:
        if adjoint_steps < 1:
            raise ValueError(f"adjoint_steps must be >= 1, got {adjoint_steps}")
        lam = torch.linspace(float(sched.half_log_snr(ts[0])), float(sched.half_log_snr(ts[-1])), adjoint_steps + 1,
                             dtype=torch.float64)
        ts = sched.time_from_half_log_snr(lam)
        ts[0], ts[-1] = ts[0].new_tensor(float(ts[0])), ts[-1].new_tensor(float(ts[-1]))
        ts, points = sampling_grid(sched, adjoint_steps, timesteps=ts)
        rows, t_eval, eval_index, num_history, noisy, starts = _plan_constants(
            sched, adjoint_steps, spacing, tuple(ts.tolist()), False, solver, order, prediction, sde,
            lower_order_final, third_order)
        plan = (StepPlan(torch.tensor(rows, dtype=torch.float64), eval_index, num_history, noisy, starts),
                torch.tensor(t_eval, dtype=torch.float64))
    config = AdjointConfig(order=adjoint_order, form=adjoint_form, grid=points, model_times=sched.model_time(ts),
                           states=states, sde=sde)
    return config, plan


@torch.compiler.assume_constant_result
def _plan_constants(sched, steps, spacing, timesteps, denoise_to_zero, solver, order, prediction, sde,
                    lower_order_final, third_order):
    """The step plan as plain Python values, so torch.compile treats it as a constant."""
    order = resolve_order(solver, order, sde)
    ts, points = sampling_grid(sched, steps, spacing,
                               None if timesteps is None else torch.tensor(timesteps, dtype=torch.float64),
                               denoise_to_zero)
    plan = build_plan(points, "dpmpp" if solver == "ddim" else solver, order, prediction,
                      sde=sde, lower_order_final=lower_order_final, third_order=third_order,
                      heun_variable=heun_variable(sched))
    t_eval = sched.model_time(ts)[plan.eval_index]
    return (plan.coeffs.tolist(), t_eval.tolist(), plan.eval_index, plan.num_history, plan.noisy,
            plan.starts_step)


def heun_variable(sched: NoiseSchedule) -> str:
    """Heun integrates a flow schedule's own ODE ``dx/dt = eps - x0`` (as the rectified-flow papers and
    diffusers' ``FlowMatchHeunDiscreteScheduler``), every other schedule in EDM's ``(x/alpha, sigma/alpha)``."""
    return "flow" if isinstance(sched, FlowSchedule) else "rho"


def model_time_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the time tensor passed to the model: float64 for float64 states, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def run_plan(model: Callable, x_T: Tensor, plan: StepPlan, t_eval: Tensor, *, cond=None,
             guidance_scale=None, uncond=None, generator: torch.Generator | None = None,
             progress: bool = False, check_finite: bool = True, record: dict | None = None) -> Tensor:
    """Runs a precomputed :class:`StepPlan` from x_T; the loop never syncs the host.

    Args:
        t_eval: (len(plan),) model time of every row's evaluation.
        record: if given, ``record["rows"]`` collects every row's input state and
            ``record["grid"]`` the state at every grid point (the final sample included).
    """
    coeffs = plan.coeffs.to(x_T.device)
    t_eval = t_eval.to(device=x_T.device, dtype=model_time_dtype(x_T))
    batch = x_T.shape[0]
    x, history = x_T, []
    rows = range(len(plan))
    if progress and not torch.compiler.is_compiling():
        rows = tqdm(rows, disable=None, desc="sampling", leave=False)
    for row in rows:
        if record is not None:
            if "rows" in record:
                record["rows"].append(x)
            if "grid" in record and plan.starts_step[row]:
                record["grid"].append(x)
        out = evaluate_model(model, x, t_eval[row].expand(batch), cond, guidance_scale, uncond)
        noise = None
        if plan.noisy[row]:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, m0 = ops.multistep_step(x, out.to(x.dtype), history[:plan.num_history[row]], coeffs[row], noise)
        history = [m0] + history[:1]
    if record is not None and "grid" in record:
        record["grid"].append(x)
    if check_finite and not torch.compiler.is_compiling() and not torch.isfinite(x).all():
        raise FloatingPointError(
            "sample: the result is not finite: the model returned NaN or Inf during sampling "
            "(or the grid reaches a time where the prediction cannot be converted)")
    return x
