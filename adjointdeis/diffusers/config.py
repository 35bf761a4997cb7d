"""The one translation of diffusers scheduler configs into adjointdeis terms.

A diffusers config (``scheduler.config``, a dict, or the keyword arguments of a scheduler) names its noise
schedule (``beta_schedule``, ``beta_start``, ``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``,
``use_flow_sigmas``, ``flow_shift``, FlowMatch's ``shift``), its prediction (``prediction_type``), its algorithm
(``algorithm_type``, ``solver_type``, ``thresholding``) and its grid.
:class:`~adjointdeis.diffusers.FusedMultistepScheduler`, :func:`~adjointdeis.diffusers.denoise` and
:func:`schedule_from_config` all read them here:

- :func:`detect_family`: which diffusers scheduler a config belongs to (:data:`FAMILIES`);
- :func:`translate`: the sampler a config means in that family (:class:`SchedulerSpec`), validated;
- :func:`grid`: the noise levels and model timesteps of ``set_timesteps``, computed by the family's own
  diffusers scheduler (so every spacing key is diffusers' arithmetic bit for bit) and memoised.

A value that cannot be honoured raises ``ValueError`` naming the key.
"""

import functools
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Number

import diffusers
import numpy as np
import torch
from torch import Tensor

from .. import validation
from ..schedules import DISCRETE_SPACINGS, DiscreteVPSchedule, FlowSchedule, NoiseSchedule, VPSchedule
from ..solvers import SOLVERS, check_solver, resolve_order
from ..thresholding import DynamicThreshold

PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# The Glide cosine schedule of "squaredcos_cap_v2": abar(u) = cos(pi/2 (u + s) / (1 + s))^2, betas capped.
GLIDE_OFFSET = 0.008
GLIDE_MAX_BETA = 0.999
# rescale_betas_zero_snr: diffusers sets the last alphas_cumprod to this instead of 0.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
# algorithm_type -> (our solver, sde).
ALGORITHMS = {"dpmsolver++": ("dpmpp", False), "sde-dpmsolver++": ("dpmpp", True), "dpmsolver": ("dpmsolver", False),
              "sde-dpmsolver": ("dpmsolver", True), "deis": ("deis", False)}
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# The keys only FlowMatch schedulers have (the pipelines read the sequence-length ones to compute mu).
FLOW_MATCH_KEYS = ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "invert_sigmas",
                   "shift_terminal", "stochastic_sampling")
SIGMA_SPACING_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
LEARNED_VARIANCE = ("learned", "learned_range")
# The switches of every family: True or False (diffusers' JSON configs), or absent.
SWITCH_KEYS = (*SIGMA_SPACING_KEYS, "use_flow_sigmas", "use_dynamic_shifting", "rescale_betas_zero_snr",
               "thresholding", "lower_order_final", "euler_at_final", "invert_sigmas", "stochastic_sampling",
               "set_alpha_to_one", "clip_sample")
TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclass(frozen=True)
class Family:
    """A diffusers scheduler this package reproduces, and its config rules.

    Attributes:
        name: the key of :data:`FAMILIES` (stored as the ``family`` config value).
        reference: the diffusers class whose samples it gives.
        flow: grid values are flow times t (alpha = 1 - t, sigma = t) rather than VE levels sigma/alpha.
        algorithms: the ``algorithm_type`` values it accepts, the first the default (None: no algorithm key).
        algorithm_renames: the values diffusers' ``__init__`` stores as another one.
        solver_types, solver_type_renames: likewise for ``solver_type``.
        default_solver: our solver when neither ``solver`` nor ``algorithm_type`` says.
    """

    name: str
    reference: str
    flow: bool
    algorithms: tuple[str | None, ...]
    algorithm_renames: dict = field(default_factory=dict)
    solver_types: tuple[str | None, ...] = ("midpoint", "heun")
    solver_type_renames: dict = field(default_factory=dict)
    default_solver: str | None = None


_DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
FAMILIES = {f.name: f for f in (
    Family("dpmsolver", "DPMSolverMultistepScheduler", False, _DPM_ALGORITHMS, {"deis": "dpmsolver++"},
           ("midpoint", "heun"), {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}),
    Family("deis", "DEISMultistepScheduler", False, ("deis",), {"dpmsolver": "deis", "dpmsolver++": "deis"},
           ("logrho",), {k: "logrho" for k in ("midpoint", "heun", "bh1", "bh2")}),
    Family("flow_euler", "FlowMatchEulerDiscreteScheduler", True, (None, *_DPM_ALGORITHMS),
           solver_types=(None, "midpoint", "heun"), default_solver="ddim"),
    Family("flow_heun", "FlowMatchHeunDiscreteScheduler", True, (None, *_DPM_ALGORITHMS),
           solver_types=(None, "midpoint", "heun"), default_solver="heun"),
)}
# Our scheduler classes' names (saved configs carry them as _class_name) -> family; "FusedMultistepScheduler"
# stores its family as a key.
FUSED_CLASS_FAMILIES = {"FusedDPMSolverMultistepScheduler": "dpmsolver", "FusedDEISMultistepScheduler": "deis",
                        "FusedFlowMatchEulerDiscreteScheduler": "flow_euler",
                        "FusedFlowMatchHeunDiscreteScheduler": "flow_heun"}


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
    if not validation.known(value, PREDICTION_TYPES):
        raise config_error("prediction_type", value, PREDICTION_TYPES)
    return PREDICTION_TYPES[value]


def is_flow_matching(config: Mapping) -> bool:
    """Whether the config describes a flow-matching schedule (alpha = 1 - t, sigma = t)."""
    return bool(config.get("use_flow_sigmas")) or FAMILIES[detect_family(config)].flow


def detect_family(config: Mapping) -> str:
    """The family (:data:`FAMILIES`) of a scheduler config: which diffusers scheduler it belongs to.

    Read from, in order: our ``family`` key; the ``_class_name`` a saved config carries; the keys themselves
    (pass the full ``scheduler.config``: diffusers' own ``from_config`` hides the default-valued ones, this
    does not): FlowMatch keys without betas are FlowMatchEuler's, only ``num_train_timesteps`` and ``shift``
    FlowMatchHeun's; ``algorithm_type="deis"`` DEIS'; anything else (DDPM, DDIM, PNDM, UniPC, Euler, ...)
    DPMSolverMultistep's, as ``DPMSolverMultistepScheduler.from_config`` reads it.

    Raises:
        ValueError naming family for an unknown ``family`` value.
    """
    family = config.get("family")
    if family is not None:
        if not validation.known(family, FAMILIES):
            raise config_error("family", family, FAMILIES)
        return family
    name = config.get("_class_name")
    by_name = {**{f.reference: f.name for f in FAMILIES.values()}, **FUSED_CLASS_FAMILIES}
    if isinstance(name, str) and name in by_name:
        return by_name[name]
    keys = {k for k in config if not k.startswith("_")}
    if "shift" in keys and not keys & {"beta_start", "beta_end", "beta_schedule", "trained_betas"}:
        return "flow_heun" if keys <= {"num_train_timesteps", "shift"} else "flow_euler"
    return "deis" if config.get("algorithm_type") == "deis" else "dpmsolver"


def _num_train_timesteps(config: Mapping) -> int:
    return validation.count(config.get("num_train_timesteps", 1000), "scheduler config: num_train_timesteps", 2)


def _beta_range(config: Mapping) -> tuple[float, float]:
    start = validation.real(config.get("beta_start", 0.0001), "scheduler config: beta_start", 0.0, 1.0,
                            high_open=True)
    end = validation.real(config.get("beta_end", 0.02), "scheduler config: beta_end", 0.0, 1.0, low_open=True,
                          high_open=True)
    return start, end


def _trained_betas(values) -> list[float]:
    """``trained_betas``: a sequence of numbers, the first in [0, 1), the others in (0, 1)."""
    betas = validation.reals(values, "scheduler config: trained_betas")
    if len(betas) < 2:
        raise ValueError(f"scheduler config: trained_betas must hold at least 2 betas; got {len(betas)}")
    bad = next((i for i, b in enumerate(betas) if not (0 <= b < 1 if i == 0 else 0 < b < 1)), None)
    if bad is not None:
        raise ValueError(f"scheduler config: trained_betas[{bad}] must lie in {'[0, 1)' if bad == 0 else '(0, 1)'}; "
                         f"got trained_betas[{bad}]={betas[bad]!r}")
    return list(betas)


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
        return torch.tensor(_trained_betas(trained), dtype=dtype)
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


# Keys of the schedulers whose noise schedule is no VP betas (EDMEuler, EDMDPMSolverMultistep, CosineDPMSolverMultistep,
# CMStochasticIterative, ScoreSdeVe, KarrasVe: variance exploding; DDPMWuerstchen: its own continuous cosine).
NON_VP_KEYS = ("sigma_data", "sigma_schedule", "rho", "sigma_max", "snr", "s_churn", "scaler")
BETA_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")


