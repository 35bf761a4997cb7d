"""Noise schedules: alpha_t, sigma_t, the half log-SNR lambda_t, its inverse, and time grids.

A schedule describes the forward process ``x_t = alpha_t * x_0 + sigma_t * eps``. Everything the samplers
need is ``alpha_t``, ``sigma_t``, ``lambda_t = log(alpha_t) - log(sigma_t)`` (strictly decreasing in t),
its inverse ``t(lambda)``, the time value the network is called with, and grids of times from the noisiest
time ``t_max`` to the cleanest ``t_min``.

All schedule arithmetic runs in float64 on the CPU. Every method takes a tensor (any shape, any real
dtype, any device) or a Python number and returns a float64 CPU tensor of the same shape. Differences of
exponentials go through ``expm1``/``log1p``/``logaddexp`` so that sigma stays accurate as t -> 0.

Grid spacings (``NoiseSchedule.timesteps``, docs/math.md section 3) are the registry :data:`SPACINGS`:

- ``"uniform"``: uniform in t;
- ``"logsnr"``: uniform in lambda;
- ``"quadratic"``: uniform in sqrt(t) (DPM-Solver's ``time_quadratic``);
- ``"karras"``: uniform in ``(sigma/alpha)^(1/rho) = exp(-lambda/rho)``, rho = 7 unless the schedule sets
  its own (EDM);
- discrete VP schedules also have the integer spacings ``"linspace"``, ``"leading"`` and ``"trailing"`` of
  Lin et al. (2023), Table 2 (:func:`discrete_timesteps`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import validation

__all__ = [
    "NoiseSchedule",
    "VPSchedule",
    "LinearVPSchedule",
    "CosineVPSchedule",
    "DiscreteVPSchedule",
    "FlowSchedule",
    "EDMSchedule",
]



@dataclass(frozen=True)
class Spacing:
    """A grid spacing of the registry :data:`SPACINGS`.

    Attributes:
        name: the key ``timesteps`` takes.
        description: what the grid is uniform in.
        discrete: integer timesteps of a discrete schedule, then 0 (only :class:`DiscreteVPSchedule` has them).
    """

    name: str
    description: str
    discrete: bool = False


SPACINGS: dict[str, Spacing] = {s.name: s for s in (
    Spacing("uniform", "uniform in t"),
    Spacing("logsnr", "uniform in the half log-SNR lambda"),
    Spacing("quadratic", "uniform in sqrt(t)"),
    Spacing("karras", "uniform in (sigma/alpha)^(1/rho)"),
    Spacing("linspace", "integer timesteps rounded from a linspace over [0, N - 1]", discrete=True),
    Spacing("leading", "integer multiples of N // (steps + 1), plus steps_offset", discrete=True),
    Spacing("trailing", "integer timesteps counted down from N in strides of N / steps", discrete=True),
)}
CONTINUOUS_SPACINGS = tuple(name for name, spacing in SPACINGS.items() if not spacing.discrete)
DISCRETE_SPACINGS = tuple(name for name, spacing in SPACINGS.items() if spacing.discrete)


def _format_number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


@dataclass(frozen=True)
class _Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def contains(self, values: Tensor) -> Tensor:
        above = values >= self.low if self.low_closed else values > self.low
        below = values <= self.high if self.high_closed else values < self.high
        return above & below

    def __str__(self) -> str:
        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"{left}{_format_number(self.low)}, {_format_number(self.high)}{right}"


def _to_float64(value, name: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.is_complex():
            raise TypeError(f"{name} must be real; got dtype {value.dtype}")
        return value.to(device="cpu", dtype=torch.float64)
    if isinstance(value, (str, bytes)) or np.iscomplexobj(value):
        raise TypeError(f"{name} must be real numbers (a float, a sequence of them or a tensor), got {value!r:.80}")
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be real numbers (a float, a sequence of them or a tensor), got "
                        f"{value!r:.80}: {error}") from None


def _element_label(name: str, flat_index: int, shape: torch.Size) -> str:
    if len(shape) == 0:
        return name
    index = np.unravel_index(flat_index, tuple(shape))
    return f"{name}[{', '.join(str(int(i)) for i in index)}]"


def _first_true(mask: Tensor) -> int | None:
    hits = mask.reshape(-1).nonzero()
    return None if hits.numel() == 0 else int(hits[0, 0])


def _check_time_range(t_min, t_max, domain: _Interval) -> tuple[float, float]:
    t_min = validation.real(t_min, "t_min")
    t_max = validation.real(t_max, "t_max")
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        if not bool(domain.contains(torch.tensor(value, dtype=torch.float64))):
            raise ValueError(f"{name} must lie in {domain}; got {name}={value!r}")
    if not t_min < t_max:
        raise ValueError(f"t_min must be smaller than t_max; got t_min={t_min!r} >= t_max={t_max!r}")
    return t_min, t_max


def check_decreasing(values: Sequence[float], name: str) -> None:
    """Checks a grid given as Python numbers: every entry finite, then the entries strictly decreasing.

    Raises:
        ValueError naming the first bad entry, e.g. ``"sigmas must be strictly decreasing; sigmas[2]=10.0 >=
        sigmas[1]=10.0"``.
    """
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite; {name}[{i}]={value!r}")
    for i in range(1, len(values)):
        if not values[i] < values[i - 1]:
            raise ValueError(f"{name} must be strictly decreasing; {name}[{i}]={values[i]!r} >= "
                             f"{name}[{i - 1}]={values[i - 1]!r}")


def check_noise_levels(sigmas, name: str = "sigmas") -> tuple[float, ...]:
    """Validates a grid of VE noise levels (EDM's time, alpha = 1), as CTM and k-diffusion samplers take them.

    Args:
        sigmas: (N+1,) floating-point tensor or sequence of numbers (a list of floats keeps ``torch.compile``
            free of graph breaks), N >= 1, finite, strictly decreasing, ``sigmas[-1] >= 0``.
        name: the argument's name in messages.

    Returns:
        The grid as a tuple of Python floats (one host sync for a device tensor).

    Raises:
        ValueError naming the first problem.
    """
    if isinstance(sigmas, Tensor) and (not sigmas.is_floating_point() or sigmas.dim() != 1):
        raise validation.ArgumentTypeError(f"{name} must be a 1-D floating-point tensor, got dtype {sigmas.dtype} "
                                           f"and shape {list(sigmas.shape)}")
    values = validation.reals(sigmas, name)
    if len(values) < 2:
        raise ValueError(f"{name} must hold at least 2 noise levels (N steps need N + 1), got {len(values)}")
    check_decreasing(values, name)
    if values[-1] < 0:
        raise ValueError(f"{name} must be >= 0; {name}[{len(values) - 1}]={values[-1]!r}")
    return tuple(values)


def discrete_timesteps(spacing: str, steps: int, count: int, steps_offset: int = 0,
                       last: int | None = None) -> np.ndarray:
    """The integer timesteps of a discrete spacing (Lin et al. 2023, Table 2), noisiest first.

    These are the ``timestep_spacing`` grids of diffusers' multistep schedulers, computed with the same
    NumPy float arithmetic, call for call, so the integers are bit-identical. "trailing" keeps only
    `steps` entries where the float ``arange`` overshoots by one (to timestep -1).

    Args:
        spacing: one of :data:`DISCRETE_SPACINGS`.
        steps: number of steps, at least 1.
        count: N, the number of training timesteps.
        steps_offset: added to the "leading" timesteps.
        last: exclusive top of the timesteps, at most N (less when the noisiest ones are left out).

    Returns:
        (steps,) int64 timesteps, noisiest first (not checked for repeats or range).
    """
    last = count if last is None else last
    if spacing == "linspace":
        model_times = np.rint(np.linspace(0, last - 1, steps + 1))[:0:-1]
    elif spacing == "leading":
        model_times = np.arange(steps, 0, -1, dtype=np.int64) * (last // (steps + 1)) + steps_offset
    elif spacing == "trailing":
        model_times = np.rint(np.arange(last, 0, -count / steps))[:steps] - 1
    else:
        raise ValueError(f"unknown discrete spacing {spacing!r}; choose one of {', '.join(DISCRETE_SPACINGS)}")
    return model_times.astype(np.int64)


def _softplus(x: Tensor) -> Tensor:
    return torch.logaddexp(x, torch.zeros_like(x))


class NoiseSchedule(abc.ABC):
    """A forward process ``x_t = alpha_t x_0 + sigma_t eps`` with the quantities samplers need.

    Subclasses implement the private float64 formulas; the public methods convert and validate their
    inputs (``ValueError`` naming the argument for times outside the schedule's domain) and delegate.

    Attributes:
        t_min: cleanest time of the default grid.
        t_max: noisiest time of the default grid.
        is_variance_preserving: whether ``alpha_t^2 + sigma_t^2 == 1``.
        karras_rho: the exponent of the ``"karras"`` spacing.
        valid_spacings: the names ``timesteps`` accepts.
    """

    t_min: float
    t_max: float
    is_variance_preserving: bool = False
    karras_rho: float = 7.0
    valid_spacings: tuple[str, ...] = CONTINUOUS_SPACINGS

    @property
    @abc.abstractmethod
    def time_domain(self) -> _Interval:
        """The interval of times every method accepts (printed like ``(0, 1]``)."""

    @abc.abstractmethod
    def _log_alpha(self, t: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _log_sigma(self, t: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _sigma(self, t: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _time_from_half_log_snr(self, lam: Tensor) -> Tensor: ...

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t))

    def _half_log_snr(self, t: Tensor) -> Tensor:
        return self._log_alpha(t) - self._log_sigma(t)

    def _grid_variable(self, t: Tensor) -> Tensor:
        """The variable the "uniform" and "quadratic" spacings are uniform in (t itself by default)."""
        return t

    def _time_from_grid_variable(self, u: Tensor) -> Tensor:
        return u

    def _as_time(self, t, name: str = "t") -> Tensor:
        times = _to_float64(t, name)
        outside = _first_true(~self.time_domain.contains(times))
        if outside is not None:
            label = _element_label(name, outside, times.shape)
            value = times.reshape(-1)[outside].item()
            raise ValueError(f"{label}={value!r} is outside the time domain {self.time_domain} of {self!r}")
        return times

    def log_alpha(self, t) -> Tensor:
        """Log of the signal scale, ``log(alpha_t)``.

        Args:
            t: times, a tensor of any shape or a Python number, inside ``time_domain``.

        Returns:
            float64 CPU tensor, the shape of ``t``.

        Raises:
            ValueError: if any time lies outside ``time_domain``.
        """
        return self._log_alpha(self._as_time(t))

    def alpha(self, t) -> Tensor:
        """Signal scale ``alpha_t``.

        Args:
            t: times, a tensor of any shape or a Python number, inside ``time_domain``.

        Returns:
            float64 CPU tensor, the shape of ``t``.

        Raises:
            ValueError: if any time lies outside ``time_domain``.
        """
        return self._alpha(self._as_time(t))

    def sigma(self, t) -> Tensor:
        """Noise scale ``sigma_t``, accurate to rounding even where ``sigma_t << 1``.

        Args:
            t: times, a tensor of any shape or a Python number, inside ``time_domain``.

        Returns:
            float64 CPU tensor, the shape of ``t``.

        Raises:
            ValueError: if any time lies outside ``time_domain``.
        """
        return self._sigma(self._as_time(t))

    def log_sigma(self, t) -> Tensor:
        """Log of the noise scale, ``log(sigma_t)``.

        Args:
            t: times, a tensor of any shape or a Python number, inside ``time_domain``.

        Returns:
            float64 CPU tensor, the shape of ``t``.

        Raises:
            ValueError: if any time lies outside ``time_domain``.
        """
        return self._log_sigma(self._as_time(t))

    def half_log_snr(self, t) -> Tensor:
        """Half log signal-to-noise ratio ``lambda_t = log(alpha_t) - log(sigma_t)``, strictly decreasing in t.

        Args:
            t: times, a tensor of any shape or a Python number, inside ``time_domain``.

        Returns:
            float64 CPU tensor, the shape of ``t`` (``+inf`` where sigma is 0, ``-inf`` where alpha is 0).

        Raises:
            ValueError: if any time lies outside ``time_domain``.
        """
        return self._half_log_snr(self._as_time(t))

    def time_from_half_log_snr(self, lam) -> Tensor:
        """Inverse of ``half_log_snr``: the time at which ``lambda_t == lam``.

        Args:
            lam: half log-SNR values, a tensor of any shape or a Python number.

        Returns:
            float64 CPU tensor of times, the shape of ``lam``.

        Raises:
            ValueError: if ``lam`` is NaN or maps to a time outside ``time_domain``.
        """
        lam = _to_float64(lam, "lam")
        nan_at = _first_true(torch.isnan(lam))
        if nan_at is not None:
            raise ValueError(f"{_element_label('lam', nan_at, lam.shape)} is nan")
        times = self._time_from_half_log_snr(lam)
        outside = _first_true(~self.time_domain.contains(times))
        if outside is not None:
            label = _element_label("lam", outside, lam.shape)
            raise ValueError(
                f"{label}={lam.reshape(-1)[outside].item()!r} maps to t={times.reshape(-1)[outside].item()!r}, "
                f"outside the time domain {self.time_domain} of {self!r}"
            )
        return times

    def model_time(self, t) -> Tensor:
        """The time value the network receives for time ``t`` (here ``t`` itself, as float64).

        Args:
            t: times, a tensor of any shape or a Python number, inside ``time_domain``.

        Returns:
            float64 CPU tensor, the shape of ``t``; callers cast it to what their network expects.

        Raises:
            ValueError: if any time lies outside ``time_domain``.
        """
        return self._as_time(t).clone()

    def timesteps(self, steps: int, spacing: str = "logsnr") -> Tensor:
        """A grid of ``steps + 1`` times from ``t_max`` down to ``t_min``.

        Args:
            steps: number of solver steps, at least 1.
            spacing: one of ``valid_spacings``: ``"uniform"`` (uniform in t), ``"logsnr"`` (uniform in
                lambda), ``"quadratic"`` (uniform in sqrt(t)), ``"karras"`` (uniform in
                ``exp(-lambda / karras_rho)``).

        Returns:
            ``(steps + 1,)`` float64 CPU tensor, strictly decreasing, ``[0] == t_max``, ``[-1] == t_min``.

        Raises:
            ValueError: if ``steps < 1``, ``spacing`` is unknown, the spacing needs a finite lambda at an
                end where it is infinite, or ``steps`` is too large for the grid to stay strictly decreasing.
        """
        steps = validation.count(steps, "steps")
        self._check_spacing(spacing)
        return self._continuous_timesteps(steps, spacing)

    def _check_spacing(self, spacing) -> None:
        if not validation.known(spacing, self.valid_spacings):
            valid = ", ".join(repr(name) for name in self.valid_spacings)
            raise ValueError(f"unknown spacing {spacing!r}; valid spacings are {valid}")

    def _continuous_timesteps(self, steps: int, spacing: str) -> Tensor:
        t_max = torch.tensor(self.t_max, dtype=torch.float64)
        t_min = torch.tensor(self.t_min, dtype=torch.float64)
        if spacing in ("uniform", "quadratic"):
            u_max = self._grid_variable(t_max).item()
            u_min = self._grid_variable(t_min).item()
            if spacing == "uniform":
                u = torch.linspace(u_max, u_min, steps + 1, dtype=torch.float64)
            else:
                u = torch.linspace(math.sqrt(u_max), math.sqrt(u_min), steps + 1, dtype=torch.float64) ** 2
            grid = self._time_from_grid_variable(u)
        else:
            lam_at_t_max = self._half_log_snr(t_max).item()
            lam_at_t_min = self._half_log_snr(t_min).item()
            if not (math.isfinite(lam_at_t_max) and math.isfinite(lam_at_t_min)):
                raise ValueError(
                    f"spacing {spacing!r} needs a finite half_log_snr at t_max and t_min, but {self!r} has "
                    f"half_log_snr(t_max)={lam_at_t_max!r}, half_log_snr(t_min)={lam_at_t_min!r}; "
                    "use spacing 'uniform' or 'quadratic', or move t_max/t_min inside the domain"
                )
            if spacing == "logsnr":
                lam = torch.linspace(lam_at_t_max, lam_at_t_min, steps + 1, dtype=torch.float64)
            else:
                rho = self.karras_rho
                try:
                    ends = math.exp(-lam_at_t_max / rho), math.exp(-lam_at_t_min / rho)
                except OverflowError:
                    ends = (math.inf,)
                if not all(0.0 < e < math.inf for e in ends):
                    raise ValueError(f"spacing 'karras': (sigma/alpha)^(1/rho) at the grid's ends is beyond float64 "
                                     f"with rho={rho!r} (karras_rho) on {self!r}; use a larger rho")
                ramp = torch.linspace(*ends, steps + 1, dtype=torch.float64)
                lam = -rho * torch.log(ramp)
            grid = self._time_from_half_log_snr(lam)
        grid[0] = self.t_max
        grid[-1] = self.t_min
        return self._checked_generated_grid(grid, steps, spacing)

    def _checked_generated_grid(self, grid: Tensor, steps: int, spacing: str) -> Tensor:
        try:
            return self.check_grid(grid)
        except ValueError as error:
            raise ValueError(
                f"steps={steps} with spacing {spacing!r} gives an invalid grid for {self!r}: {error}"
            ) from None

    def _check_signal_at_t_max(self) -> None:
        """Raises naming t_max where alpha underflows to 0 inside the time domain (no signal, no log-SNR)."""
        if float(self.alpha(self.t_max)) == 0.0 and self.t_max < self.time_domain.high:
            raise ValueError(f"t_max={self.t_max!r} is where alpha underflows to 0 (no signal left); choose a smaller "
                             "t_max")

    def check_grid(self, ts) -> Tensor:
        """Validate a user-supplied time grid.

        Args:
            ts: ``(n,)`` floating-point tensor, NumPy array or sequence of numbers, ``n >= 2``, finite,
                strictly decreasing, every entry inside ``time_domain``.

        Returns:
            ``(n,)`` float64 CPU tensor, a copy of ``ts``.

        Raises:
            ValueError: naming the first problem, e.g.
                ``"timesteps must be strictly decreasing; timesteps[3]=0.5 >= timesteps[2]=0.4"``.
        """
        if isinstance(ts, (Tensor, np.ndarray)):
            tensor = torch.as_tensor(ts)
            if not tensor.is_floating_point():
                raise ValueError(f"timesteps must be a floating-point tensor; got dtype {tensor.dtype}")
            grid = tensor.to(device="cpu", dtype=torch.float64, copy=True)
        else:
            try:
                grid = torch.tensor(ts, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"timesteps must be a 1-D sequence of numbers; got {ts!r}") from None
        if grid.dim() != 1:
            raise ValueError(f"timesteps must be 1-D; got shape {tuple(grid.shape)}")
        if grid.numel() < 2:
            raise ValueError(f"timesteps must have at least 2 points; got {grid.numel()}")
        check_decreasing(grid.tolist(), "timesteps")
        outside = _first_true(~self.time_domain.contains(grid))
        if outside is not None:
            raise ValueError(
                f"timesteps[{outside}]={grid[outside].item()!r} is outside the time domain "
                f"{self.time_domain} of {self!r}"
            )
        # Where alpha underflows to 0 before the end of the domain there is no signal and no log-SNR to step in.
        empty = _first_true((self.alpha(grid) == 0) & (grid < self.time_domain.high))
        if empty is not None:
            raise ValueError(f"timesteps[{empty}]={grid[empty].item()!r} is where alpha underflows to 0 in {self!r} "
                             "(no signal left); start the grid at a smaller time")
        return grid


class VPSchedule(NoiseSchedule):
    """A variance-preserving schedule, ``alpha_t^2 + sigma_t^2 == 1``.

    Build one with ``VPSchedule.linear``, ``VPSchedule.cosine``, ``VPSchedule.from_alphas_cumprod`` or
    ``VPSchedule.from_betas`` (from a diffusers scheduler config: :func:`adjointdeis.diffusers.schedule_from_config`).
    """

    is_variance_preserving = True

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def _log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2.0 * self._log_alpha(t)))

    @classmethod
    def linear(
        cls, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0
    ) -> LinearVPSchedule:
        """The continuous linear-beta VP schedule, ``log alpha_t = -(b1 - b0) t^2 / 4 - b0 t / 2``.

        Args:
            beta_min: b0, at least 0.
            beta_max: b1, larger than b0.
            t_min: cleanest grid time, in ``[0, inf)``.
            t_max: noisiest grid time, larger than ``t_min``.

        Returns:
            a ``LinearVPSchedule``; its time domain is ``[0, inf)``.

        Raises:
            ValueError: naming the offending argument.
        """
        return LinearVPSchedule(beta_min=beta_min, beta_max=beta_max, t_min=t_min, t_max=t_max)

    @classmethod
    def cosine(cls, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> CosineVPSchedule:
        """The cosine VP schedule, ``alpha_t = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s))``.

        Args:
            s: the offset, at least 0.
            t_min: cleanest grid time, in ``[0, 1)``.
            t_max: noisiest grid time, in ``[0, 1)`` and larger than ``t_min`` (0.9946 gives lambda ~ -4.78).

        Returns:
            a ``CosineVPSchedule``; its time domain is ``[0, 1)``.

        Raises:
            ValueError: naming the offending argument.
        """
        return CosineVPSchedule(s=s, t_min=t_min, t_max=t_max)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> DiscreteVPSchedule:
        """A discrete (DDPM / diffusers) schedule from its cumulative products of ``1 - beta``.

        Args:
            alphas_cumprod: ``(N,)`` tensor, NumPy array or sequence, ``N >= 2``, values in ``(0, 1]``,
                strictly decreasing.

        Returns:
            a ``DiscreteVPSchedule`` on the training indices ``t`` in ``[0, N - 1]``.

        Raises:
            ValueError: if ``alphas_cumprod`` is not as described.
        """
        return DiscreteVPSchedule(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas) -> DiscreteVPSchedule:
        """A discrete schedule from its betas; ``alphas_cumprod = cumprod(1 - betas)`` in float64.

        Args:
            betas: ``(N,)`` tensor, NumPy array or sequence, ``N >= 2``; ``betas[0]`` in ``[0, 1)``, the
                rest in ``(0, 1)``.

        Returns:
            a ``DiscreteVPSchedule``.

        Raises:
            ValueError: if ``betas`` is not as described.
        """
        betas = _to_float64(betas, "betas")
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be 1-D with at least 2 entries; got shape {tuple(betas.shape)}")
        lower_ok = torch.ones_like(betas, dtype=torch.bool)
        lower_ok[0] = betas[0] >= 0
        lower_ok[1:] = betas[1:] > 0
        bad = _first_true(~(lower_ok & (betas < 1)))
        if bad is not None:
            allowed = "[0, 1)" if bad == 0 else "(0, 1)"
            raise ValueError(f"betas[{bad}] must lie in {allowed}; got betas[{bad}]={betas[bad].item()!r}")
        return DiscreteVPSchedule(torch.cumprod(1.0 - betas, dim=0))


class LinearVPSchedule(VPSchedule):
    """Continuous VP schedule with linear beta(t) = b0 + (b1 - b0) t; see ``VPSchedule.linear``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        beta_min = validation.real(beta_min, "beta_min", 0.0)
        beta_max = validation.real(beta_max, "beta_max")
        if not beta_min < beta_max:
            raise ValueError(
                f"beta_min must be smaller than beta_max; got beta_min={beta_min!r} >= beta_max={beta_max!r}"
            )
        self.beta_min = beta_min
        self.beta_max = beta_max
        self.t_min, self.t_max = _check_time_range(t_min, t_max, self.time_domain)
        self._check_signal_at_t_max()

    @property
    def time_domain(self) -> _Interval:
        return _Interval(0.0, math.inf, True, False)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -t * (0.25 * (self.beta_max - self.beta_min) * t + 0.5 * self.beta_min)

    def _time_from_half_log_snr(self, lam: Tensor) -> Tensor:
        neg_log_alpha = 0.5 * _softplus(-2.0 * lam)
        half_beta_min = 0.5 * self.beta_min
        root = torch.sqrt(half_beta_min**2 + (self.beta_max - self.beta_min) * neg_log_alpha)
        times = 2.0 * neg_log_alpha / (half_beta_min + root)
        times = torch.where(neg_log_alpha == 0, torch.zeros_like(times), times)
        return torch.where(torch.isinf(neg_log_alpha), torch.full_like(times, math.inf), times)

    def __repr__(self) -> str:
        return (
            f"VPSchedule.linear(beta_min={self.beta_min!r}, beta_max={self.beta_max!r}, "
            f"t_min={self.t_min!r}, t_max={self.t_max!r})"
        )


