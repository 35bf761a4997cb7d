"""Is the learned field a score? Conservativity diagnostics of a model's score field (docs/math.md section 9).

A true score ``s(x) = grad log p_t(x)`` has a symmetric Jacobian and zero circulation around every
closed loop. Both estimators below work on ``s(x) = -eps(x, t) / sigma_t`` (the model's prediction
converted to eps), evaluate every probe or loop point of a batch in one model call, and return
an estimate with its standard error.

    ad.diagnostics.jacobian_asymmetry(model, x, t, probes=32, schedule=sched, cond=labels)
    ad.diagnostics.loop_circulation(model, x, t, radius=1.0, points=32, schedule=sched, cond=labels)
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import validation
from .predictions import check_prediction, to_data_and_noise
from .reference import opmath_dtype
from .schedules import NoiseSchedule


@dataclass(frozen=True)
class Diagnostic:
    """An estimate over a batch with its standard error.

    Attributes:
        estimate: the mean of ``per_sample`` (of its absolute value for the circulation).
        stderr: standard error of `estimate`: over the batch when it holds 2 or more samples,
            else the probe jackknife of the one sample.
        per_sample: (batch,) the value at every sample (signed circulation for loops).
        per_sample_stderr: (batch,) jackknife standard error over probes, or None.
    """

    estimate: float
    stderr: float
    per_sample: Tensor
    per_sample_stderr: Tensor | None = None

    def __str__(self) -> str:
        return f"{self.estimate:.4g} ± {self.stderr:.2g}"


def _times(t, batch: int) -> Tensor:
    """(batch,) float64 CPU model times from a number, a 0-d or a (batch,) tensor."""
    if isinstance(t, (bool, str, bytes)) or (isinstance(t, Tensor) and (t.is_complex() or t.dtype == torch.bool)):
        raise validation.ArgumentTypeError(f"t must be a number or a (batch,) = ({batch},) tensor, got {t!r}")
    try:
        times = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise validation.ArgumentTypeError(f"t must be a number or a (batch,) = ({batch},) tensor, got {t!r}") from None
    if times.dim() == 0:
        times = times.expand(batch)
    if times.shape != (batch,):
        raise ValueError(f"t must be a number or a (batch,) = ({batch},) tensor, got shape {list(times.shape)}")
    return times.clone()


def _repeat(cond, times: int):
    """Conditioning with its leading batch axis tiled `times` times (tensor, dict of tensors or None)."""
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: _repeat(v, times) for k, v in cond.items()}
    return cond.repeat(times, *([1] * (cond.dim() - 1)))


def _check_common(x, t, prediction: str, schedule, cond, generator) -> Tensor:
    """Validates the arguments both diagnostics share; returns the (batch,) float64 CPU times."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating-point tensor (batch, *shape) with at least one feature dimension")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample; got an empty batch")
    check_prediction(prediction)
    if schedule is None and prediction != "eps":
        raise ValueError(f"prediction={prediction!r} needs the schedule to convert the output to eps")
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    validation.conditioning(cond, "cond")
    if generator is not None:
        validation.instance(generator, "generator", torch.Generator, "a torch.Generator")
    times = _times(t, x.shape[0])
    if schedule is not None:
        zero = (schedule.sigma(times) == 0).nonzero()
        if len(zero):
            k = int(zero[0])
            raise ValueError(f"t[{k}]={float(times[k])!r} has sigma_t = 0, where the score -eps/sigma_t is not "
                             "defined; use times with sigma_t > 0")
    return times