def vp_schedule(config: Mapping, dtype: torch.dtype = torch.float64) -> DiscreteVPSchedule:
    """The discrete VP schedule of a config, its betas computed in `dtype` (see :func:`betas`).

    Raises:
        ValueError naming the key of a value it cannot honour (rescale_betas_zero_snr among them: a schedule
        reaching zero SNR has no finite half log-SNR at its end), for betas outside (0, 1), or naming a key of a
        scheduler whose schedule is no VP one (:data:`NON_VP_KEYS` in a config without betas keys).
    """
    foreign = [k for k in NON_VP_KEYS if k in config]
    if foreign and not any(k in config for k in BETA_KEYS):
        raise ValueError(f"scheduler config: {foreign[0]} is a key of a scheduler whose noise schedule is not VP "
                         "betas (EDM / variance exploding, such as EDMEulerScheduler), and the config has no betas: "
                         "read with diffusers' default betas it would be another model's schedule; for an EDM "
                         "config use adjointdeis.EDMSchedule(sigma_min, sigma_max, rho)")
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler config: rescale_betas_zero_snr=True ends the schedule at zero SNR, which a "
                         "DiscreteVPSchedule cannot represent (nor the scheduler's alphas_cumprod: 0 at the end, or "
                         "diffusers' 2**-24 there, above the one before); sample through "
                         "FusedMultistepScheduler.from_config(config) or adjointdeis.diffusers.denoise, which take "
                         "the config's own grid")
    count, values = _num_train_timesteps(config), betas(config, dtype)
    if len(values) != count:  # diffusers spaces its timesteps over num_train_timesteps, past the betas' end
        raise ValueError(f"scheduler config: trained_betas has {len(values)} entries but num_train_timesteps is "
                         f"{count}")
    if dtype != torch.float64:
        return VPSchedule.from_alphas_cumprod(alphas_cumprod(config, dtype)[1])
    return VPSchedule.from_betas(values)


def flow_schedule(config: Mapping) -> FlowSchedule:
    """The flow-matching schedule of a config: ``FlowSchedule(flow_shift)`` (or ``shift``, FlowMatch configs).

    Raises:
        ValueError naming the key for a shift that is not a finite number > 0, and for the FlowMatch keys a
        schedule alone cannot honour: ``invert_sigmas`` (the model's time and output sign),
        ``use_dynamic_shifting`` (a shift set by ``mu`` at each call) and ``shift_terminal`` (the grid's end).
    """
    for name in ("invert_sigmas", "use_dynamic_shifting", "shift_terminal"):
        if config.get(name):  # False, None (and shift_terminal 0, as diffusers reads it): off
            raise ValueError(f"scheduler config: {name}={config[name]!r} changes what the pipeline's steps are, "
                             "which a noise schedule alone does not say; sample with "
                             "adjointdeis.diffusers.FusedMultistepScheduler or denoise (they honour it), or build "
                             "FlowSchedule(shift) and the grid yourself")
    key = "flow_shift" if "flow_shift" in config else "shift"
    return FlowSchedule(validation.positive(config.get(key, 1.0), f"scheduler config: {key}"))


def check_values(config: Mapping, family: str) -> None:
    """Checks the numbers of a config where diffusers' own constructor accepts impossible ones (betas outside
    (0, 1), a negative shift), so that they fail when the scheduler is built, naming the key.

    Raises:
        ValueError / TypeError naming the key.
    """
    if FAMILIES[family].flow:
        validation.positive(config.get("shift", 1.0), "scheduler config: shift")
        return
    products = alphas_cumprod(config)[1]   # in float32, as the family's diffusers scheduler keeps them
    if not config.get("rescale_betas_zero_snr", False) and not bool(products[-1] > 0):
        key = "trained_betas" if config.get("trained_betas") is not None else "beta_end"
        raise ValueError(f"scheduler config: {key} drives alphas_cumprod to 0 in float32 before the last training "
                         "timestep (zero SNR, where no step is defined); use smaller betas or "
                         "rescale_betas_zero_snr=True")
    if config.get("use_flow_sigmas", False):
        validation.positive(config.get("flow_shift", 1.0), "scheduler config: flow_shift")


