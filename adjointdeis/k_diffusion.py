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

from .sampling import sample
from .schedules import EDMSchedule

__all__ = ["sample_deis", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m", "sample_euler",
           "sample_heun"]


def _sigma_grid(sigmas: Tensor) -> list[float]:
    """The sigmas as Python floats (one host sync), validated: 1-D, >= 2 entries, strictly decreasing, >= 0."""
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels (N steps need N + 1)")
    values = sigmas.detach().to(device="cpu", dtype=torch.float64).tolist()
    for i, (high, low) in enumerate(zip(values, values[1:])):
        if not low < high:
            raise ValueError(f"sigmas must be strictly decreasing; sigmas[{i + 1}]={low!r} >= sigmas[{i}]={high!r}")
    if not (values[-1] >= 0 and all(math.isfinite(v) for v in values)):
        raise ValueError(f"sigmas must be finite and non-negative; got sigmas[-1]={values[-1]!r}")
    return values


class _Denoiser:
    """``model(x, t[, cond])`` for ``sample`` over a k-diffusion denoiser, firing the callback.

    Tensors of extra_args travel as sample's cond (so they receive gradients), everything else is
    passed as it is. The first ``len(step_of_row)`` calls are the forward pass, one per plan row;
    later calls (the backward pass re-running the model) fire no callback.
    """

    def __init__(self, model: Callable, constants: dict, callback: Callable | None, sigmas: Tensor,
                 step_of_row: list[int | None]):
        self.model, self.constants, self.callback = model, constants, callback
        self.sigmas, self.step_of_row = sigmas, step_of_row
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, cond: Mapping | None = None) -> Tensor:
        denoised = self.model(x, t, **self.constants, **(cond or {}))
        if self.callback is not None and self.calls < len(self.step_of_row):
            step = self.step_of_row[self.calls]
            if step is not None:
                sigma = self.sigmas[step]
                self.callback({"x": x, "i": step, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        self.calls += 1
        return denoised


def _run(model, x, sigmas, extra_args, callback, disable, *, solver, order, sde=False, generator=None, grad=None):
    grid = _sigma_grid(sigmas)
    steps = len(grid) - 1
    if solver == "heun":
        if grid[-1] != 0:
            raise ValueError("sample_heun: our Heun's last step is an Euler step, which k-diffusion takes only "
                             "when sigmas ends in 0; append a 0 to sigmas")
        step_of_row = [None if r % 2 else r // 2 for r in range(2 * steps - 1)]
    else:
        step_of_row = list(range(steps))
    extra_args = {} if extra_args is None else dict(extra_args)
    cond = {k: v for k, v in extra_args.items() if isinstance(v, Tensor)}
    constants = {k: v for k, v in extra_args.items() if not isinstance(v, Tensor)}
    denoiser = _Denoiser(model, constants, callback, sigmas, step_of_row)
    parameters = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    return sample(denoiser, x, EDMSchedule(), steps=steps, solver=solver, order=order, prediction="x0",
                  cond=cond or None, sde=sde, generator=generator, timesteps=torch.tensor(grid, dtype=torch.float64),
                  lower_order_final=False, denoise_to_zero=grid[-1] == 0, grad=grad, parameters=parameters,
                  progress=disable is not True)


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