class CosineVPSchedule(VPSchedule):
    """Continuous cosine VP schedule (Nichol & Dhariwal); see ``VPSchedule.cosine``."""

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        s = validation.real(s, "s", 0.0)
        self.s = s
        # The offset angle a = (pi/2) s / (1 + s) and its complement b = (pi/2) / (1 + s): for s > 1, a nears
        # pi/2, so tan(a), cos(a), sin(a) are taken as cot(b), sin(b), cos(b), exact to rounding for every s.
        self._angle_per_time = 0.5 * math.pi / (1.0 + s)
        if s <= 1.0:
            a = 0.5 * math.pi * s / (1.0 + s)
            self._tan_a, self._cos_a, self._sin_a = math.tan(a), math.cos(a), math.sin(a)
        else:
            b = self._angle_per_time
            self._tan_a, self._cos_a, self._sin_a = 1.0 / math.tan(b), math.sin(b), math.cos(b)
        self.t_min, self.t_max = _check_time_range(t_min, t_max, self.time_domain)
        self._check_signal_at_t_max()

    @property
    def time_domain(self) -> _Interval:
        return _Interval(0.0, 1.0, True, False)

    def _log_alpha(self, t: Tensor) -> Tensor:
        # cos(a + d) / cos(a) = 1 - 2 sin^2(d/2) - tan(a) sin(d): no cancellation as t -> 0.
        angle = self._angle_per_time * t
        return torch.log1p(-2.0 * torch.sin(0.5 * angle) ** 2 - self._tan_a * torch.sin(angle))

    def _time_from_half_log_snr(self, lam: Tensor) -> Tensor:
        # With theta = a + d, cos(theta) = alpha cos(a), and sin(d), cos(d) written as sums of
        # positive terms: sin(theta)^2 = sin(a)^2 + cos(a)^2 sigma^2,
        # sin(d) = sigma^2 cos(a)^2 / (sin(theta) cos(a) + cos(theta) sin(a)).
        alpha_sq = torch.sigmoid(2.0 * lam)
        sigma_sq = torch.sigmoid(-2.0 * lam)
        cos_a, sin_a = self._cos_a, self._sin_a
        cos_theta = torch.sqrt(alpha_sq) * cos_a
        sin_theta = torch.sqrt(sin_a**2 + cos_a**2 * sigma_sq)
        sin_d = sigma_sq * cos_a**2 / (sin_theta * cos_a + cos_theta * sin_a)
        cos_d = cos_theta * cos_a + sin_theta * sin_a
        return torch.atan2(sin_d, cos_d) / self._angle_per_time

    def __repr__(self) -> str:
        return f"VPSchedule.cosine(s={self.s!r}, t_min={self.t_min!r}, t_max={self.t_max!r})"