def schedule_from_config(config: Mapping, dtype: torch.dtype = torch.float64) -> NoiseSchedule:
    """Our noise schedule for a diffusers scheduler config: a flow schedule or a discrete VP schedule.

    Args:
        config: ``scheduler.config`` or a dict of its keys (absent keys take diffusers' defaults:
            1000 steps, linear betas from 1e-4 to 0.02).
        dtype: the precision of the VP betas: float64 (default) or float32 (diffusers' own values).

    Returns:
        A :class:`~adjointdeis.FlowSchedule` or a :class:`~adjointdeis.schedules.DiscreteVPSchedule`.

    Raises:
        ValueError naming the key of a value it cannot honour (a switch such as ``use_flow_sigmas`` that is not
        True or False: ArgumentTypeError, a TypeError; FlowMatch's ``invert_sigmas``, ``use_dynamic_shifting`` and
        ``shift_terminal``: see :func:`flow_schedule`), or naming dtype for another dtype.
    """
    validation.instance(config, "config", Mapping, "a diffusers scheduler config (scheduler.config or a dict)")
    if dtype not in (torch.float64, torch.float32):
        error = ValueError if isinstance(dtype, torch.dtype) else validation.ArgumentTypeError
        raise error(f"dtype must be torch.float64 or torch.float32 (the precision of the betas); got {dtype!r}")
    _check_switches_and_levels(config)
    return flow_schedule(config) if is_flow_matching(config) else vp_schedule(config, dtype)


@dataclass(frozen=True)
class SchedulerSpec:
    """What a scheduler config means for our sampler, in one family (see :func:`translate`).

    Attributes:
        family: the key of :data:`FAMILIES`.
        flow: grid values are flow times (alpha = 1 - t, sigma = t), else VE levels sigma/alpha.
        solver, order, sde, second_order: the solver run (a :data:`adjointdeis.solvers.SOLVERS` name).
        prediction: what the model outputs, our name ("eps", "x0", "v", "flow").
        output_sign: -1 where the model's output is the negated prediction (FlowMatch's ``invert_sigmas``).
        threshold: dynamic thresholding of the data prediction, or None.
        lower_order_final, euler_at_final: diffusers' lowered final orders.
        learned_variance: the model output carries a variance in its second half of channels.
        noise_every_step: draw noise on every step (FlowMatch's ``stochastic_sampling`` and the SDE algorithms,
            zero-length steps included, as diffusers: the generator's stream is kept), not only where a row is
            stochastic.
        resolved: the config values as resolved, to store (algorithm_type, solver_type, solver, ...).
    """

    family: str
    flow: bool
    solver: str
    order: int
    sde: bool
    second_order: str
    prediction: str
    output_sign: float
    threshold: DynamicThreshold | None
    lower_order_final: bool
    euler_at_final: bool
    learned_variance: bool
    noise_every_step: bool
    resolved: tuple[tuple[str, object], ...]


def _given(config: Mapping, key: str, default):
    """config[key], or `default` where it is absent or None (a name key: an empty string counts as absent)."""
    value = config.get(key)
    return default if value is None or (isinstance(value, str) and not value) else value


def _resolve(key: str, value, allowed, renames) -> object:
    choices = [v for v in allowed if v is not None] + list(renames)
    if not isinstance(value, (str, type(None), bool, int)):
        raise config_error(key, value, choices)
    value = renames.get(value, value)
    if value not in allowed:
        raise config_error(key, value, choices)
    return value


def _check_switches_and_levels(config: Mapping) -> None:
    """Raises naming the key: a switch (:data:`SWITCH_KEYS`) that is not True or False, or a NaN
    ``lambda_min_clipped``."""
    for key in SWITCH_KEYS:
        value = config.get(key)
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise validation.ArgumentTypeError(f"scheduler config: {key} must be True or False, got {value!r}")
    clip = config.get("lambda_min_clipped")
    if clip is not None and clip != -math.inf:  # -inf: no clipping, the default
        validation.real(clip, "scheduler config: lambda_min_clipped")


