"""k-diffusion-style samplers: ``sample_dpmpp_2m(model, x, sigmas, extra_args, callback, disable)`` and siblings.

Drop-in replacements for the functions of the same name in k-diffusion (and for ComfyUI's ``ipndm`` and
``res_multistep``), each model evaluation one fused step with coefficients precomputed on the host (no host
sync inside the loop), and differentiable. ``dpmpp_2m``, ``dpmpp_3m`` and ``deis`` run as one
``adjointdeis.sample`` call; the others run the plan :mod:`adjointdeis.k_diffusion_plans` builds from
k-diffusion's own expressions through the same run loop and discrete adjoint.

The calling convention is k-diffusion's: the denoiser ``model(x, sigma * s_in, **extra_args)``
returns the denoised x0 for a state in variance-exploding coordinates ``x = x0 + sigma * eps``;
``sigmas`` is a decreasing (N+1,) tensor, normally ending in 0 (the last step then returns the
denoised prediction); ``callback`` receives ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per
step with the step's input state; ``disable`` turns the progress bar off.

In our terms: an ``EDMSchedule`` (alpha = 1, sigma = t, model time = sigma), ``prediction="x0"``,
``timesteps=sigmas`` and no lowered final orders (k-diffusion lowers only the step to sigma = 0).
Noise: see :class:`BrownianTreeNoiseSampler` and the samplers' ``noise_sampler`` and ``generator``.

Unlike k-diffusion's (which run under ``torch.no_grad``) these keep gradients: with grad enabled and
x, a tensor in `extra_args` or a parameter of `model` requiring grad, the result is attached to autograd
through the exact discrete adjoint (``grad="discrete"``, one model re-run per step but the last in the
backward pass). Run them under ``torch.no_grad()`` for plain sampling.
"""

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from . import k_diffusion_plans as plans
from . import validation
from .gradients import GradientSpec, gradient_mode, sample_with_gradients
from .models import Conditioning
from .planning import StepInfo, run_plan
from .sampling import sample
from .schedules import EDMSchedule, check_noise_levels

__all__ = ["BrownianTreeNoiseSampler", "sample_deis", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m", "sample_dpmpp_3m_sde",
           "sample_dpmpp_sde", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_ipndm",
           "sample_lms", "sample_res_multistep", "sample_res_multistep_ancestral"]


class _Denoiser:
    """``model(x, t[, cond])`` for ``sample`` over a k-diffusion denoiser.

    Tensors of extra_args travel as sample's cond (so they receive gradients), everything else is
    passed as it is; sigma reaches the model in x's dtype, as k-diffusion's ``sigma * x.new_ones(...)``.
    """

    def __init__(self, model: Callable, constants: dict):
        self.model, self.constants = model, constants

    def __call__(self, x: Tensor, t: Tensor, cond: Mapping | None = None) -> Tensor:
        return self.model(x, t.to(x.dtype), **self.constants, **(cond or {}))


class _ModuleDenoiser(torch.nn.Module):
    """:class:`_Denoiser` over an ``nn.Module``, a module itself with `model` as its submodule: grad="discrete"
    then treats it as ``sample`` treats a module, re-running a shadow of it in the reverse pass and restoring its
    train-mode buffers (BatchNorm running statistics), so that the reverse pass changes nothing in the user's
    module, and it warns about the tensors requiring grad the model reaches outside its parameters."""

    def __init__(self, model: torch.nn.Module, constants: dict):
        super().__init__()
        self.model, self.constants = model, constants

    forward = _Denoiser.__call__


def _denoiser(model, constants: dict):
    """The ``model(x, t[, cond])`` to run: a module over a module (but DDP's, which ``sample`` must see itself to
    reach its wrapped module and process group), else a plain callable."""
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return _ModuleDenoiser(model, constants)
    return _Denoiser(model, constants)


def _step_callback(callback: Callable | None, sigmas, sigma_hat=None) -> Callable[[StepInfo], None] | None:
    """k-diffusion's per-step callback as a run-loop callback: once per step, at its first evaluation.

    Args:
        sigma_hat: per step, the noise level of its first evaluation (default: ``sigmas``).
    """
    if callback is None:
        return None
    sigma_hat = sigmas if sigma_hat is None else sigma_hat

    def report(info: StepInfo) -> None:
        if info.starts_step:
            callback({"x": info.x, "i": info.step, "sigma": sigmas[info.step], "sigma_hat": sigma_hat[info.step],
                      "denoised": info.output})
    return report