class DiscreteVPSchedule(VPSchedule):
    """A discrete (DDPM) VP schedule given by ``alphas_cumprod`` at the training indices 0..N-1.

    Time is the continuous training index ``t`` in ``[0, N - 1]``. At integer ``n``, ``alpha = sqrt(ac[n])``
    and ``sigma = sqrt(1 - ac[n])`` exactly; in between, lambda is interpolated linearly in t and
    ``alpha = sqrt(sigmoid(2 lambda))``, ``sigma = sqrt(sigmoid(-2 lambda))``. If ``ac[0] == 1`` (lambda
    infinite at 0), ``sigma^2`` is interpolated linearly on ``[0, 1]`` instead.

    Attributes:
        num_train_timesteps: N.
        alphas_cumprod: ``(N,)`` float64.
        valid_spacings: the continuous spacings plus the discrete ``"linspace"``, ``"leading"``, ``"trailing"``.
    """

    valid_spacings = CONTINUOUS_SPACINGS + DISCRETE_SPACINGS

    def __init__(self, alphas_cumprod):
        products = _to_float64(alphas_cumprod, "alphas_cumprod").detach().clone()
        if products.dim() != 1 or products.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be 1-D with at least 2 entries; got shape {tuple(products.shape)}"
            )
        bad = _first_true(~((products > 0) & (products <= 1)))
        if bad is not None:
            raise ValueError(
                f"alphas_cumprod must lie in (0, 1]; got alphas_cumprod[{bad}]={products[bad].item()!r}"
            )
        not_decreasing = _first_true(products[1:] >= products[:-1])
        if not_decreasing is not None:
            i = not_decreasing
            raise ValueError(
                "alphas_cumprod must be strictly decreasing; "
                f"alphas_cumprod[{i + 1}]={products[i + 1].item()!r} >= alphas_cumprod[{i}]={products[i].item()!r}"
            )
        self.alphas_cumprod = products
        self.num_train_timesteps = products.numel()
        self.t_min = 0.0
        self.t_max = float(self.num_train_timesteps - 1)
        self._alpha_table = torch.sqrt(products)
        self._sigma_table = torch.sqrt(1.0 - products)
        self._log_alpha_table = 0.5 * torch.log(products)
        self._log_sigma_table = 0.5 * torch.log1p(-products)
        self._lambda_table = self._log_alpha_table - self._log_sigma_table
        self._first_segment_in_variance = bool(products[0] == 1)

    @property
    def time_domain(self) -> _Interval:
        return _Interval(0.0, self.t_max, True, True)

    def _node_and_segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        nearest = torch.round(t)
        is_node = t == nearest
        node = nearest.long().clamp(0, self.num_train_timesteps - 1)
        left = torch.floor(t).long().clamp(0, self.num_train_timesteps - 2)
        return is_node, node, left, t - left

    def _half_log_snr(self, t: Tensor) -> Tensor:
        is_node, node, left, fraction = self._node_and_segment(t)
        table = self._lambda_table
        between = table[left] + fraction * (table[left + 1] - table[left])
        if self._first_segment_in_variance:
            variance = fraction * self._sigma_table[1] ** 2
            first_segment = 0.5 * (torch.log1p(-variance) - torch.log(variance))
            between = torch.where(left == 0, first_segment, between)
        return torch.where(is_node, table[node], between)

    def _alpha(self, t: Tensor) -> Tensor:
        is_node, node, _, _ = self._node_and_segment(t)
        between = torch.sqrt(torch.sigmoid(2.0 * self._half_log_snr(t)))
        return torch.where(is_node, self._alpha_table[node], between)

    def _sigma(self, t: Tensor) -> Tensor:
        is_node, node, _, _ = self._node_and_segment(t)
        between = torch.sqrt(torch.sigmoid(-2.0 * self._half_log_snr(t)))
        return torch.where(is_node, self._sigma_table[node], between)

    def _log_alpha(self, t: Tensor) -> Tensor:
        is_node, node, _, _ = self._node_and_segment(t)
        between = -0.5 * _softplus(-2.0 * self._half_log_snr(t))
        return torch.where(is_node, self._log_alpha_table[node], between)

    def _log_sigma(self, t: Tensor) -> Tensor:
        is_node, node, _, _ = self._node_and_segment(t)
        between = -0.5 * _softplus(2.0 * self._half_log_snr(t))
        return torch.where(is_node, self._log_sigma_table[node], between)

    def _time_from_half_log_snr(self, lam: Tensor) -> Tensor:
        table = self._lambda_table
        count = self.num_train_timesteps
        entries_above = count - torch.searchsorted(torch.flip(table, [0]), lam, right=True)
        left = (entries_above - 1).clamp(0, count - 2)
        times = left + (lam - table[left]) / (table[left + 1] - table[left])
        if self._first_segment_in_variance:
            first_segment = torch.sigmoid(-2.0 * lam) / self._sigma_table[1] ** 2
            times = torch.where(left == 0, first_segment, times)
        return times.to(torch.float64)

    def timesteps(self, steps: int, spacing: str = "logsnr", *, steps_offset: int = 0) -> Tensor:
        """A grid of ``steps + 1`` times; the discrete spacings give integer model times then 0.

        ``"linspace"``, ``"leading"`` and ``"trailing"`` are the integer timesteps of
        :func:`discrete_timesteps` (those of diffusers' ``DPMSolverMultistepScheduler.set_timesteps(steps)``
        for that ``timestep_spacing`` and ``steps_offset``, which only shifts ``"leading"``), then the
        endpoint ``t = 0``.

        Args:
            steps: number of solver steps, at least 1.
            spacing: one of ``valid_spacings``; the continuous ones are as in ``NoiseSchedule.timesteps``.
            steps_offset: added to the ``"leading"`` timesteps; only allowed with the discrete spacings.

        Returns:
            ``(steps + 1,)`` float64 CPU tensor, strictly decreasing, ending at 0 (the discrete spacings)
            or running from ``t_max`` to ``t_min`` (the continuous ones).

        Raises:
            ValueError: for ``steps < 1``, an unknown spacing, a non-integer or misplaced ``steps_offset``,
                or a ``steps`` for which the discrete grid repeats a timestep or leaves ``[0, N - 1]``.
        """
        steps = validation.count(steps, "steps")
        self._check_spacing(spacing)
        steps_offset = validation.integer(steps_offset, "steps_offset")
        if spacing in CONTINUOUS_SPACINGS:
            if steps_offset != 0:
                raise ValueError(
                    f"steps_offset applies only to the discrete spacings {DISCRETE_SPACINGS}; "
                    f"got steps_offset={steps_offset} with spacing {spacing!r}"
                )
            return self._continuous_timesteps(steps, spacing)
        model_times = discrete_timesteps(spacing, steps, self.num_train_timesteps, steps_offset)
        grid = torch.cat([torch.from_numpy(model_times.astype(np.float64)), torch.zeros(1, dtype=torch.float64)])
        return self._checked_generated_grid(grid, steps, spacing)

    def __repr__(self) -> str:
        return (
            f"VPSchedule.from_alphas_cumprod(<num_train_timesteps={self.num_train_timesteps}, "
            f"alphas_cumprod[0]={self.alphas_cumprod[0].item()!r}, "
            f"alphas_cumprod[-1]={self.alphas_cumprod[-1].item()!r}>)"
        )