def translate(config: Mapping, family: str) -> SchedulerSpec:
    """The sampler a scheduler config means in `family`, validated.

    ``solver`` (ours; None: the family's, or what ``algorithm_type`` says: "dpmpp" for the data-prediction
    DPM-Solver++, "dpmsolver" for the noise prediction, "deis"; "ddim" for FlowMatchEuler, "renoise" with its
    ``stochastic_sampling``, "heun" for FlowMatchHeun) runs at order ``solver_order`` (1 for "ddim" and
    "renoise"), stochastic for the "sde-" algorithms. ``algorithm_type`` and ``solver_type`` follow the family's
    diffusers class, renames included (DPMSolverMultistep stores "deis" as "dpmsolver++", DEIS stores the
    DPM-Solver names as "deis"). ``final_sigmas_type`` None means "sigma_min" for the noise-prediction solvers
    (as DEISMultistepScheduler) and "zero" otherwise.

    Raises:
        ValueError naming the key of a value it cannot honour (prediction_type, algorithm_type, solver_type,
        solver, solver_order, final_sigmas_type, time_shift_type, thresholding's ratio and maximum,
        stochastic_sampling with another solver or with invert_sigmas, a shift_terminal outside (0, 1) (None or 0:
        off), per-family combinations, a NaN lambda_min_clipped; a switch that is not True or False:
        ArgumentTypeError, a TypeError).
    """
    spec_family = FAMILIES[family]
    _check_switches_and_levels(config)
    flow = spec_family.flow or bool(config.get("use_flow_sigmas", False))
    _num_train_timesteps(config)
    if not spec_family.flow:
        alphas_cumprod(config)  # raises naming a betas key it cannot honour
        if not validation.known(config.get("timestep_spacing", "linspace"), DISCRETE_SPACINGS):
            raise config_error("timestep_spacing", config.get("timestep_spacing"), DISCRETE_SPACINGS)
    prediction_type = _given(config, "prediction_type", "flow_prediction" if spec_family.flow else "epsilon")
    if not validation.known(prediction_type, PREDICTION_TYPES):
        raise config_error("prediction_type", prediction_type, PREDICTION_TYPES)
    algorithm_type = _resolve("algorithm_type", _given(config, "algorithm_type", spec_family.algorithms[0]),
                              spec_family.algorithms, spec_family.algorithm_renames)
    solver_type = _resolve("solver_type", _given(config, "solver_type", spec_family.solver_types[0]),
                           spec_family.solver_types, spec_family.solver_type_renames)
    stochastic = bool(config.get("stochastic_sampling", False)) and spec_family.flow
    algorithm_solver, sde = ALGORITHMS[algorithm_type] if algorithm_type else (None, False)
    default_solver = "renoise" if stochastic else (spec_family.default_solver or algorithm_solver)
    solver = _given(config, "solver", default_solver)
    if not validation.known(solver, SOLVERS):
        raise config_error("solver", solver, SOLVERS)
    if stochastic and solver != "renoise":
        raise ValueError(f"scheduler config: stochastic_sampling=True re-noises every step (solver 'renoise'); it "
                         f"cannot run solver {solver!r}")
    if solver == "renoise" and spec_family.flow and config.get("invert_sigmas", False):
        # diffusers re-noises x - sigma v at its inverted (rising) sigmas; our inverted grid runs the flow with the
        # roles of data and noise swapped, where re-noising means another sampler
        raise ValueError("scheduler config: stochastic_sampling=True (solver 'renoise') cannot be combined with "
                         "invert_sigmas=True; set one of them to False")
    entry = check_solver(solver)
    if sde and not entry.sde_orders:
        able = ", ".join(repr(n) for n, e in SOLVERS.items() if e.sde_orders)
        raise ValueError(f"scheduler config: algorithm_type {algorithm_type!r} is stochastic and needs solver {able}, "
                         f"not {solver!r}")
    order = config.get("solver_order", 2) if len(entry.orders) > 1 else entry.default_order
    try:
        order = resolve_order(solver, order, sde)
    except ValueError as error:
        raise ValueError(f"scheduler config: solver_order {config.get('solver_order')!r}: {error}") from None
    # DEISMultistepScheduler ends at its cleanest level whatever runs on its grid
    final = config.get("final_sigmas_type") or ("sigma_min" if family == "deis" or solver in ("deis", "dpmsolver")
                                                else "zero")
    if final not in FINAL_SIGMAS_TYPES:
        raise config_error("final_sigmas_type", final, FINAL_SIGMAS_TYPES)
    terminal = config.get("shift_terminal")
    if spec_family.flow and terminal is not None and not (isinstance(terminal, Number) and terminal == 0):  # 0: off
        validation.real(terminal, "scheduler config: shift_terminal", 0.0, 1.0, low_open=True, high_open=True)
    time_shift = config.get("time_shift_type", "exponential")
    allowed_shifts = TIME_SHIFT_TYPES if spec_family.flow else TIME_SHIFT_TYPES[:1]
    if time_shift not in allowed_shifts:
        raise config_error("time_shift_type", time_shift, allowed_shifts)
    spacing_keys = [k for k in SIGMA_SPACING_KEYS if config.get(k)]
    if len(spacing_keys) > 1:
        raise ValueError(f"scheduler config: only one of {', '.join(SIGMA_SPACING_KEYS)} can be set, got "
                         f"{', '.join(spacing_keys)}")
    if spacing_keys and config.get("use_flow_sigmas") and not spec_family.flow:
        raise ValueError(f"scheduler config: {spacing_keys[0]} cannot be combined with use_flow_sigmas")
    threshold = None
    if config.get("thresholding", False):
        try:
            threshold = DynamicThreshold(config.get("dynamic_thresholding_ratio", 0.995),
                                         config.get("sample_max_value", 1.0))
        except validation.ArgumentTypeError as error:
            raise validation.ArgumentTypeError(f"scheduler config: {error}") from None
        except ValueError as error:
            raise ValueError(f"scheduler config: {error}") from None
    resolved = dict(family=family, solver=solver, algorithm_type=algorithm_type, solver_type=solver_type,
                    prediction_type=prediction_type, final_sigmas_type=final)
    return SchedulerSpec(
        family=family, flow=flow, solver=solver, order=order, sde=sde,
        second_order="heun" if solver_type == "heun" else "midpoint", prediction=PREDICTION_TYPES[prediction_type],
        output_sign=-1.0 if spec_family.flow and config.get("invert_sigmas", False) else 1.0,
        threshold=threshold, lower_order_final=bool(config.get("lower_order_final", True)),
        euler_at_final=bool(config.get("euler_at_final", False)),
        learned_variance=config.get("variance_type") in LEARNED_VARIANCE, noise_every_step=stochastic or sde,
        resolved=tuple(resolved.items()))