def _split_extra_args(model, extra_args) -> tuple[dict, dict, list[Tensor] | None]:
    """(tensors of extra_args, the other entries, the model's parameters that require grad; None for a model that
    is not an nn.Module: ``sample``'s default, which differentiates with autograd whatever such a model reaches and
    warns in grad="discrete" when it reaches tensors that require grad)."""
    extra_args = {} if extra_args is None else dict(extra_args)
    cond = {k: v for k, v in extra_args.items() if isinstance(v, Tensor)}
    constants = {k: v for k, v in extra_args.items() if not isinstance(v, Tensor)}
    parameters = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else None
    return cond, constants, parameters


def _check_call(model, x, extra_args, callback) -> None:
    """The arguments every sampler shares, through :mod:`adjointdeis.validation`."""
    validation.function(model, "model", "model(x, sigma, **extra_args) -> denoised Tensor")
    validation.floating(x, "x", 1)
    if extra_args is not None:
        validation.instance(extra_args, "extra_args", Mapping, "a dict of keyword arguments for the model")
    if callback is not None:
        validation.function(callback, "callback", "callback(dict)")


def _run(model, x, sigmas, extra_args, callback, disable, *, solver, order, grad=None):
    _check_call(model, x, extra_args, callback)
    grid = check_noise_levels(sigmas)
    cond, constants, parameters = _split_extra_args(model, extra_args)
    denoiser = _denoiser(model, constants)
    if grad == "autograd" or isinstance(denoiser, torch.nn.Module):
        parameters = None  # sample's default: the module's own; parameters= would restrict grad="autograd" to them
    return sample(denoiser, x, EDMSchedule(), steps=len(grid) - 1, solver=solver, order=order,
                  prediction="x0", cond=cond or None, timesteps=torch.tensor(grid, dtype=torch.float64),
                  lower_order_final=False, denoise_to_zero=grid[-1] == 0, grad=grad, parameters=parameters,
                  progress=disable is not True, callback=_step_callback(callback, sigmas))


def _grids(sigmas) -> tuple[Tensor, Tensor]:
    """(the validated sigmas as a float64 CPU tensor for the coefficients, the caller's for noise-sampler calls)."""
    grid = torch.tensor(check_noise_levels(sigmas), dtype=torch.float64)
    return grid, sigmas.detach() if isinstance(sigmas, Tensor) else grid


def _normal_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``torch.randn_like(x)`` from `generator`: drawn in x's memory order, so a channels_last x gets k-diffusion's
    values at each index."""
    return torch.empty_like(x, memory_format=torch.preserve_format).normal_(generator=generator)


def _noise_source(kplan: plans.KPlan, noise_sampler: Callable | None, generator: torch.Generator | None,
                  like: Tensor):
    """The run's ``noise(row, x)``: the noise sampler at its row's ``(sigma, sigma_next)``, else a normal draw laid
    out as `like` (the caller's x: the run's states need not keep its memory format)."""
    def noise(row: int, x: Tensor) -> Tensor:
        args = kplan.noise_args[row]
        if args is None or noise_sampler is None:
            return _normal_like(like, generator)
        drawn = noise_sampler(*args)
        if not isinstance(drawn, Tensor) or drawn.shape != x.shape:
            got = list(drawn.shape) if isinstance(drawn, Tensor) else type(drawn).__name__
            raise TypeError(f"noise_sampler(sigma, sigma_next) must return a tensor shaped like x {list(x.shape)}; "
                            f"got {got}")
        return drawn.to(device=x.device, dtype=x.dtype)
    return noise


def _run_rows(name: str, model, x: Tensor, sigmas, kplan: plans.KPlan, extra_args, callback, disable, *,
              noise_sampler=None, generator=None, grad=None) -> Tensor:
    """Runs a k-diffusion sampler's plan: plain, through autograd, or with the exact discrete adjoint."""
    _check_call(model, x, extra_args, callback)
    if noise_sampler is not None and generator is not None:
        raise ValueError(f"sample_{name}: pass noise_sampler or generator, not both")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"sample_{name}: noise_sampler must be callable as noise_sampler(sigma, sigma_next)")
    if generator is not None:
        validation.instance(generator, f"sample_{name}: generator", torch.Generator, "a torch.Generator")
    cond, constants, params = _split_extra_args(model, extra_args)
    params = params or []
    like = x.detach()
    if kplan.draws_churn:
        z = _normal_like(like, generator)
        x = x + kplan.churn * z if kplan.churn != 0 else x
    denoiser, conditioning = _denoiser(model, constants), Conditioning(cond or None)
    noise = _noise_source(kplan, noise_sampler, generator, like)
    progress, report = disable is not True, _step_callback(callback, sigmas, kplan.sigma_hat)
    mode = gradient_mode(grad, x, conditioning, params)
    if mode == "adjoint":
        raise ValueError(f"sample_{name}: grad='adjoint' (AdjointDEIS) is not available for this sampler; use "
                         "grad='discrete' (exact) or 'autograd'")
    if mode in (None, "autograd"):
        with torch.set_grad_enabled(mode == "autograd"):
            return run_plan(denoiser, x, kplan.plan, cond=conditioning.cond, progress=progress, callback=report,
                            noise=noise)
    spec = GradientSpec(denoiser, kplan.plan, conditioning, len(params), mode, progress=progress, callback=report,
                        noise=noise, default_parameters=True)  # the samplers take no parameters=: the model's
    return sample_with_gradients(spec, x, params)


