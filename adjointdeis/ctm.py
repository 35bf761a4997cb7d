"""Consistency-trajectory (gamma) sampling of two-time models on the EDM grid (docs/math.md section 8).

A two-time model jumps along the probability-flow ODE from noise level t to noise level u <= t
(alpha = 1, sigma = t). It is called as ``G(x, t, u)`` or ``G(x, t, u, cond)`` with t and u of
shape (batch,) and returns a tensor shaped like x: either CTM's ``g`` (output="g"), from which
the jump is ``G = (u/t) x + (1 - u/t) g`` and ``g(x, t, t)`` is the denoiser, or the jump itself
(output="jump").
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import ops, validation
from .planning import all_finite
from .reference import opmath_dtype
from .schedules import check_noise_levels

OUTPUTS = ("g", "jump")


def _model_name(model) -> str:
    return getattr(model, "__name__", None) or type(model).__name__


def _call_two_time(model: Callable, x: Tensor, t: Tensor, u: Tensor, cond) -> Tensor:
    out = model(x, t, u) if cond is None else model(x, t, u, cond)
    return validation.model_output(out, x, f"the two-time model {_model_name(model)}")


def _check_output(output: str) -> None:
    validation.choice(output, "output", OUTPUTS)


@torch.compiler.assume_constant_result
def ctm_plan(sigmas: tuple[float, ...], gamma: float, output: str) -> tuple[list[list[float]], list[float],
                                                                              list[float]]:
    """Per-step coefficients of gamma sampling, in float64 on the host.

    Step n jumps from ``t = sigmas[n]`` to ``u = sqrt(1 - gamma^2) sigmas[n+1]`` and adds
    ``c xi`` with ``c = sqrt(sigmas[n+1]^2 - u^2) = gamma sigmas[n+1]`` (not on the last step), so that
    ``x_next = a x + b out + c xi`` with ``(a, b) = (u/t, 1 - u/t)`` for output="g" and
    ``(0, 1)`` for output="jump".

    Returns:
        ``(rows, ts, us)``: N rows ``[a, b, c]`` and the N times t and targets u.
    """
    keep = math.sqrt((1.0 - gamma) * (1.0 + gamma))
    rows, ts, us = [], [], []
    steps = len(sigmas) - 1
    for n in range(steps):
        t, t_next = sigmas[n], sigmas[n + 1]
        u = keep * t_next
        c = 0.0 if n == steps - 1 else t_next * gamma
        a, b = (u / t, (t - u) / t) if output == "g" else (0.0, 1.0)
        rows.append([a, b, c])
        ts.append(t)
        us.append(u)
    return rows, ts, us


def sample_ctm(model: Callable, x_T: Tensor, sigmas, gamma: float = 0.0, generator: torch.Generator | None = None,
               output: str = "g", cond=None, progress: bool = False, check_finite: bool = True) -> Tensor:
    """Samples a two-time (consistency-trajectory) model with gamma sampling, one fused step per jump.

    For n = 0..N-1: ``u = sqrt(1 - gamma^2) t_{n+1}``, ``x <- G(x, t_n, u)``, then
    ``x <- x + sqrt(t_{n+1}^2 - u^2) xi`` except on the last step. gamma = 0 makes deterministic
    long jumps along the probability-flow ODE; gamma = 1 is consistency-model multistep sampling.
    The per-step coefficients are computed once in float64 on the host and the loop never syncs
    the host (``torch.compile`` friendly). Gradients flow by plain autograd through the loop; for
    the gradient modes of :func:`adjointdeis.sample`, wrap the model with :func:`score_from_ctm`.

    Args:
        model: ``G(x, t, u)`` or ``G(x, t, u, cond)`` -> tensor shaped like x; t and u are (batch,)
            noise levels (EDM: alpha = 1, sigma = t), float64 for float64 x, else float32.
        x_T: (batch, *shape) initial state, ``sigmas[0]``-sized noise.
        sigmas: (N+1,) noise levels, strictly decreasing, ``sigmas[-1] >= 0`` (e.g.
            ``EDMSchedule().timesteps(N, "karras")``, optionally with 0 appended).
        gamma: stochasticity in [0, 1].
        generator: torch.Generator for the injected noise (reproducible runs).
        output: "g" (CTM's parameterisation, ``G = (u/t) x + (1 - u/t) g``) or "jump" (G itself).
        cond: conditioning passed to the model as its fourth argument.
        progress: show a tqdm progress bar.
        check_finite: after the loop (one host sync), raise if the sample is not finite.

    Returns:
        (batch, *shape) the sample, x_T's dtype and device.

    Raises:
        ValueError for gamma outside [0, 1], an unknown output, a bad sigma grid, or a model output
        of the wrong shape (naming the model); TypeError for a model that is not callable, a generator
        that is not a torch.Generator or a progress / check_finite that is not a bool; FloatingPointError
        when the result is not finite.
    """
    validation.function(model, "model", "G(x, t, u[, cond]) -> Tensor")
    validation.floating(x_T, "x_T", min_dim=1)
    if isinstance(gamma, Tensor):
        raise validation.ArgumentTypeError("gamma must be a Python number in [0, 1]; got a tensor")
    gamma = validation.probability(gamma, "gamma")
    _check_output(output)
    if generator is not None:
        validation.instance(generator, "generator", torch.Generator, "a torch.Generator")
    validation.flag(progress, "progress")
    validation.flag(check_finite, "check_finite")
    rows, ts, us = ctm_plan(check_noise_levels(sigmas), float(gamma), output)
    # Each jump [a, b, c] is the multistep row [a, b0=b, 0, 0, c, p=0, q=1] with out = g.
    coeffs = torch.tensor([[a, b, 0.0, 0.0, c, 0.0, 1.0] for a, b, c in rows], dtype=torch.float64, device=x_T.device)
    time_dtype = opmath_dtype(x_T.dtype)
    t_model = torch.tensor(ts, dtype=time_dtype, device=x_T.device)
    u_model = torch.tensor(us, dtype=time_dtype, device=x_T.device)
    batch, x = x_T.shape[0], x_T
    steps = range(len(rows))
    if progress and not torch.compiler.is_compiling():
        steps = tqdm(steps, disable=None, desc="ctm sampling", leave=False)
    for n in steps:
        out = _call_two_time(model, x, t_model[n].expand(batch), u_model[n].expand(batch), cond)
        noise = None
        if n < len(rows) - 1 and gamma > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, _ = ops.multistep_step(x, out.to(x.dtype), [], coeffs[n], noise, save_m0=False)
    if check_finite and not torch.compiler.is_compiling() and not all_finite(x):
        raise FloatingPointError("sample_ctm: the result is not finite: the model returned NaN or Inf")
    return x


class CTMDenoiser(torch.nn.Module):
    """The denoiser ``D(x, t)`` of a two-time model, at ``u = t``: an x0-prediction model on the EDM schedule.

    With output="g", ``D(x, t) = g(x, t, t)``. With output="jump", ``D = x - t dG/du`` at ``u = t``
    (the probability-flow ODE ``dx/dsigma = (x - D)/sigma``), the derivative taken by forward-mode
    AD, so gradients with respect to x, the conditioning and the model's parameters still flow.
    Use it with ``adjointdeis.sample(..., prediction="x0")`` and an :class:`~adjointdeis.EDMSchedule`.
    """

    def __init__(self, model: Callable, output: str = "g"):
        super().__init__()
        validation.function(model, "model", "G(x, t, u[, cond]) -> Tensor")
        _check_output(output)
        self.model, self.output = model, output

    def forward(self, x: Tensor, t: Tensor, *cond) -> Tensor:
        cond = cond[0] if cond else None
        if self.output == "g":
            return _call_two_time(self.model, x, t, t, cond)
        # torch.func.jvp, not forward_ad.dual_level: it also runs inside an autograd.Function's forward
        # (where ad.sample's gradient modes call the model), and reverse mode differentiates through it.
        t = t.contiguous()  # the sampler passes an expanded time; jvp needs its own storage
        _, dG_du = torch.func.jvp(lambda u: _call_two_time(self.model, x, t, u, cond), (t,), (torch.ones_like(t),))
        return x - t.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1)) * dG_du


def score_from_ctm(model: Callable, output: str = "g") -> CTMDenoiser:
    """Adapts a two-time model to an x0-prediction model ``D(x, t)`` (``u = t``) for the ordinary solvers.

    Args:
        model: ``G(x, t, u[, cond])`` as in :func:`sample_ctm`.
        output: "g" or "jump", what the model returns.

    Returns:
        A module ``D(x, t[, cond])`` for ``adjointdeis.sample(D, x_T, EDMSchedule(...), prediction="x0")``;
        every gradient mode works through it.

    Raises:
        ValueError for an unknown output; TypeError for a model that is not callable.
    """
    return CTMDenoiser(model, output)