def score_field(model: Callable, t: Tensor, schedule: NoiseSchedule | None = None, prediction: str = "eps",
                cond=None) -> Callable[[Tensor], Tensor]:
    """The field ``s(x) = -eps(x, t) / sigma_t`` of a model at fixed per-sample times.

    Args:
        model: ``model(x, t[, cond])`` returning a `prediction`-type output shaped like x.
        t: (batch,) model times, float64.
        schedule: converts the prediction to eps and gives sigma_t; without it (eps models only) the
            field is ``-eps``, the score up to a per-sample scale (to which both diagnostics are invariant).
        prediction: "eps" | "x0" | "v" | "flow".
        cond: conditioning with a leading batch axis, or None.

    Returns:
        ``s(x)`` for x of shape (batch, *shape).
    """

    def field(x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        t_model = t.to(device=x.device, dtype=opmath_dtype(x.dtype))
        out = validation.model_output(model(x, t_model) if cond is None else model(x, t_model, cond), x)
        if schedule is None:
            return -out
        alpha = schedule.alpha(t).to(x).view(shape)
        sigma = schedule.sigma(t).to(x).view(shape)
        _, eps = to_data_and_noise(out, x, alpha, sigma, prediction)
        return -eps / sigma

    return field


def _jackknife_ratio(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per column, ``r = sqrt(2 mean(a) / mean(b))`` over rows (probes) and its jackknife standard error."""
    probes = a.shape[0]
    ratio = torch.sqrt(2 * (a.mean(0) / b.mean(0)).clamp_min(0))
    a_loo = (a.sum(0) - a) / (probes - 1)
    b_loo = (b.sum(0) - b) / (probes - 1)
    r_loo = torch.sqrt(2 * (a_loo / b_loo).clamp_min(0))
    stderr = torch.sqrt((probes - 1) / probes * ((r_loo - r_loo.mean(0)) ** 2).sum(0))
    return ratio, stderr


def _summary(values: Tensor, per_stderr: Tensor | None) -> tuple[float, float]:
    if values.numel() >= 2:
        return float(values.mean()), float(values.std() / math.sqrt(values.numel()))
    return float(values.mean()), float(per_stderr[0]) if per_stderr is not None else math.nan


@torch.inference_mode(False)  # the JVPs and VJPs need autograd whatever the caller's context
def jacobian_asymmetry(model: Callable, x: Tensor, t, probes: int = 32, schedule: NoiseSchedule | None = None,
                       prediction: str = "eps", cond=None, generator: torch.Generator | None = None) -> Diagnostic:
    """Relative asymmetry ``||J - J^T||_F / ||J||_F`` of the score field's Jacobian, per sample.

    With Gaussian probes v, ``||J - J^T||_F^2 = 2 E_v[||Jv||^2 - (J^T v).(J v)]`` and
    ``||J||_F^2 = E_v ||Jv||^2``; every probe costs one JVP (forward mode) and one VJP, and all
    probes of all samples run as one batch of ``probes * batch`` evaluations. Zero for a true score.
    Gradients are enabled inside, also under the caller's ``torch.no_grad()`` or ``torch.inference_mode()``.

    Args:
        model: ``model(x, t[, cond])`` returning a `prediction`-type output shaped like x.
        x: (batch, *shape) points to probe (e.g. noised data at time t).
        t: model time, a number or a (batch,) tensor, with sigma_t > 0 (the score needs it).
        probes: Gaussian probes per sample, >= 2.
        schedule: the model's schedule (required unless prediction="eps", see :func:`score_field`).
        prediction: "eps" | "x0" | "v" | "flow".
        cond: conditioning with a leading batch axis (tensor or dict of tensors), or None.
        generator: torch.Generator for the probes.

    Returns:
        A :class:`Diagnostic`: per-sample ratios, their probe-jackknife standard errors, and the
        batch mean with its standard error.

    Raises:
        ValueError / TypeError naming the argument for bad arguments (a time with sigma_t = 0 included) or
        a model output of the wrong shape.
    """
    times = _check_common(x, t, prediction, schedule, cond, generator)
    probes = validation.integer(probes, "probes", 2)
    batch = x.shape[0]
    field = score_field(model, times.repeat(probes), schedule, prediction, _repeat(cond, probes))
    xs = x.detach().repeat(probes, *([1] * (x.dim() - 1)))
    v = torch.randn(xs.shape, generator=generator, dtype=x.dtype).to(x.device)
    with torch.enable_grad():
        xs.requires_grad_(True)
        with torch.autograd.forward_ad.dual_level():
            s, jv = torch.autograd.forward_ad.unpack_dual(field(torch.autograd.forward_ad.make_dual(xs, v)))
        if jv is None:
            jv = torch.zeros_like(xs)
        elif not s.requires_grad:
            raise ValueError("the model's output has a forward-mode derivative in x but no reverse-mode one (does "
                             "it detach, or run under torch.no_grad() inside?): the asymmetry needs both")
        jtv = torch.autograd.grad(s, xs, v, allow_unused=True)[0] if s.requires_grad else None
    if jtv is None:
        jtv = torch.zeros_like(xs)
    jv, jtv = jv.detach().double().flatten(1), jtv.detach().double().flatten(1)
    norm = (jv * jv).sum(1).view(probes, batch)
    asym = norm - (jtv * jv).sum(1).view(probes, batch)
    ratio, stderr = _jackknife_ratio(asym, norm)
    estimate, total_stderr = _summary(ratio, stderr)
    return Diagnostic(estimate, total_stderr, ratio, stderr)


def random_planes(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(batch, 2, *shape) two random orthonormal directions per sample (Gram-Schmidt on Gaussians)."""
    g = torch.randn((x.shape[0], 2, x[0].numel()), generator=generator, dtype=torch.float64)
    e1 = g[:, 0] / g[:, 0].norm(dim=1, keepdim=True)
    e2 = g[:, 1] - (g[:, 1] * e1).sum(1, keepdim=True) * e1
    e2 = e2 / e2.norm(dim=1, keepdim=True)
    return torch.stack([e1, e2], 1).view(x.shape[0], 2, *x.shape[1:]).to(x)


def loop_circulation(model: Callable, x: Tensor, t, radius: float = 1.0, points: int = 32,
                     schedule: NoiseSchedule | None = None, prediction: str = "eps", cond=None,
                     generator: torch.Generator | None = None, planes: Tensor | None = None) -> Diagnostic:
    """Normalised circulation of the score field around a random planar circle centred at each sample.

    For the circle ``x + r (cos θ e1 + sin θ e2)`` (e1, e2 orthonormal, random per sample), the
    contour integral ``C = ∮ s . dl`` by the trapezoid rule on `points` equally spaced angles
    (exact for a field linear in x), divided by ``∮ |s . dl|``: a value in [-1, 1] that is zero
    for a true score. All points of all loops are evaluated in one batch.

    Args:
        model: ``model(x, t[, cond])`` returning a `prediction`-type output shaped like x.
        x: (batch, *shape) loop centres.
        t: model time, a number or a (batch,) tensor, with sigma_t > 0 (the score needs it).
        radius: circle radius, in the units of x. For small circles the normalised circulation grows
            in proportion to the radius (the antisymmetric part of J against the field's size).
        points: points per circle, >= 3.
        schedule: the model's schedule (required unless prediction="eps").
        prediction: "eps" | "x0" | "v" | "flow".
        cond: conditioning with a leading batch axis, or None.
        generator: torch.Generator for the random planes.
        planes: optional (batch, 2, *shape) orthonormal directions (e1, e2) instead of random ones
            (orthonormality is checked to 1e-3).

    Returns:
        A :class:`Diagnostic`: per-loop signed normalised circulations, and the mean of their
        absolute values with its standard error over loops.

    Raises:
        ValueError / TypeError naming the argument for bad arguments (a time with sigma_t = 0 included) or
        a model output of the wrong shape.
    """
    times = _check_common(x, t, prediction, schedule, cond, generator)
    points = validation.integer(points, "points", 3)
    radius = validation.positive(radius, "radius")
    batch = x.shape[0]
    if planes is None:
        planes = random_planes(x, generator)
    else:
        validation.floating(planes, "planes")
        if planes.shape != (batch, 2, *x.shape[1:]):
            raise ValueError(f"planes must have shape {[batch, 2, *x.shape[1:]]}, got {list(planes.shape)}")
        flat = planes.detach().double().flatten(2)
        gram = flat @ flat.transpose(1, 2)
        if not bool((gram - torch.eye(2, dtype=gram.dtype, device=gram.device)).abs().max() <= 1e-3):
            raise ValueError("planes must hold two orthonormal directions per sample (e1.e1 = e2.e2 = 1, e1.e2 = 0)")
    planes = planes.detach().to(x)
    e1, e2 = planes[:, 0], planes[:, 1]
    theta = torch.arange(points, dtype=torch.float64) * (2 * math.pi / points)
    view = (points, 1) + (1,) * (x.dim() - 1)
    cos, sin = theta.cos().to(x).view(view), theta.sin().to(x).view(view)
    positions = x.detach() + radius * (cos * e1 + sin * e2)           # (points, batch, *shape)
    tangents = radius * (cos * e2 - sin * e1)                          # d position / d theta
    field = score_field(model, times.repeat(points), schedule, prediction, _repeat(cond, points))
    with torch.no_grad():
        s = field(positions.flatten(0, 1)).view(positions.shape)
    integrand = (s.double() * tangents.double()).flatten(2).sum(2)    # (points, batch)
    step = 2 * math.pi / points
    circulation = integrand.sum(0) * step
    total = integrand.abs().sum(0) * step
    normalised = torch.where(total > 0, circulation / total.clamp_min(torch.finfo(torch.float64).tiny),
                             torch.zeros_like(total))
    estimate, stderr = _summary(normalised.abs(), None)
    return Diagnostic(estimate, stderr, normalised, None)


class GaussianEpsModel(torch.nn.Module):
    """The exact noise prediction of data ~ N(mu, diag(s^2)) under `schedule`: the analytic reference (a true score).

    Args:
        schedule: the noise schedule; mu, s: (*shape) per-dimension mean and standard deviation.
    """

    def __init__(self, schedule: NoiseSchedule, mu: Tensor, s: Tensor):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("mu", mu.detach().clone())
        self.register_buffer("s", s.detach().clone())

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        tt = t.detach().to(torch.float64).cpu()
        alpha = self.schedule.alpha(tt).to(x).view(shape)
        sigma = self.schedule.sigma(tt).to(x).view(shape)
        mu, s = self.mu.to(x), self.s.to(x)
        return sigma * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)

    def flow_map(self, x: Tensor, t_from, t_to) -> Tensor:
        """The exact probability-flow ODE solution from time t_from to t_to (floats or 0-d tensors)."""
        t_from, t_to = (torch.as_tensor(t, dtype=torch.float64) for t in (t_from, t_to))

        def k(t):
            return torch.sqrt(self.schedule.alpha(t) ** 2 * self.s**2 + self.schedule.sigma(t) ** 2)

        alpha = self.schedule.alpha
        return alpha(t_to) * self.mu + (x - alpha(t_from) * self.mu) * k(t_to) / k(t_from)


@dataclass(frozen=True)
class DiagnosticRow:
    """One line of :func:`conservativity_table`."""

    model: str
    t: float
    asymmetry: Diagnostic
    circulation: Diagnostic


def conservativity_table(models: Mapping[str, tuple[Callable, str]], schedule: NoiseSchedule, x0: Tensor, times:
                         Sequence[float], cond=None, probes: int = 32, points: int = 32, radius: float = 1.0,
                         seed: int = 0) -> list[DiagnosticRow]:
    """Both diagnostics for several models at several times, on the same noised data and random draws.

    Args:
        models: name -> (model, prediction); every model is called as ``model(x, t[, cond])``.
        schedule: the schedule of all models; x0: (batch, *shape) clean data, noised at each t as
            ``alpha_t x0 + sigma_t eps`` (one fixed eps).
        times: model times; cond: conditioning passed to every model.
        probes, points, radius: as in :func:`jacobian_asymmetry` and :func:`loop_circulation`.
        seed: seed of the noise, the probes and the planes.
    """
    # Drawn on the CPU, so that the points are the same on every device.
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype).to(x0.device)
    rows = []
    for t in times:
        tt = torch.tensor(float(t), dtype=torch.float64)
        x = float(schedule.alpha(tt)) * x0 + float(schedule.sigma(tt)) * eps
        for name, (model, prediction) in models.items():
            asym = jacobian_asymmetry(model, x, t, probes=probes, schedule=schedule, prediction=prediction, cond=cond,
                                      generator=torch.Generator().manual_seed(seed + 1))
            circ = loop_circulation(model, x, t, radius=radius, points=points, schedule=schedule,
                                    prediction=prediction, cond=cond, generator=torch.Generator().manual_seed(seed + 2))
            rows.append(DiagnosticRow(name, float(t), asym, circ))
    return rows


def format_table(rows: Sequence[DiagnosticRow]) -> str:
    """A markdown table of :func:`conservativity_table` rows (estimate ± standard error)."""
    lines = ["| model | t | asymmetry ‖J−Jᵀ‖/‖J‖ | loop circulation |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.model} | {row.t:g} | {row.asymmetry.estimate:.3g} ± {row.asymmetry.stderr:.1g} | "
                     f"{row.circulation.estimate:.3g} ± {row.circulation.stderr:.1g} |")
    return "\n".join(lines)
