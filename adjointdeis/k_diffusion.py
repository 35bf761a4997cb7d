"""k-diffusion-style samplers: ``sample_dpmpp_2m(model, x, sigmas, extra_args, callback, disable)`` and siblings.

Drop-in replacements for the functions of the same name in k-diffusion, run as one
``adjointdeis.sample`` call (fused steps, no host sync inside the loop) and differentiable.

The calling convention is k-diffusion's: the denoiser ``model(x, sigma * s_in, **extra_args)``
returns the denoised x0 for a state in variance-exploding coordinates ``x = x0 + sigma * eps``;
``sigmas`` is a decreasing (N+1,) tensor, normally ending in 0 (the last step then returns the
denoised prediction); ``callback`` receives ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per
step with the step's input state; ``disable`` turns the progress bar off.

In our terms: an ``EDMSchedule`` (alpha = 1, sigma = t, model time = sigma), ``prediction="x0"``,
``timesteps=sigmas`` and no lowered final orders (k-diffusion lowers only the step to sigma = 0).

Unlike k-diffusion's (which run under ``torch.no_grad``) these keep gradients: with grad enabled and
x, a tensor in `extra_args` or a parameter of `model` requiring grad, the result is attached to autograd
through the exact discrete adjoint (``grad="discrete"``, one model re-run per step in the backward
pass). Run them under ``torch.no_grad()`` for plain sampling.
"""

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .planning import StepInfo
from .sampling import sample
from .schedules import EDMSchedule, check_noise_levels

__all__ = ["sample_deis", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m", "sample_euler",
           "sample_heun"]


class _Denoiser:
    """``model(x, t[, cond])`` for ``sample`` over a k-diffusion denoiser.

    Tensors of extra_args travel as sample's cond (so they receive gradients), everything else is
    passed as it is.
    """

    def __init__(self, model: Callable, constants: dict):
        self.model, self.constants = model, constants

    def __call__(self, x: Tensor, t: Tensor, cond: Mapping | None = None) -> Tensor:
        return self.model(x, t, **self.constants, **(cond or {}))


def _step_callback(callback: Callable | None, sigmas) -> Callable[[StepInfo], None] | None:
    """k-diffusion's per-step callback as a run-loop callback: once per step, at its first evaluation."""
    if callback is None:
        return None

    def report(info: StepInfo) -> None:
        if info.starts_step:
            sigma = sigmas[info.step]
            callback({"x": info.x, "i": info.step, "sigma": sigma, "sigma_hat": sigma, "denoised": info.output})
    return report


def _run(model, x, sigmas, extra_args, callback, disable, *, solver, order, sde=False, generator=None, grad=None):
    grid = check_noise_levels(sigmas)
    if solver == "heun" and grid[-1] != 0:
        raise ValueError("sample_heun: our Heun's last step is an Euler step, which k-diffusion takes only "
                         "when sigmas ends in 0; append a 0 to sigmas")
    extra_args = {} if extra_args is None else dict(extra_args)
    cond = {k: v for k, v in extra_args.items() if isinstance(v, Tensor)}
    constants = {k: v for k, v in extra_args.items() if not isinstance(v, Tensor)}
    parameters = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    return sample(_Denoiser(model, constants), x, EDMSchedule(), steps=len(grid) - 1, solver=solver, order=order,
                  prediction="x0", cond=cond or None, sde=sde, generator=generator,
                  timesteps=torch.tensor(grid, dtype=torch.float64), lower_order_final=False,
                  denoise_to_zero=grid[-1] == 0, grad=grad, parameters=parameters, progress=disable is not True,
                  callback=_step_callback(callback, sigmas))


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


def sample_dpmpp_2m_sde(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: Callable | None = None, solver_type: str = "midpoint",
                        *, generator: torch.Generator | None = None, grad: str | None = None) -> Tensor:
    """SDE-DPM-Solver++(2M), k-diffusion's ``sample_dpmpp_2m_sde`` with ``eta=1``, midpoint form.

    Noise: one standard normal draw per step (not on a step to sigma = 0), from `generator` or the
    global generator, as ``torch.randn(x.shape, generator=generator)``; k-diffusion's default
    Brownian-tree sampler gives noise of the same law, not the same values.

    Args:
        eta, s_noise: must be 1 (what the SDE-DPM-Solver++ coefficients implement).
        noise_sampler: must be None: the noise is drawn inside the fused loop.
        solver_type: must be "midpoint".
        generator: torch.Generator for reproducible noise.
        Others as :func:`sample_dpmpp_2m`.

    Raises:
        ValueError for eta, s_noise, solver_type or noise_sampler other than the supported values.
    """
    if eta != 1.0 or s_noise != 1.0:
        raise ValueError(f"sample_dpmpp_2m_sde supports eta=1 and s_noise=1 (SDE-DPM-Solver++), got eta={eta!r}, "
                         f"s_noise={s_noise!r}")
    if solver_type != "midpoint":
        raise ValueError(f"sample_dpmpp_2m_sde supports solver_type='midpoint', got {solver_type!r}")
    if noise_sampler is not None:
        raise ValueError("sample_dpmpp_2m_sde draws its noise inside the fused loop; pass generator= instead of "
                         "noise_sampler")
    return _run(model, x, sigmas, extra_args, callback, disable, solver="dpmpp", order=2, sde=True,
                generator=generator, grad=grad)


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


def _no_churn(name: str, s_churn: float) -> None:
    if s_churn != 0:
        raise ValueError(f"{name} supports s_churn=0 only (deterministic steps), got s_churn={s_churn!r}")


def sample_euler(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, *,
                 grad: str | None = None) -> Tensor:
    """Euler steps of the probability-flow ODE in sigma (Karras et al. Algorithm 2 without churn) = DDIM.

    Args:
        s_churn: must be 0; s_tmin, s_tmax, s_noise: then unused. Others as :func:`sample_dpmpp_2m`.
    """
    _no_churn("sample_euler", s_churn)
    return _run(model, x, sigmas, extra_args, callback, disable, solver="ddim", order=1, grad=grad)


def sample_heun(model: Callable, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, *,
                grad: str | None = None) -> Tensor:
    """Heun's second-order method (Karras et al. Algorithm 2 without churn), Euler on the step to 0.

    Two model calls per step except the last; the callback fires once per step.

    Args:
        sigmas: must end in 0. s_churn: must be 0. Others as :func:`sample_dpmpp_2m`.
    """
    _no_churn("sample_heun", s_churn)
    return _run(model, x, sigmas, extra_args, callback, disable, solver="heun", order=2, grad=grad)