@dataclass(frozen=True)
class Grid:
    """The grid of one ``set_timesteps`` call, as the family's diffusers scheduler computes it.

    Attributes:
        levels: N+1 float32 noise levels (VE sigma/alpha, or flow t), noisiest first; the last is where the
            last step lands (0: zero noise). For FlowMatch's ``invert_sigmas``, ``1 - sigma``.
        timesteps: (N,) the model timesteps (int64, or float32 for FlowMatch), as diffusers exposes them.
        sigmas: (N+1,) float32, the ``sigmas`` diffusers exposes (inverted for ``invert_sigmas``).
    """

    levels: tuple[float, ...]
    timesteps: Tensor = field(compare=False)
    sigmas: Tensor = field(compare=False)


@functools.lru_cache(maxsize=None)
def _init_defaults(class_name: str) -> dict:
    """The keyword arguments of a diffusers class's ``__init__`` and their defaults (do not modify)."""
    parameters = list(inspect.signature(getattr(diffusers, class_name).__init__).parameters.values())[1:]
    return {p.name: p.default for p in parameters}


_GRID_KEYS = {
    "dpmsolver": ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  *SIGMA_SPACING_KEYS, "use_flow_sigmas", "flow_shift", "final_sigmas_type", "lambda_min_clipped",
                  "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "use_dynamic_shifting",
                  "time_shift_type"),
    "flow": ("num_train_timesteps", "shift", "use_dynamic_shifting", "invert_sigmas", "shift_terminal",
             "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "time_shift_type"),
}
# The DPM-Solver keys that DEISMultistepScheduler lacks: a DEIS config that sets them takes DPMSolverMultistep's grid.
_DPM_ONLY_GRID_KEYS = ("use_lu_lambdas", "lambda_min_clipped", "rescale_betas_zero_snr", "final_sigmas_type")
# Keys that are no __init__ argument of the grid's diffusers class but that its karras, exponential and beta
# conversions read from its config when present (``hasattr(self.config, "sigma_min")``): diffusers' ``from_config``
# registers them from a config that has them (EulerDiscreteScheduler's, say), so they are registered on the grid's
# scheduler too.
_REGISTERED_GRID_KEYS = ("sigma_min", "sigma_max")


def _grid_source(config: Mapping, family: str, final: str) -> tuple[str, tuple]:
    """(diffusers class name, its keyword arguments as sorted pairs) that computes the family's grids."""
    if FAMILIES[family].flow:
        name, keys = "FlowMatchEulerDiscreteScheduler", _GRID_KEYS["flow"]
    else:
        name, keys = "DPMSolverMultistepScheduler", _GRID_KEYS["dpmsolver"]
        defaults = _init_defaults("DPMSolverMultistepScheduler")
        dpm_only = any(k != "final_sigmas_type" and config.get(k, defaults[k]) != defaults[k]
                       for k in _DPM_ONLY_GRID_KEYS) or final == "zero"
        if family == "deis" and not dpm_only:
            name = "DEISMultistepScheduler"
    accepted = _init_defaults(name)
    values = {k: config[k] for k in keys if k in config and k in accepted}
    for key in _REGISTERED_GRID_KEYS:
        if config.get(key) is not None:
            values[key] = validation.positive(config[key], f"scheduler config: {key}")
    if "final_sigmas_type" in accepted:
        values["final_sigmas_type"] = final
    if values.get("trained_betas") is not None:
        values["trained_betas"] = tuple(np.asarray(values["trained_betas"], dtype=np.float64).tolist())
    return name, tuple(sorted(values.items()))