MIN_SHIFT = 1e-12
"""The smallest flow shift (and 1 / MIN_SHIFT the largest): a log-SNR offset of at most log(1e12) ~ 27.6, beyond
which float64 grids in the unshifted variable collapse."""


class FlowSchedule(NoiseSchedule):
    """Flow matching / rectified flow: ``alpha_t = 1 - t``, ``sigma_t = t``, time domain ``(0, 1]``.

    ``shift`` s is a log-SNR offset applied to grids: a grid is built in the unshifted variable u and
    mapped by ``t = s u / (1 + (s - 1) u)``, so that ``lambda(t) = lambda(u) - log(s)``. ``t_min`` and
    ``t_max`` are actual (shifted) times, the ends of every grid. ``"uniform"`` and ``"quadratic"`` are
    uniform in ``u = t / (s (1 - t) + t)`` and ``sqrt(u)``; ``"logsnr"`` and ``"karras"`` do not depend on
    s, since a constant lambda offset keeps them uniform. With ``t_max == 1`` (lambda = -inf) only
    ``"uniform"`` and ``"quadratic"`` are possible. The model time is t itself (diffusers' flow models
    take ``1000 t``; the caller scales).

    Attributes:
        shift: the shift s in [1e-12, 1e12] (1 means none).
    """

    def __init__(self, shift: float = 1.0, t_min: float = 1e-3, t_max: float = 1.0 - 1e-3):
        shift = validation.real(shift, "shift", MIN_SHIFT, 1.0 / MIN_SHIFT)
        self.shift = shift
        self.t_min, self.t_max = _check_time_range(t_min, t_max, self.time_domain)
        self._check_signal_at_t_max()

    @property
    def time_domain(self) -> _Interval:
        return _Interval(0.0, 1.0, False, True)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-t)

    def _alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def _sigma(self, t: Tensor) -> Tensor:
        return t.clone()

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def _time_from_half_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-lam)

    def _grid_variable(self, t: Tensor) -> Tensor:
        return t / (self.shift * (1.0 - t) + t)

    def _time_from_grid_variable(self, u: Tensor) -> Tensor:
        return self.shift * u / ((1.0 - u) + self.shift * u)

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift!r}, t_min={self.t_min!r}, t_max={self.t_max!r})"


