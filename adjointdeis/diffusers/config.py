"""The one translation of diffusers scheduler configs into adjointdeis terms.

A diffusers config (``scheduler.config``, a dict, or the keyword arguments of a scheduler) names its noise
schedule (``beta_schedule``, ``beta_start``, ``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``,
``use_flow_sigmas``, ``flow_shift``), its prediction (``prediction_type``) and its algorithm
(``algorithm_type``, ``solver_type``). :class:`~adjointdeis.diffusers.FusedMultistepScheduler`,
:func:`~adjointdeis.diffusers.denoise` and :func:`schedule_from_config` all read them here. A value that
cannot be honoured raises ``ValueError`` naming the key.
"""

import math
import operator
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from ..schedules import DiscreteVPSchedule, FlowSchedule, NoiseSchedule, VPSchedule

PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# The Glide cosine schedule of "squaredcos_cap_v2": abar(u) = cos(pi/2 (u + s) / (1 + s))^2, betas capped.
GLIDE_OFFSET = 0.008
GLIDE_MAX_BETA = 0.999
# rescale_betas_zero_snr: diffusers sets the last alphas_cumprod to this instead of 0.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
# algorithm_type -> (our solver, sde) for the algorithms we implement.
ALGORITHMS = {"dpmsolver++": ("dpmpp", False), "sde-dpmsolver++": ("dpmpp", True), "deis": ("deis", False)}
# The noise-prediction DPM-Solver, which is not implemented.
NOISE_PREDICTION_ALGORITHMS = ("dpmsolver", "sde-dpmsolver")
# solver_type: the second-order DPM-Solver++ form is "midpoint"; the other schedulers' names mean the same here.
SOLVER_TYPES = ("midpoint", "logrho", "bh1", "bh2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def config_error(key: str, value, allowed) -> ValueError:
    """The error for a config value outside `allowed`, naming the key and the choices."""
    choices = ", ".join(repr(v) for v in allowed)
    return ValueError(f"scheduler config: unknown {key} {value!r}; choose one of {choices}")


def prediction(config: Mapping) -> str:
    """Our prediction name for the config's ``prediction_type`` (default: "epsilon", "flow_prediction" for flows).

    Raises:
        ValueError naming prediction_type when it is not one of :data:`PREDICTION_TYPES`.
    """
    value = config.get("prediction_type", "flow_prediction" if is_flow_matching(config) else "epsilon")
    if value not in PREDICTION_TYPES:
        raise config_error("prediction_type", value, PREDICTION_TYPES)
    return PREDICTION_TYPES[value]


def algorithm(algorithm_type: str) -> tuple[str, bool]:
    """(our solver, sde) for a diffusers ``algorithm_type``.

    Raises:
        ValueError naming algorithm_type for the noise-prediction DPM-Solver or an unknown algorithm.
    """
    if algorithm_type in NOISE_PREDICTION_ALGORITHMS:
        raise ValueError(f"scheduler config: algorithm_type {algorithm_type!r} (noise-prediction DPM-Solver) is not "
                         "implemented; use 'dpmsolver++' or 'sde-dpmsolver++'")
    if algorithm_type not in ALGORITHMS:
        raise config_error("algorithm_type", algorithm_type, ALGORITHMS)
    return ALGORITHMS[algorithm_type]


def check_solver_type(solver_type: str, solver: str, order: int) -> None:
    """Checks ``solver_type`` against the solver it would shape.

    Raises:
        ValueError naming solver_type for "heun" with second-order DPM-Solver++ (not implemented) or an
        unknown value.
    """
    if solver_type == "heun" and solver == "dpmpp" and order > 1:
        raise ValueError("scheduler config: solver_type 'heun' is not implemented; the second-order DPM-Solver++ "
                         "step is the 'midpoint' form")
    if solver_type not in SOLVER_TYPES + ("heun",):
        raise config_error("solver_type", solver_type, SOLVER_TYPES)


def is_flow_matching(config: Mapping) -> bool:
    """Whether the config describes a flow-matching schedule (alpha = 1 - t, sigma = t)."""
    return bool(config.get("use_flow_sigmas")) or ("shift" in config and "beta_start" not in config)


def _num_train_timesteps(config: Mapping) -> int:
    value = config.get("num_train_timesteps", 1000)
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or isinstance(value, bool) or count < 2:
        raise ValueError(f"scheduler config: num_train_timesteps must be an integer >= 2, got {value!r}")
    return count


def _beta_range(config: Mapping) -> tuple[float, float]:
    values = []
    for key, default, low_closed in (("beta_start", 0.0001, True), ("beta_end", 0.02, False)):
        value = config.get(key, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not (0 <= number < 1 if low_closed else 0 < number < 1):
            raise ValueError(f"scheduler config: {key} must lie in {'[0, 1)' if low_closed else '(0, 1)'}, "
                             f"got {key}={value!r}")
        values.append(number)
    return values[0], values[1]


def betas(config: Mapping, dtype: torch.dtype = torch.float64) -> Tensor:
    """The (N,) training betas of a VP config, computed as diffusers computes them, in `dtype`.

    ``trained_betas`` when given; else ``"linear"``: linspace(beta_start, beta_end, N); ``"scaled_linear"``:
    linspace of the square roots, squared; ``"squaredcos_cap_v2"``: the Glide cosine
    ``min(1 - abar((n+1)/N) / abar(n/N), 0.999)`` in float64, then rounded. diffusers works in float32 (pass
    ``dtype=torch.float32`` for its exact values; float64 is what the model's schedule was meant to be).
    ``rescale_betas_zero_snr`` is not applied here (see :func:`alphas_cumprod`).

    Raises:
        ValueError naming the key: num_train_timesteps, beta_schedule, beta_start or beta_end.
    """
    count = _num_train_timesteps(config)
    trained = config.get("trained_betas")
    if trained is not None:
        return torch.tensor(np.asarray(trained), dtype=dtype)
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(u):
            return math.cos((u + GLIDE_OFFSET) / (1 + GLIDE_OFFSET) * math.pi / 2) ** 2
        values = [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), GLIDE_MAX_BETA) for i in range(count)]
        return torch.tensor(values, dtype=dtype)
    if beta_schedule not in BETA_SCHEDULES:
        raise config_error("beta_schedule", beta_schedule, BETA_SCHEDULES)
    start, end = _beta_range(config)
    if beta_schedule == "linear":
        return torch.linspace(start, end, count, dtype=dtype)
    return torch.linspace(start**0.5, end**0.5, count, dtype=dtype) ** 2


def zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas rescaled so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1), same dtype."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(config: Mapping, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(betas, alphas_cumprod) of a VP config in `dtype`, with ``rescale_betas_zero_snr`` applied as diffusers does.

    Raises:
        ValueError naming the key of a value it cannot honour.
    """
    values = betas(config, dtype)
    if config.get("rescale_betas_zero_snr", False):
        values = zero_terminal_snr(values)
    products = torch.cumprod(1.0 - values, dim=0)
    if config.get("rescale_betas_zero_snr", False):
        products[-1] = ZERO_SNR_ALPHA_CUMPROD
    return values, products


def vp_schedule(config: Mapping, dtype: torch.dtype = torch.float64) -> DiscreteVPSchedule:
    """The discrete VP schedule of a config, its betas computed in `dtype` (see :func:`betas`).

    Raises:
        ValueError naming the key of a value it cannot honour (rescale_betas_zero_snr among them: a schedule
        reaching zero SNR has no finite half log-SNR at its end), or for betas outside (0, 1).
    """
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler config: rescale_betas_zero_snr=True ends the schedule at zero SNR, which a "
                         "DiscreteVPSchedule cannot represent; build it from the scheduler's alphas_cumprod")
    if dtype != torch.float64:
        return VPSchedule.from_alphas_cumprod(alphas_cumprod(config, dtype)[1])
    return VPSchedule.from_betas(betas(config, dtype))


def flow_schedule(config: Mapping) -> FlowSchedule:
    """The flow-matching schedule of a config: ``FlowSchedule(flow_shift)`` (or ``shift``, FlowMatch configs)."""
    return FlowSchedule(config.get("flow_shift", config.get("shift", 1.0)))


def schedule_from_config(config: Mapping, dtype: torch.dtype = torch.float64) -> NoiseSchedule:
    """Our noise schedule for a diffusers scheduler config: a flow schedule or a discrete VP schedule.

    Args:
        config: ``scheduler.config`` or a dict of its keys (absent keys take diffusers' defaults:
            1000 steps, linear betas from 1e-4 to 0.02).
        dtype: the precision of the VP betas: float64 (default) or float32 (diffusers' own values).

    Returns:
        A :class:`~adjointdeis.FlowSchedule` or a :class:`~adjointdeis.schedules.DiscreteVPSchedule`.

    Raises:
        ValueError naming the key of a value it cannot honour.
    """
    return flow_schedule(config) if is_flow_matching(config) else vp_schedule(config, dtype)