def _build(name: str, kwargs: tuple):
    """The diffusers scheduler `name` from :func:`_grid_source`'s pairs: its __init__ arguments, then the
    :data:`_REGISTERED_GRID_KEYS` registered to its config (as diffusers' ``from_config`` does)."""
    options = dict(kwargs)
    registered = {k: options.pop(k) for k in _REGISTERED_GRID_KEYS if k in options}
    scheduler = getattr(diffusers, name)(**options)
    if registered:
        scheduler.register_to_config(**registered)
    return scheduler


@functools.lru_cache(maxsize=8)
def _reference(name: str, kwargs: tuple):
    return _build(name, kwargs)


def reference_scheduler(config: Mapping, spec: SchedulerSpec):
    """A new instance of the diffusers scheduler that computes the family's grids (its training-time
    ``betas``, ``alphas_cumprod``, ``sigmas`` and ``timesteps``).

    Raises:
        what that scheduler raises for the config (``ValueError``, ``ImportError`` for beta sigmas without scipy).
    """
    name, kwargs = _grid_source(config, spec.family, dict(spec.resolved)["final_sigmas_type"])
    return _build(name, kwargs)


@functools.lru_cache(maxsize=256)
def _cached_grid(name: str, kwargs: tuple, steps: int | None, timesteps: tuple | None, sigmas: tuple | None,
                 mu: float | None, shift: float | None = None) -> Grid:
    reference = _reference(name, kwargs)
    options = dict(kwargs)
    if mu is not None and name == "DPMSolverMultistepScheduler":
        # DPMSolverMultistep writes exp(mu) into its config for good; a fresh one keeps it to this grid.
        reference = _build(name, kwargs)
    if shift is not None:  # FlowMatchEuler's set_shift: a fresh one, its training sigmas still the config's shift's
        reference = _build(name, kwargs)
        reference.set_shift(shift)
    call = {"num_inference_steps": steps}
    if timesteps is not None:
        call["timesteps"] = list(timesteps)
    if sigmas is not None:
        call["sigmas"] = list(sigmas)
    if mu is not None:
        call["mu"] = mu
    reference.set_timesteps(**call)
    sigma = reference.sigmas.to(torch.float32)
    levels = 1.0 - sigma if options.get("invert_sigmas") else sigma
    return Grid(_without_rounding_rises(levels.tolist()), reference.timesteps.clone(), sigma.clone())


# A level above the one before by at most this relative amount is float32 rounding, not a rise: diffusers' log-SNR
# grid (use_lu_lambdas) on squaredcos_cap_v2 betas ends at exp(log(sigma_min)), an ulp below the sigma_min it then
# appends (final_sigmas_type "sigma_min"), where its other grids repeat sigma_min exactly.
_ROUNDING_RISE = 4 * 2.0**-23


def _without_rounding_rises(levels: list) -> tuple:
    """`levels` with each one that rises above the one before by float32 rounding only set to it (a zero-length
    step, as where diffusers' grids repeat a level)."""
    levels = list(levels)
    for i in range(1, len(levels)):
        if levels[i - 1] < levels[i] <= levels[i - 1] * (1 + _ROUNDING_RISE):
            levels[i] = levels[i - 1]
    return tuple(levels)


def clear_grid_cache() -> None:
    """Forgets the memoised grids (for cold timings; the diffusers schedulers that compute them, one per config,
    stay)."""
    _cached_grid.cache_clear()


