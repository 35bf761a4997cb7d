"""``sample``: multistep exponential-integrator sampling with one fused kernel per step."""

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import ops, validation
from .gradients import (AdjointOptions, GradientSpec, adjoint_options, check_adjoint_inputs, differentiated_only,
                        gradient_mode, sample_with_gradients, truncation_steps)
from .models import Conditioning, check_conditioning, model_parameters
from .planning import (NoiseSource, StepInfo, noise_tensors, noisy_rows, plan_adjoint_grid, plan_sampling, resolve_grid,
                       run_plan, tensor_noise, truncation_row)
from .predictions import check_prediction
from .schedules import NoiseSchedule
from .thresholding import DynamicThreshold


def sample(model: Callable, x_T: Tensor, sched: NoiseSchedule, steps: int | None = None, solver: str = "dpmpp",
           order: int | None = None, spacing: str = "logsnr", prediction: str = "eps",
           cond=None, guidance_scale: float | Tensor | None = None, uncond=None, sde: bool = False,
           generator: torch.Generator | None = None, timesteps: Tensor | None = None,
           lower_order_final: bool = True, denoise_to_zero: bool | None = None, third_order: str = "published",
           grad: str | None = None, parameters: Iterable[Tensor] | None = None, progress: bool = False,
           check_finite: bool = True, *, adjoint: AdjointOptions | None = None,
           callback: Callable[[StepInfo], None] | None = None, adjoint_order: int | None = None,
           adjoint_form: str | None = None, adjoint_steps: int | None = None, states: str | None = None,
           second_order: str = "midpoint", threshold: DynamicThreshold | None = None,
           euler_at_final: bool = False, noise: NoiseSource | Sequence[Tensor] | Tensor | None = None,
           grad_steps: int | tuple[int, int] | None = None,
           grad_steps_generator: torch.Generator | None = None) -> Tensor:
    """Samples from a diffusion or flow model, noise to data, one fused kernel per step.

    Args:
        model: ``model(x, t)`` or ``model(x, t, cond)`` -> tensor shaped like x; t is (batch,)
            in the schedule's model-time units.
        x_T: (batch, *shape) initial noise (scaled for the schedule: ``sigma(t_max)``-sized
            for EDM, standard normal for VP and flow).
        sched: the noise schedule.
        steps: number of steps N >= 1 (default 20; with `timesteps`, see there).
        solver: a name of :data:`adjointdeis.solvers.SOLVERS`: "ddim" | "deis" | "dpmpp" | "dpmsolver" |
            "heun" | "renoise".
        order: solver order (ddim, renoise 1; deis/dpmpp/dpmsolver 1-3; heun 2); None picks the solver's default.
            "heun" is EDM's second-order Heun with a last Euler step (2N - 1 model evaluations); on a
            :class:`FlowSchedule` it integrates ``dx/dt = eps - x0`` in t, elsewhere in EDM's
            ``(x/alpha, sigma/alpha)`` (see :func:`adjointdeis.planning.heun_variable`).
        spacing: "uniform" | "logsnr" | "quadratic" | "karras" (plus "linspace" | "leading" | "trailing"
            for discrete schedules); see :data:`adjointdeis.schedules.SPACINGS`.
        prediction: what the model outputs: "eps" | "x0" | "v" | "flow".
        cond: conditioning passed to the model (tensor or dict of tensors).
        guidance_scale: classifier-free guidance scale (scalar or tensor broadcastable to the
            output); requires `uncond`.
        uncond: the unconditional conditioning, same structure as `cond`.
        sde: stochastic DPM-Solver++ (orders 1-3) or DPM-Solver (orders 1, 2), noise drawn from `generator`.
        generator: torch.Generator for the SDE noise (reproducible runs).
        noise: the injected noise instead of draws from `generator` (not together with it): a callable
            ``noise(row, x) -> Tensor`` (see :data:`adjointdeis.planning.NoiseSource`; not differentiated), or the
            standard normal noises themselves, a sequence of N tensors shaped like x_T or one ``(N, *x_T.shape)``
            tensor, N the run's noisy rows (:func:`adjointdeis.planning.noisy_rows`: one per step for the SDE
            solvers and "renoise"), in x_T's dtype and on its device. Noises that require grad are
            differentiated like x_T: exactly with "discrete" and "autograd" (docs/math.md section 5.6);
            "adjoint" refuses them.
        timesteps: an explicit grid, strictly decreasing, in model-time units; overrides spacing. With
            ``steps + 1`` values (or `steps` omitted) it is the whole grid, ending where the last step lands.
            With exactly `steps` values it is diffusers' convention (``pipe.scheduler.timesteps``): the model
            timesteps of the steps, the end implied by `denoise_to_zero` (see
            :func:`adjointdeis.planning.resolve_grid`). Any other length raises.
        lower_order_final: lower the order on the final steps when N < 15 (as diffusers).
        denoise_to_zero: the last step lands on zero noise instead of the grid's last time; None: True for
            diffusers' N-timestep convention, False otherwise.
        third_order: for dpmpp order 3, "published" (DPM-Solver++(3M) exactly as in the paper
            and diffusers, which is globally second order) or "taylor" (third order).
        grad: how gradients flow to x_T, the conditioning and the model's parameters:
            "discrete" (exact gradient of the computed sample, one model re-run per step but the
            last in the backward pass; the default when any of them requires grad), "adjoint"
            (AdjointDEIS, the continuous adjoint, set by `adjoint`), "autograd" (plain autograd
            through every step, keeping all activations), or None. Under ``torch.no_grad()`` no
            graph is built. Under torch.func transforms (grad, jvp, vmap, jacrev, ...) and forward-mode AD, the
            default is "autograd" (they differentiate plain autograd only; "discrete" and "adjoint" raise).
        parameters: tensors to differentiate besides x_T and cond; default: the parameters of
            `model` that require grad when it is an nn.Module. Given, nothing else the model reaches (its
            other parameters, tensors in a closure) gets a gradient, in every mode (under torch.func transforms
            and forward-mode AD, which differentiate their own inputs, it has no effect).
        progress: show a tqdm progress bar.
        check_finite: after the loop (one host sync), raise if the sample is not finite (skipped where the host
            cannot read the sample: torch.compile, CUDA graph capture, torch.func.vmap); with "discrete" and
            "adjoint", raise too if the gradient of x_T is not (False: return it as autograd would, as a
            ``torch.amp.GradScaler`` needs).
        adjoint: the AdjointDEIS settings (:class:`adjointdeis.AdjointOptions`: order, form, steps,
            states); default ``AdjointOptions()``.
        callback: called after every model evaluation of the sampling run with a
            :class:`adjointdeis.planning.StepInfo` (never during the backward pass).
        adjoint_order, adjoint_form, adjoint_steps, states: the fields of `adjoint` as separate
            keywords (``order``, ``form``, ``steps``, ``states``); not together with `adjoint`.
        grad_steps: truncated backpropagation (docs/math.md section 5.7): differentiate only the last K steps,
            the earlier ones constants (DRaFT-K); an int K in [1, steps], or ``(lo, hi)`` to draw K uniformly
            from lo..hi inclusive on every call (AlignProp's random truncation) as
            ``torch.randint(lo, hi + 1, (1,), generator=grad_steps_generator)``. With K below the run's steps,
            x_T and the noises of the constant steps get no gradient (their ``.grad`` stays None). "discrete" and
            "autograd" only.
        grad_steps_generator: the generator K is drawn from (the global one when None).

    Returns:
        (batch, *shape) the sample, x_T's dtype and device, attached to autograd per `grad`.

    Raises:
        ValueError for an unknown solver, prediction or gradient option, an unsupported order,
        steps < 1, a bad grid, missing uncond, a model output of the wrong shape, noise tensors of the wrong
        count, shape or device, or a bad `grad_steps`; TypeError naming `noise` for a wrong type or dtype;
        FloatingPointError when the result is not finite (NaN or Inf in a model output); RuntimeError for
        grad="discrete" or "adjoint" under a torch.func transform or forward-mode AD.
    """
    validation.function(model, "model", "model(x, t[, cond]) -> Tensor")
    validation.floating(x_T, "x_T", min_dim=1)
    validation.instance(sched, "sched", NoiseSchedule, "a NoiseSchedule (VPSchedule, EDMSchedule, FlowSchedule)")
    for name, value in (("sde", sde), ("lower_order_final", lower_order_final), ("progress", progress),
                        ("check_finite", check_finite), ("euler_at_final", euler_at_final)):
        validation.flag(value, name)
    if denoise_to_zero is not None:
        validation.flag(denoise_to_zero, "denoise_to_zero")
    if adjoint_order is not None:
        validation.integer(adjoint_order, "adjoint_order")
    if adjoint_steps is not None:
        validation.integer(adjoint_steps, "adjoint_steps")
    check_prediction(prediction)
    check_conditioning(x_T, cond, guidance_scale, uncond)
    if threshold is not None:
        validation.instance(threshold, "threshold", DynamicThreshold, "an adjointdeis.DynamicThreshold")
    if generator is not None:
        validation.instance(generator, "generator", torch.Generator, "a torch.Generator")
    if noise is not None and generator is not None:
        raise ValueError("sample: pass the noise either as noise= or drawn from generator=, not both")
    if callback is not None:
        validation.function(callback, "callback", "callback(StepInfo)")
    if parameters is not None:
        parameters = validation.tensors(parameters, "parameters")
    steps, grid, denoise_to_zero = resolve_grid(sched, steps, timesteps, denoise_to_zero)
    plan = plan_sampling(sched, steps, spacing, grid, denoise_to_zero, solver, order, prediction, sde,
                         lower_order_final, third_order, second_order, threshold, euler_at_final)
    noises = noise_tensors(noise, plan, x_T)
    conditioning = Conditioning(cond, uncond, guidance_scale)
    params = model_parameters(model, parameters)
    mode = gradient_mode(grad, x_T, conditioning, params, noises or [])
    if grad_steps is not None:
        k = truncation_steps(grad_steps, grad_steps_generator, sum(plan.steps.starts_step))
        grad_from = truncation_row(plan, k)
    else:
        grad_from = 0
    if mode in (None, "autograd"):
        with torch.set_grad_enabled(mode == "autograd"):
            x = run_plan(model, x_T, plan, cond=cond, guidance_scale=guidance_scale, uncond=uncond,
                         generator=generator, progress=progress, check_finite=check_finite, callback=callback,
                         noise=noise if noises is None else tensor_noise(plan, noises), grad_from=grad_from)
        # nothing else the model reaches gets a gradient; a torch.func transform differentiates its own inputs
        if mode == "autograd" and parameters is not None and not ops.transformed():
            x = differentiated_only(x, [x_T, *conditioning.leaves(), *params, *(noises or [])])
        return x
    options, adjoint_grid = None, None
    if mode == "adjoint":
        options = adjoint_options(adjoint, adjoint_order, adjoint_form, adjoint_steps, states)
        options.check_run(sde, threshold is not None, plan.points[0].alpha == 0.0, solver == "renoise")
        adjoint_grid = plan_adjoint_grid(sched, plan, options.steps, options.states == "recorded")
        check_adjoint_inputs(adjoint_grid, noises, grad_from, draws=noise is None and bool(noisy_rows(plan)))
    spec = GradientSpec(model, plan, conditioning, len(params), mode, options, adjoint_grid, generator, progress,
                        check_finite, callback, noise if noises is None else None, len(noises or []), grad_from,
                        default_parameters=parameters is None)
    return sample_with_gradients(spec, x_T, params, noises or [])