def _default_sde_noise(noise_sampler, generator, x: Tensor, sigmas: Tensor):
    """k-diffusion's default noise for its SDE samplers: a Brownian tree over the grid (unless a generator is given)."""
    if noise_sampler is not None or generator is not None:
        return noise_sampler
    validation.floating(x, "x", 1)  # before the tree is built from it (and draws its seed)
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())


def _check_order(name: str, key: str, order, top: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= top:
        raise ValueError(f"sample_{name}: {key} must be an integer in 1..{top}, got {order!r}")


def sample_dpmpp_2m(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None, *,
                    grad: str | None = None) -> Tensor:
    """DPM-Solver++(2M), k-diffusion's ``sample_dpmpp_2m``.

    Args:
        model: denoiser ``model(x, sigma, **extra_args)`` -> x0-hat, x: (batch, *shape), sigma: (batch,).
        x: (batch, *shape) initial state, already scaled by ``sigmas[0]``.
        sigmas: (N+1,) strictly decreasing noise levels, normally ending in 0.
        extra_args: keyword arguments for the model; its tensors receive gradients.
        callback: called once per step with ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}``.
        disable: True hides the progress bar (None: shown on a terminal).
        grad: gradient mode of ``adjointdeis.sample`` (None: "discrete" when anything requires grad).

    Returns:
        (batch, *shape) the sample, x's dtype.

    Raises:
        ValueError for sigmas that are not a strictly decreasing, non-negative 1-D tensor.
    """
    return _run(model, x, sigmas, extra_args, callback, disable, solver="dpmpp", order=2, grad=grad)


def sample_dpmpp_3m(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None, *,
                    grad: str | None = None) -> Tensor:
    """DPM-Solver++(3M), the deterministic multistep solver (as diffusers' ``solver_order=3``).

    Equals k-diffusion's ``sample_dpmpp_3m_sde(..., eta=0)`` except on the second step, where this
    uses DPM-Solver++(2M) (the published warm-up, as diffusers) and k-diffusion its exponential
    first-difference form. Arguments and return as :func:`sample_dpmpp_2m`.
    """
    return _run(model, x, sigmas, extra_args, callback, disable, solver="dpmpp", order=3, grad=grad)


def sample_deis(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, order: int = 3, *,
                grad: str | None = None) -> Tensor:
    """DEIS (log-rho Adams-Bashforth of the noise prediction), orders 1-3, warm-up from order 1.

    Args:
        order: 1, 2 or 3. Others as :func:`sample_dpmpp_2m`.

    Raises:
        ValueError for an unsupported order or bad sigmas.
    """
    return _run(model, x, sigmas, extra_args, callback, disable, solver="deis", order=order, grad=grad)




class BrownianTreeNoiseSampler:
    """k-diffusion's ``BrownianTreeNoiseSampler``: ``noise(sigma, sigma_next)`` = the Brownian increment over
    ``[transform(sigma_next), transform(sigma)]`` divided by the square root of its length, from one
    ``torchsde.BrownianTree`` per seed; the same seed gives k-diffusion's values.

    Needs ``torchsde`` (``pip install adjointdeis[k-diffusion]``).

    Args:
        x: (batch, *shape) tensor whose shape, dtype and device the noise takes.
        sigma_min, sigma_max: the interval the tree covers.
        seed: an int, or a list of `batch` ints (one tree per batch item); None draws one from torch's global
            generator.
        transform: maps sigma to the tree's time.

    Raises:
        ImportError naming the extra when torchsde is missing.
    """

    def __init__(self, x: Tensor, sigma_min, sigma_max, seed=None, transform: Callable = lambda sigma: sigma):
        try:
            import torchsde
        except ImportError:
            raise ImportError("BrownianTreeNoiseSampler needs torchsde: "
                              "pip install 'adjointdeis[k-diffusion]'") from None
        self.transform = transform
        t0, t1 = transform(torch.as_tensor(sigma_min)), transform(torch.as_tensor(sigma_max))
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x)
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        try:  # a sequence of seeds, one per sample, or one seed (k-diffusion's test)
            len(seed)
            self.batched = True
        except TypeError:
            self.batched = False
        if self.batched and len(seed) != x.shape[0]:
            raise ValueError(f"BrownianTreeNoiseSampler: seed holds {len(seed)} seeds for a batch of {x.shape[0]}")
        seeds, w0 = (list(seed), w0[0]) if self.batched else ([seed], w0)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    def __call__(self, sigma, sigma_next) -> Tensor:
        """(batch, *shape) standard normal noise for the step sigma -> sigma_next."""
        t0, t1 = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)
        return (w if self.batched else w[0]) / (t1 - t0).abs().sqrt()


