"""``sample``: multistep exponential-integrator sampling with one fused kernel per step."""

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import ops
from .models import Conditioning, evaluate_model
from .schedules import NoiseSchedule
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
           cond: Conditioning = None, guidance_scale: float | Tensor | None = None,
           uncond: Conditioning = None, sde: bool = False, generator: torch.Generator | None = None,
           timesteps: Tensor | None = None, lower_order_final: bool = True,
           denoise_to_zero: bool = False, third_order: str = "published", progress: bool = False,
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
        progress: show a tqdm progress bar.
        check_finite: after the loop (one host sync), raise if the sample is not finite.

    Returns:
        (batch, *shape) the sample, x_T's dtype and device.

    Raises:
        ValueError for an unknown solver or prediction, an unsupported order, steps < 1, a bad
        grid, missing uncond, or a model output of the wrong shape; FloatingPointError when the
        result is not finite (NaN or Inf in a model output).
    """
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
        raise TypeError("x_T must be a floating-point tensor with a leading batch dimension")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if guidance_scale is not None and (cond is None or uncond is None):
        raise ValueError("guidance_scale needs both cond and uncond")
    rows, t_eval, eval_index, num_history, noisy = _plan_constants(
        sched, steps, spacing, None if timesteps is None else tuple(torch.as_tensor(timesteps, dtype=torch.float64).tolist()),
        denoise_to_zero, solver, order, prediction, sde, lower_order_final, third_order)
    plan = StepPlan(torch.tensor(rows, dtype=torch.float64), eval_index, num_history, noisy)
    return run_plan(model, x_T, plan, torch.tensor(t_eval, dtype=torch.float64), cond=cond,
                    guidance_scale=guidance_scale, uncond=uncond, generator=generator, progress=progress,
                    check_finite=check_finite)


@torch.compiler.assume_constant_result
def _plan_constants(sched, steps, spacing, timesteps, denoise_to_zero, solver, order, prediction, sde,
                    lower_order_final, third_order):
    """The step plan as plain Python values, so torch.compile treats it as a constant."""
    order = resolve_order(solver, order, sde)
    ts, points = sampling_grid(sched, steps, spacing,
                               None if timesteps is None else torch.tensor(timesteps, dtype=torch.float64),
                               denoise_to_zero)
    plan = build_plan(points, "dpmpp" if solver == "ddim" else solver, order, prediction,
                      sde=sde, lower_order_final=lower_order_final, third_order=third_order)
    t_eval = sched.model_time(ts)[plan.eval_index]
    return plan.coeffs.tolist(), t_eval.tolist(), plan.eval_index, plan.num_history, plan.noisy


def run_plan(model: Callable, x_T: Tensor, plan: StepPlan, t_eval: Tensor, *, cond: Conditioning = None,
             guidance_scale=None, uncond: Conditioning = None, generator: torch.Generator | None = None,
             progress: bool = False, check_finite: bool = True) -> Tensor:
    """Runs a precomputed :class:`StepPlan` from x_T; the loop never syncs the host.

    Args:
        t_eval: (len(plan),) model time of every row's evaluation.
    """
    time_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    coeffs = plan.coeffs.to(x_T.device)
    t_eval = t_eval.to(device=x_T.device, dtype=time_dtype)
    batch = x_T.shape[0]
    x, history = x_T, []
    rows = range(len(plan))
    if progress and not torch.compiler.is_compiling():
        rows = tqdm(rows, disable=None, desc="sampling", leave=False)
    for row in rows:
        out = evaluate_model(model, x, t_eval[row].expand(batch), cond, guidance_scale, uncond)
        noise = None
        if plan.noisy[row]:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, m0 = ops.multistep_step(x, out.to(x.dtype), history[:plan.num_history[row]], coeffs[row], noise)
        history = [m0] + history[:1]
    if check_finite and not torch.compiler.is_compiling() and not torch.isfinite(x).all():
        raise FloatingPointError(
            "sample: the result is not finite: the model returned NaN or Inf during sampling "
            "(or the grid reaches a time where the prediction cannot be converted)")
    return x