def grid(config: Mapping, spec: SchedulerSpec, num_inference_steps: int | None = None, timesteps=None, sigmas=None,
         mu: float | None = None, shift: float | None = None) -> Grid:
    """The grid of ``set_timesteps`` for a config in its family, computed by the family's diffusers scheduler.

    DPMSolverMultistep (DEISMultistep for DEIS configs that set none of the keys it lacks) for VP families and
    FlowMatchEuler for flow families, called as ``set_timesteps(num_inference_steps | timesteps | sigmas, mu)``
    with the arguments the caller checked (FlowMatchHeun's grid is FlowMatchEuler's with the same shift). Where
    diffusers has no such argument (``sigmas=`` for the VP families, ``timesteps=`` for DEIS) the grid is ours:
    :func:`vp_custom_grid`. `shift` is a flow family's shift set by FlowMatchEuler's ``set_shift`` (None: the
    config's). Results are memoised per config and arguments.

    Raises:
        ValueError from diffusers for arguments it rejects, for ``timesteps=`` with ``use_flow_sigmas`` in a VP
        family (diffusers fails there), for a grid with non-finite levels (one step with ``shift_terminal``),
        naming mu for one that is not a finite number (> 0 for the "linear" time shift), and naming sigmas or
        timesteps for a flow family's that are not a non-empty 1-D list of finite numbers.
    """
    final = dict(spec.resolved)["final_sigmas_type"]
    name, kwargs = _grid_source(config, spec.family, final)
    if not FAMILIES[spec.family].flow and sigmas is not None:
        return vp_custom_grid(config, spec, sigmas, final)
    if not FAMILIES[spec.family].flow and spec.flow and timesteps is not None:
        raise ValueError("set_timesteps: timesteps= with use_flow_sigmas=True, a grid diffusers' "
                         "DPMSolverMultistepScheduler cannot compute (it fails there); pass sigmas= (flow times)")
    if name == "DEISMultistepScheduler" and timesteps is not None:
        name, kwargs = _grid_source(config, "dpmsolver", final)  # the same levels; DEIS takes no timesteps=
    if mu is not None:
        linear = config.get("use_dynamic_shifting") and config.get("time_shift_type") == "linear"
        mu = validation.real(mu, "set_timesteps: mu", 0.0 if linear else -math.inf, low_open=True)
    if FAMILIES[spec.family].flow:
        timesteps, sigmas = (_flow_grid_argument(v, k) for k, v in (("timesteps", timesteps), ("sigmas", sigmas)))
    as_tuple = (lambda v: None if v is None else tuple(np.asarray(v.cpu() if isinstance(v, Tensor) else v,
                                                                  dtype=np.float64).reshape(-1).tolist()))
    if shift is not None and (not FAMILIES[spec.family].flow or shift == config.get("shift", 1.0)):
        shift = None
    elif shift is not None:
        shift = validation.positive(shift, "set_shift: shift")
    result = _cached_grid(name, kwargs, num_inference_steps, as_tuple(timesteps), as_tuple(sigmas), mu, shift)
    if not all(math.isfinite(level) for level in result.levels):
        cause = (" (scheduler config: shift_terminal stretches the grid by its last level, 1 on a one-step grid: "
                 "0 / 0)" if FAMILIES[spec.family].flow and config.get("shift_terminal") is not None else "")
        raise ValueError(f"set_timesteps: the grid diffusers computes here has non-finite noise levels "
                         f"{list(result.levels)}{cause}; use more steps or pass sigmas")
    return result


def _flow_grid_argument(values, name: str):
    """FlowMatch's custom `sigmas` or `timesteps` (None, or a non-empty 1-D sequence of finite numbers), as given.

    Raises:
        ValueError naming the argument.
    """
    if values is None:
        return None
    try:
        array = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1 or array.size < 1 or not np.all(np.isfinite(array)):
        shown = values if array is None else array.tolist()
        raise ValueError(f"set_timesteps: {name} must be a non-empty 1-D list of finite numbers, one per step; got "
                         f"{shown!r}")
    return values


def vp_custom_grid(config: Mapping, spec: SchedulerSpec, sigmas, final: str) -> Grid:
    """The grid of N custom noise levels for a VP family (diffusers' DPM-Solver and DEIS take none).

    As every diffusers scheduler that takes ``sigmas=``: the N levels (VE sigma/alpha, or flow t with
    use_flow_sigmas) are the evaluation points and the end is appended per ``final_sigmas_type``; each model
    timestep is the nearest training timestep (VP, interpolating log sigma) or ``int(t N)`` (flow).

    Raises:
        ValueError naming sigmas for values that are not a non-empty 1-D list of finite levels >= 0.
    """
    values = np.asarray(sigmas.cpu() if isinstance(sigmas, Tensor) else sigmas, dtype=np.float64)
    if values.ndim != 1 or values.size < 1 or not np.all(np.isfinite(values)) or values.min() < 0 or (
            spec.flow and values.max() > 1):
        raise ValueError("set_timesteps: sigmas must be a non-empty 1-D list of finite noise levels >= 0"
                         f"{' and <= 1' if spec.flow else ''} (one per step; the end is appended), got "
                         f"{values.tolist()}")
    products = alphas_cumprod(config, torch.float32)[1]
    table = ((1 - products) / products) ** 0.5
    num_train = len(table)
    end = 0.0 if final == "zero" else float(table[0])
    levels = np.concatenate([values, [end]]).astype(np.float32)
    evaluated = levels[:-1].astype(np.float64)
    if spec.flow:
        model_times = (evaluated * num_train).astype(np.int64)
    else:
        log_table = np.log(table.numpy()).astype(np.float64)
        position = np.interp(np.log(np.maximum(evaluated, 1e-10)), log_table, np.arange(num_train, dtype=np.float64))
        model_times = position.round().astype(np.int64)
    return Grid(tuple(levels.tolist()), torch.from_numpy(model_times), torch.from_numpy(levels))