_COMMON_ARGS = """
    Args:
        model: denoiser ``model(x, sigma, **extra_args)`` -> x0-hat, x: (batch, *shape), sigma: (batch,).
        x: (batch, *shape) initial state, already scaled by ``sigmas[0]``.
        sigmas: (N+1,) strictly decreasing noise levels (ending in 0 or not).
        extra_args: keyword arguments for the model; its tensors receive gradients.
        callback: called once per step with ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}``.
        disable: True hides the progress bar (None: shown on a terminal)."""
_NOISE_ARGS = """
        eta: the ancestral (or SDE) noise scale; s_noise: scales the injected noise.
        noise_sampler: ``noise_sampler(sigma, sigma_next) -> (batch, *shape)`` standard normal noise, called with
            k-diffusion's arguments in k-diffusion's order (a k-diffusion ``BrownianTreeNoiseSampler`` or ours).
        generator: (ours) draw the noise as ``torch.randn`` from this generator instead; not with noise_sampler."""
_CHURN_ARGS = """
        s_churn, s_tmin, s_tmax, s_noise: Karras et al.'s churn: on steps with ``s_tmin <= sigma <= s_tmax`` the
            state is noised up to ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(s_churn / N, sqrt 2 - 1)``,
            with ``torch.randn_like`` noise (one draw per step, as k-diffusion) times s_noise.
        generator: (ours) draw the churn noise from this generator instead of the global one."""
_GRAD = """
        grad: gradient mode: None ("discrete" when anything requires grad), "discrete" or "autograd".

    Returns:
        (batch, *shape) the sample, x's dtype.

    Raises:
        ValueError for bad sigmas or an argument out of range (named), grad="adjoint";
        ImportError for the default Brownian-tree noise without torchsde."""


def _doc(summary: str, *parts: str) -> Callable:
    def attach(fn):
        fn.__doc__ = summary + "\n" + "".join(parts)
        return fn
    return attach


def _check_reals(name: str, **values) -> None:
    """Raises naming the argument: each value a finite real number (``s_tmax`` may be +inf)."""
    for key, value in values.items():
        if not (key == "s_tmax" and value == math.inf):
            validation.real(value, f"sample_{name}: {key}")