class EDMSchedule(NoiseSchedule):
    """Variance-exploding EDM schedule: time is sigma, ``alpha_t = 1``, ``sigma_t = t``, ``lambda = -log t``.

    The time domain is ``[0, inf)`` (t = 0 is the clean endpoint); grids run from ``sigma_max`` to
    ``sigma_min``, and ``"karras"`` uses this schedule's ``rho``.

    Attributes:
        sigma_min: ``t_min``.
        sigma_max: ``t_max``.
        rho: exponent of the Karras grid (also ``karras_rho``).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        sigma_min = validation.positive(sigma_min, "sigma_min")
        sigma_max = validation.real(sigma_max, "sigma_max")
        rho = validation.positive(rho, "rho")
        if not sigma_min < sigma_max:
            raise ValueError(
                f"sigma_min must be smaller than sigma_max; got sigma_min={sigma_min!r} >= sigma_max={sigma_max!r}"
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho
        self.karras_rho = rho
        self.t_min = sigma_min
        self.t_max = sigma_max

    @property
    def time_domain(self) -> _Interval:
        return _Interval(0.0, math.inf, True, False)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return t.clone()

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def _time_from_half_log_snr(self, lam: Tensor) -> Tensor:
        return torch.exp(-lam)

    def __repr__(self) -> str:
        return f"EDMSchedule(sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}, rho={self.rho!r})"