def _karras(kind, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, generator, grad):
    _check_reals(kind, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    grid, _ = _grids(sigmas)
    ref = sigmas if isinstance(sigmas, Tensor) else grid
    rows, hats, churn, churning = plans.karras_rows(kind, grid, s_churn, s_tmin, s_tmax, s_noise, ref.detach().cpu())
    sigma_hat = [ref[i] if float(h) == float(grid[i]) else h.to(ref) for i, h in enumerate(hats)]
    kplan = plans.assemble(kind, rows, grid, sigma_hat, churn, churning)
    return _run_rows(kind, model, x, sigmas, kplan, extra_args, callback, disable, generator=generator, grad=grad)


@_doc("Euler steps of the probability-flow ODE in sigma, k-diffusion's ``sample_euler`` (Karras et al. Algorithm 2 "
      "with Euler steps). One model evaluation per step.", _COMMON_ARGS, _CHURN_ARGS, _GRAD)
def sample_euler(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, *,
                 generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    return _karras("euler", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                   generator, grad)


@_doc("Heun's second-order method, k-diffusion's ``sample_heun`` (Karras et al. Algorithm 2): two model "
      "evaluations per step, one on a step to sigma = 0.", _COMMON_ARGS, _CHURN_ARGS, _GRAD)
def sample_heun(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, *,
                generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    return _karras("heun", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                   generator, grad)


@_doc("DPM-Solver-2 in sigma with a log-midpoint stage, k-diffusion's ``sample_dpm_2``: two model evaluations per "
      "step, one on a step to sigma = 0.", _COMMON_ARGS, _CHURN_ARGS, _GRAD)
def sample_dpm_2(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, *,
                 generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    return _karras("dpm_2", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                   generator, grad)


def _ancestral(kind, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, generator, grad):
    name = {"euler": "euler_ancestral", "dpm_2": "dpm_2_ancestral", "dpmpp_2s": "dpmpp_2s_ancestral"}[kind]
    _check_reals(name, eta=eta, s_noise=s_noise)
    grid, ref = _grids(sigmas)
    rows = plans.ancestral_rows(kind, grid, ref, eta, s_noise)
    kplan = plans.assemble(name, rows, grid, list(ref[:-1]))
    return _run_rows(name, model, x, sigmas, kplan, extra_args, callback, disable, noise_sampler=noise_sampler,
                     generator=generator, grad=grad)


@_doc("Ancestral sampling with Euler steps, k-diffusion's ``sample_euler_ancestral``: one model evaluation per "
      "step.", _COMMON_ARGS, _NOISE_ARGS, _GRAD)
def sample_euler_ancestral(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: Callable | None = None, *,
                           generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    return _ancestral("euler", model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                      generator, grad)


@_doc("Ancestral sampling with DPM-Solver-2 steps, k-diffusion's ``sample_dpm_2_ancestral``: two model "
      "evaluations per step, one on a step to sigma = 0.", _COMMON_ARGS, _NOISE_ARGS, _GRAD)
def sample_dpm_2_ancestral(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: Callable | None = None, *,
                           generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    return _ancestral("dpm_2", model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                      generator, grad)


@_doc("Ancestral sampling with DPM-Solver++(2S) steps, k-diffusion's ``sample_dpmpp_2s_ancestral``: two model "
      "evaluations per step, one on a step to sigma = 0.", _COMMON_ARGS, _NOISE_ARGS, _GRAD)
def sample_dpmpp_2s_ancestral(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                              callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                              s_noise: float = 1.0, noise_sampler: Callable | None = None, *,
                              generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    return _ancestral("dpmpp_2s", model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                      generator, grad)


@_doc("DPM-Solver++ (stochastic, two stages), k-diffusion's ``sample_dpmpp_sde``: two model evaluations per step, "
      "one on a step to sigma = 0; noise at both stages, by default from a Brownian tree (torchsde).",
      _COMMON_ARGS, _NOISE_ARGS, """
        r: the position of the intermediate stage in t = -log sigma, as a fraction of the step.""", _GRAD)
def sample_dpmpp_sde(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                     callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                     s_noise: float = 1.0, noise_sampler: Callable | None = None, r: float = 1 / 2, *,
                     generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    _check_reals("dpmpp_sde", eta=eta, s_noise=s_noise, r=r)
    if not 0 < r <= 1:
        raise ValueError(f"sample_dpmpp_sde: r must be in (0, 1], got {r!r}")
    grid, ref = _grids(sigmas)
    kplan = plans.assemble("dpmpp_sde", plans.dpmpp_sde_rows(grid, ref, eta, s_noise, r), grid, list(ref[:-1]))
    return _run_rows("dpmpp_sde", model, x, sigmas, kplan, extra_args, callback, disable,
                     noise_sampler=_default_sde_noise(noise_sampler, generator, x, ref), generator=generator,
                     grad=grad)


def _multistep_sde(name, order, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                   generator, grad, solver_type="midpoint"):
    _check_reals(name, eta=eta, s_noise=s_noise)
    grid, ref = _grids(sigmas)
    rows = plans.dpmpp_multistep_sde_rows(order, grid, ref, eta, s_noise, solver_type)
    kplan = plans.assemble(name, rows, grid, list(ref[:-1]))
    noise_sampler = _default_sde_noise(noise_sampler, generator, x, ref) if eta else noise_sampler
    return _run_rows(name, model, x, sigmas, kplan, extra_args, callback, disable, noise_sampler=noise_sampler,
                     generator=generator, grad=grad)


@_doc("SDE-DPM-Solver++(2M), k-diffusion's ``sample_dpmpp_2m_sde``: one model evaluation per step; noise by "
      "default from a Brownian tree (torchsde).", _COMMON_ARGS, _NOISE_ARGS, """
        solver_type: "midpoint" or "heun", the weight of the first difference (eta=0: the ODE DPM-Solver++(2M)).""",
      _GRAD)
def sample_dpmpp_2m_sde(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: Callable | None = None, solver_type: str = "midpoint",
                        *, generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"sample_dpmpp_2m_sde: solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    return _multistep_sde("dpmpp_2m_sde", 2, model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                          noise_sampler, generator, grad, solver_type)


@_doc("SDE-DPM-Solver++(3M), k-diffusion's ``sample_dpmpp_3m_sde``: one model evaluation per step; noise by "
      "default from a Brownian tree (torchsde).", _COMMON_ARGS, _NOISE_ARGS, _GRAD)
def sample_dpmpp_3m_sde(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: Callable | None = None, *,
                        generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    return _multistep_sde("dpmpp_3m_sde", 3, model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                          noise_sampler, generator, grad)


@_doc("Linear multistep (Adams-Bashforth in sigma on the Karras derivative), k-diffusion's ``sample_lms``: one "
      "model evaluation per step, warm-up from order 1.", _COMMON_ARGS, """
        order: 1..4, the number of derivatives each step combines.""", _GRAD)
def sample_lms(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
               callback: Callable | None = None, disable: bool | None = None, order: int = 4, *,
               grad: str | None = None) -> Tensor:
    _check_order("lms", "order", order, 4)
    grid, ref = _grids(sigmas)
    kplan = plans.assemble("lms", plans.lms_rows(grid, order), grid, list(ref[:-1]))
    return _run_rows("lms", model, x, sigmas, kplan, extra_args, callback, disable, grad=grad)


@_doc("Improved PNDM (fixed Adams-Bashforth weights in sigma), ComfyUI's ``sample_ipndm``: one model evaluation per "
      "step, warm-up from order 1; the step to sigma = 0 returns the denoised prediction.", _COMMON_ARGS, """
        max_order: 1..4.""", _GRAD)
def sample_ipndm(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None, max_order: int = 4, *,
                 grad: str | None = None) -> Tensor:
    _check_order("ipndm", "max_order", max_order, 4)
    grid, ref = _grids(sigmas)
    kplan = plans.assemble("ipndm", plans.ipndm_rows(grid, max_order), grid, list(ref[:-1]))
    return _run_rows("ipndm", model, x, sigmas, kplan, extra_args, callback, disable, grad=grad)


def _res(name, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, generator, grad):
    _check_reals(name, eta=eta, s_noise=s_noise)
    grid, ref = _grids(sigmas)
    kplan = plans.assemble(name, plans.res_multistep_rows(grid, ref, eta, s_noise), grid, list(ref[:-1]))
    return _run_rows(name, model, x, sigmas, kplan, extra_args, callback, disable, noise_sampler=noise_sampler,
                     generator=generator, grad=grad)


@_doc("RES second-order multistep (exponential integrator on the denoised prediction), ComfyUI's "
      "``sample_res_multistep``: one model evaluation per step.", _COMMON_ARGS, _NOISE_ARGS, _GRAD)
def sample_res_multistep(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                         callback: Callable | None = None, disable: bool | None = None, s_noise: float = 1.0,
                         noise_sampler: Callable | None = None, *, generator: torch.Generator | None = None,
                         grad: str | None = None) -> Tensor:
    return _res("res_multistep", model, x, sigmas, extra_args, callback, disable, 0.0, s_noise, noise_sampler,
                generator, grad)


@_doc("RES second-order multistep with ancestral noise, ComfyUI's ``sample_res_multistep_ancestral``: one model "
      "evaluation per step.", _COMMON_ARGS, _NOISE_ARGS, _GRAD)
def sample_res_multistep_ancestral(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                                   callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                                   s_noise: float = 1.0, noise_sampler: Callable | None = None, *,
                                   generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    return _res("res_multistep_ancestral", model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                noise_sampler, generator, grad)
