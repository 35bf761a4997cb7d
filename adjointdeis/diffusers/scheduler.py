"""``FusedMultistepScheduler``: a diffusers scheduler whose every step is one fused adjointdeis kernel.

It reproduces four diffusers schedulers, its *families* (:data:`adjointdeis.diffusers.config.FAMILIES`):
``DPMSolverMultistepScheduler``, ``DEISMultistepScheduler``, ``FlowMatchEulerDiscreteScheduler`` and
``FlowMatchHeunDiscreteScheduler``, with every key of their configs, and reads the configs of the other
diffusers schedulers (DDPM, DDIM, PNDM, UniPC, Euler, ...) as ``DPMSolverMultistepScheduler.from_config``
does. ``from_config`` detects the family; :class:`FusedDPMSolverMultistepScheduler`,
:class:`FusedDEISMultistepScheduler`, :class:`FusedFlowMatchEulerDiscreteScheduler` and
:class:`FusedFlowMatchHeunDiscreteScheduler` are the same scheduler with the family fixed (for a config that
is valid in several families, and to be a drop-in for one class).

The grid of ``set_timesteps`` is computed by the family's own diffusers scheduler
(:func:`adjointdeis.diffusers.config.grid`: diffusers' float32 noise levels and timesteps bit for bit). Per-step
coefficients are one float64 table per grid, computed on the host by :func:`adjointdeis.solvers.build_plan`
and copied once to the sample's device; ``step`` then only picks a row and calls
:func:`adjointdeis.ops.multistep_step` (after dynamic thresholding, with ``thresholding=True``), so it never
waits on the device and autograd flows through it.
"""

import functools
import inspect
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .. import ops, validation
from ..predictions import conversion
from ..solvers import GridPoint, StepPlan, build_plan
from . import config as translation

# Keys that only one kind of family reads; a non-default value in the other kind cannot be honoured.
_FLOW_ONLY_KEYS = ("shift", "invert_sigmas", "shift_terminal", "stochastic_sampling")
_VP_ONLY_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "timestep_spacing", "steps_offset",
                 "rescale_betas_zero_snr", "lambda_min_clipped", "use_lu_lambdas", "flow_shift")


def _given_family(given: Mapping) -> str:
    """The family of a scheduler built from the keys `given` explicitly: ``family``, else DEIS for
    ``algorithm_type="deis"``, FlowMatchEuler when a FlowMatch key is given, DPMSolverMultistep otherwise."""
    if given.get("family") is not None:
        return translation.detect_family({"family": given["family"]})
    if any(k in given for k in translation.FLOW_MATCH_KEYS):
        return "flow_euler"
    return "deis" if given.get("algorithm_type") == "deis" else "dpmsolver"


def _grid_point(level: float, flow: bool) -> GridPoint:
    """(alpha, sigma) of one grid value: flow t (alpha = 1 - t) or a VP level in VE units sigma/alpha."""
    if flow:
        return GridPoint(1.0 - level, level)
    alpha = 1.0 / math.sqrt(1.0 + level * level)
    return GridPoint(alpha, level * alpha)


@functools.lru_cache(maxsize=64)
def _step_table(levels: tuple, spec: translation.SchedulerSpec, start: int) -> tuple[StepPlan, Tensor, tuple | None]:
    """The coefficient rows of the run along `levels` from grid index `start`, with diffusers' order rules.

    Orders warm up from 1 at `start` (the history restarts there); the lowered final orders count all N steps;
    a zero-length step (two equal levels) is the identity and restarts the history. With thresholding the rows
    take the thresholded data prediction as their output, and the third element gives each row's ``(p, q)``
    conversion of the model output to x0. `spec.output_sign` multiplies every q. The plan is immutable, so the
    cache can share it; its rows as a tensor are cached beside it for the steps, which only read them (users
    get ``step_plan``, whose ``coeffs`` is a copy).

    Returns:
        ``(plan, coeffs, x0_rows)``: a :class:`StepPlan` whose ``eval_index`` are global grid indices, its
        (rows, 7) float64 table, and the x0 conversions (None without thresholding).
    """
    points = [_grid_point(level, spec.flow) for level in levels]
    span = points[start:]
    prediction = "x0" if spec.threshold else spec.prediction
    plan = build_plan(span, spec.solver, spec.order, prediction, sde=spec.sde,
                      lower_order_final=spec.lower_order_final, final_order_one=spec.euler_at_final,
                      total_steps=len(levels) - 1, heun_variable="flow" if spec.flow else "rho",
                      second_order=spec.second_order)
    sign = spec.output_sign
    rows = plan.rows if sign == 1.0 or spec.threshold else tuple(row[:6] + (sign * row[6],) for row in plan.rows)
    plan = StepPlan(rows, tuple(start + i for i in plan.eval_index), plan.num_history, plan.noisy, plan.starts_step)
    x0_rows = None
    if spec.threshold:
        x0_rows = tuple((p, sign * q) for p, q in (conversion(spec.prediction, "x0", points[i].alpha, points[i].sigma)
                                                   for i in plan.eval_index))
    return plan, plan.coeffs, x0_rows


class FusedMultistepScheduler(SchedulerMixin, ConfigMixin):
    """DPM-Solver / DEIS / FlowMatch Euler and Heun for diffusers pipelines, one fused kernel per step.

    Swap it into a pipeline with ``pipe.scheduler = FusedMultistepScheduler.from_config(pipe.scheduler.config)``:
    ``from_config`` reads the family from the config (:func:`adjointdeis.diffusers.config.detect_family`) and the
    scheduler gives the samples of that family's diffusers scheduler (to float32 rounding), with the same
    ``timesteps`` and ``sigmas``. Built directly, its family is ``family``, else DEIS for
    ``algorithm_type="deis"``, FlowMatchEuler when a FlowMatch key is given, DPMSolverMultistep otherwise.
    ``solver`` runs another solver on the family's grid (DPM-Solver++ 2M/3M or DEIS on FlowMatchEuler's grid).

    The config is read when the scheduler is built and again at the next ``set_timesteps`` after a
    ``register_to_config``. ``step`` keeps the converted outputs of the last two steps as history on the scheduler
    (``set_timesteps`` clears it), never synchronises with the device (the step index is counted; the
    timestep is looked up once, on the first step, only when no begin index was set), and is
    differentiable in ``model_output``, ``sample`` and ``variance_noise``.

    Where it departs from diffusers: a step computes in the wider of the sample's and the model output's dtypes
    (diffusers upcasts to float32; it returns diffusers' dtype, :meth:`prev_sample_dtype`); a timestep that is not
    the expected one warns (diffusers' step index decides, as in diffusers; a first timestep that is not in
    ``timesteps`` starts at the last step, as DPMSolverMultistep); a zero-length step (a repeated timestep, or a
    karras/exponential/beta/log-SNR grid ending at sigma_min) is the identity and restarts the history (diffusers'
    multistep updates divide by zero there and give NaN); prediction conversions are exact for the grid's (alpha,
    sigma), where diffusers assumes VP for "v_prediction"; the noise-prediction DPM-Solver can land on zero noise
    (diffusers refuses final_sigmas_type "zero" for it); ``set_timesteps(sigmas=)`` exists for every family and
    FlowMatchHeun takes FlowMatchEuler's arguments; with ``mu``, DPMSolverMultistep's ``exp(mu)`` shift holds for
    that grid only (diffusers keeps it in its config).

    Args:
        num_train_timesteps: number of training noise levels N.
        beta_start, beta_end, beta_schedule, trained_betas: the VP betas ("linear", "scaled_linear",
            "squaredcos_cap_v2") or explicit ones.
        solver: our solver (a name of :data:`adjointdeis.solvers.SOLVERS`); None: the family's (see
            :func:`adjointdeis.diffusers.config.translate`).
        solver_order: 1, 2 or 3 (DPM-Solver's noise-prediction SDE: 1 or 2).
        prediction_type: "epsilon", "sample", "v_prediction" or "flow_prediction"; None: "flow_prediction" for the
            FlowMatch families, "epsilon" otherwise.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of the data prediction
            (:class:`adjointdeis.DynamicThreshold`).
        algorithm_type: DPMSolverMultistep's "dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"
            (and "deis", stored as "dpmsolver++"); DEIS' "deis"; None: the family's.
        solver_type: the second-order DPM-Solver update, "midpoint" or "heun" ("logrho" for DEIS); None: the
            family's.
        lower_order_final: with fewer than 15 steps, take the last two at order at most 1 and 2.
        euler_at_final: take the last step at order 1.
        final_sigmas_type: "zero" or "sigma_min" (VP families); None: "sigma_min" for DEIS and the noise-prediction
            DPM-Solver, "zero" otherwise.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas: diffusers' sigma spacings.
        use_flow_sigmas, flow_shift: DPMSolverMultistep's and DEIS' flow-matching grid.
        use_dynamic_shifting, time_shift_type: the shift from ``set_timesteps(mu=)`` ("linear" for FlowMatch only).
        lambda_min_clipped, variance_type, timestep_spacing, steps_offset, rescale_betas_zero_snr: as in
            DPMSolverMultistepScheduler ("learned"/"learned_range": the second half of the channels is dropped).
        shift, base_shift, max_shift, base_image_seq_len, max_image_seq_len, invert_sigmas, shift_terminal,
            stochastic_sampling: as in FlowMatchEulerDiscreteScheduler (the pipelines read the four sequence-length
            keys to compute mu; ``stochastic_sampling`` runs solver "renoise").
        family: "dpmsolver", "deis", "flow_euler" or "flow_heun"; None: see above.

    Raises:
        ValueError naming the config key for a value it cannot honour (unknown beta_schedule, prediction_type,
        solver, algorithm_type, solver_order, a key of another family, ...); ImportError for use_beta_sigmas
        without scipy.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _family: str | None = None

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver: str | None = None,
        solver_order: int = 2,
        prediction_type: str | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str | None = None,
        solver_type: str | None = None,
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        lambda_min_clipped: float = -math.inf,
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        shift: float = 1.0,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        stochastic_sampling: bool = False,
        family: str | None = None,
    ):
        self._defaulted = {}
        self._shift = None  # set_shift's
        self._configure(self._pick_family(family))
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._levels = None
        self._timestep_list = None
        self._plan, self._coeffs, self._x0_rows = None, None, None
        self._full_plan = None
        self._plan_start = 0
        self._device_rows = {}
        self._history = []
        self._step_index = None
        self._begin_index = None

    def _configure(self, family: str) -> None:
        """Translates the config (validated) into the spec, stores the resolved values and the training-time
        ``betas``, ``alphas_cumprod``, ``sigmas`` and ``timesteps``.

        A resolved value that was not given (``_defaulted``) and is still the one stored is resolved again, so
        that a later ``register_to_config(algorithm_type=...)`` means what it means in a fresh scheduler.
        """
        self._check_foreign_keys(family)
        validation.integer(self.config.steps_offset, "scheduler config: steps_offset")
        for key, value in self.config.items():   # diffusers computes with config values as they are
            if isinstance(value, Tensor) and key != "trained_betas":
                raise validation.ArgumentTypeError(f"scheduler config: {key} must be a Python value, not a tensor; "
                                                   f"got {key}={value!r}")
        config = dict(self.config)
        for key, value in self._defaulted.items():
            if config.get(key) == value:
                config[key] = None
        translation.check_values(config, family)
        spec = translation.translate(config, family)
        self._defaulted = {k: v for k, v in spec.resolved if config.get(k) is None}
        self.register_to_config(**dict(spec.resolved))
        self._spec = spec
        self.order = 2 if spec.solver == "heun" else type(self).order
        # The family's diffusers scheduler (a config it rejects fails here) gives the training-time values.
        reference = translation.reference_scheduler(self.config, spec)
        for name in ("betas", "alphas", "alphas_cumprod"):
            if hasattr(reference, name):
                setattr(self, name, getattr(reference, name))
        self.sigmas, self.timesteps = reference.sigmas, reference.timesteps
        self._configured = self._internal_dict   # register_to_config replaces it: a later change is seen

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """A scheduler from a diffusers config, its family detected from the whole config (see the class).

        diffusers' own ``from_config`` passes on only the values a config set explicitly; the family is read
        before that, from every key (and from ``_class_name`` when the config was saved). A path or repository
        id (diffusers' deprecated form of ``from_pretrained``) is read first, so that its ``_class_name`` counts.
        """
        if config is None and "pretrained_model_name_or_path" in kwargs:
            config = kwargs.pop("pretrained_model_name_or_path")
        if config is not None and not isinstance(config, Mapping):
            deprecate("config-passed-as-path", "1.0.0", "It is deprecated to pass a pretrained model name or path "
                      f"to `from_config`. If you were trying to load a scheduler, please use {cls}.from_pretrained"
                      "(...) instead. This functionality will be removed in v1.0.0.", standard_warn=False)
            config, kwargs = cls.load_config(pretrained_model_name_or_path=config, return_unused_kwargs=True, **kwargs)
        if isinstance(config, Mapping) and kwargs.get("family") is None:
            family = cls._family or translation.detect_family({**config, **kwargs})
            hidden = set(config.get("_use_default_values", ()))
            given = {**{k: v for k, v in config.items() if not k.startswith("_") and k not in hidden}, **kwargs}
            # Passed only where it would not be the family anyway (so the config stays diffusers' own).
            if given.get("family") not in (None, family) or (cls._family is None and _given_family(given) != family):
                kwargs["family"] = family
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _pick_family(self, family: str | None) -> str:
        fixed = type(self)._family
        if fixed is not None:
            if family not in (None, fixed):
                raise ValueError(f"{type(self).__name__}: family is {fixed!r}, got family={family!r}")
            return fixed
        hidden = set(self.config.get("_use_default_values", ()))
        return _given_family({k: v for k, v in self.config.items() if k not in hidden})

    def _check_foreign_keys(self, family: str) -> None:
        flow = translation.FAMILIES[family].flow
        defaults = _INIT_DEFAULTS
        for key in _VP_ONLY_KEYS if flow else _FLOW_ONLY_KEYS:
            value = self.config[key]
            if not (value is defaults[key] or (value is not None and np.all(np.asarray(value) == defaults[key]))):
                reference = translation.FAMILIES[family].reference
                raise ValueError(f"scheduler config: {key}={value!r} is not a key of {reference}, whose samples this "
                                 f"scheduler gives (family {family!r}); it cannot be honoured there")

    @property
    def step_index(self) -> int | None:
        """Index of the next step into ``timesteps`` (None until the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step's index, when a pipeline set it with :meth:`set_begin_index`."""
        return self._begin_index

    @property
    def step_plan(self) -> StepPlan | None:
        """The coefficient table of the current grid (None before ``set_timesteps``).

        Rows cover the steps from the index the history (re)started at, ``eval_index`` giving their
        grid indices; row ``[a, b0, b1, b2, c, p, q]`` is what :func:`adjointdeis.ops.multistep_step`
        takes (with thresholding, applied to the thresholded data prediction).
        """
        return self._plan

    @property
    def shift(self) -> float:
        """FlowMatch's shift of the time grid: the last :meth:`set_shift`'s, else the config's ``shift``."""
        return self.config.shift if self._shift is None else self._shift

    def set_shift(self, shift: float) -> None:
        """FlowMatch's ``set_shift``: the shift the next ``set_timesteps`` applies, as
        FlowMatchEulerDiscreteScheduler (ignored with dynamic shifting; the grid's ends stay those of the config's
        shift; kept beside the config, which it does not change).

        Raises:
            ValueError naming shift for one that is not a finite number > 0, or in a DPM-Solver or DEIS family.
        """
        if not translation.FAMILIES[self._spec.family].flow:
            raise ValueError(f"set_shift: shift is not a key of {translation.FAMILIES[self._spec.family].reference}, "
                             f"whose samples this scheduler gives (family {self._spec.family!r})")
        self._shift = validation.positive(shift, "set_shift: shift")

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Sets the index of the first step (pipelines call it before the loop, e.g. for img2img).

        Args:
            begin_index: index into ``timesteps`` of the first ``step`` call, an integer >= 0.
        """
        self._begin_index = validation.integer(begin_index, "begin_index", 0)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      *positional, timesteps: list[int] | list[float] | None = None, sigmas: list[float] | None = None,
                      mu: float | None = None) -> None:
        """Builds the time grid and its coefficient table; clears the history and the step index.

        As the family's diffusers scheduler: DPM-Solver and DEIS take exactly one of `num_inference_steps`,
        `timesteps` or `sigmas`; FlowMatch takes `num_inference_steps`, `sigmas` and `timesteps` as
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` does (FluxPipeline passes N sigmas and mu). Arguments
        after `device` may be given by position in the family's diffusers order: ``(mu, timesteps)`` for
        DPM-Solver and DEIS, ``(sigmas, mu, timesteps)`` for FlowMatch.

        Args:
            num_inference_steps: number of steps N, spaced by the config.
            device: where ``timesteps`` and the coefficient table go (else the table follows the
                sample on its first step).
            timesteps: custom model timesteps, N of them: integers, non-increasing, in [0, num_train_timesteps)
                for the VP families (the last step lands as final_sigmas_type says); FlowMatch's float timesteps.
            sigmas: N custom noise levels, one per step, the end appended (as every diffusers scheduler that
                takes them): VE sigma = sigma_t / alpha_t for VP configs (model timesteps the nearest training
                timestep), t for flow configs (FlowMatch shifts them as FlowMatchEulerDiscreteScheduler does).
            mu: the dynamic shift (``use_dynamic_shifting``): ``exp(mu)`` for DPM-Solver and DEIS; FlowMatch's
                time shift, ignored without dynamic shifting (as FlowMatchEulerDiscreteScheduler).

        Raises:
            ValueError: arguments the family does not take, a custom grid that is not as described, or a
                grid whose noise rises.
        """
        if self._internal_dict is not self._configured:  # register_to_config since: read the config again
            self._configure(self._spec.family)
        config = self.config
        spec = self._spec
        flow_family = translation.FAMILIES[spec.family].flow
        if positional:
            names = ("sigmas", "mu", "timesteps") if flow_family else ("mu", "timesteps")
            if len(positional) > len(names):
                raise TypeError(f"set_timesteps takes at most {2 + len(names)} positional arguments "
                                f"(num_inference_steps, device, {', '.join(names)}), got {2 + len(positional)}")
            given = {"timesteps": timesteps, "sigmas": sigmas, "mu": mu}
            for name, value in zip(names, positional):
                if given[name] is not None:
                    raise TypeError(f"set_timesteps got {name} both by position and by keyword")
                given[name] = value
            timesteps, sigmas, mu = given["timesteps"], given["sigmas"], given["mu"]
        num_train = config.num_train_timesteps
        if not flow_family:
            given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                          ("sigmas", sigmas)) if v is not None]
            if len(given) != 1:
                raise ValueError("set_timesteps: pass exactly one of num_inference_steps, timesteps or sigmas"
                                 f"{'' if not given else f'; got {given}'}")
            spacing_key = next((k for k in translation.SIGMA_SPACING_KEYS if config[k]), None)
            if spacing_key is not None and (timesteps is not None or sigmas is not None):
                raise ValueError(f"set_timesteps: custom {given[0]} cannot be combined with {spacing_key}=True")
            if mu is not None and not config.use_dynamic_shifting:
                raise ValueError("set_timesteps: mu needs use_dynamic_shifting=True")
            if num_inference_steps is not None:
                self._check_steps(num_inference_steps)
            if timesteps is not None:
                timesteps = self._custom_timesteps(timesteps, num_train)
            if len(self.alphas_cumprod) != num_train:
                raise ValueError(f"set_timesteps: trained_betas has {len(self.alphas_cumprod)} entries but "
                                 f"num_train_timesteps is {num_train}")
        elif num_inference_steps is not None:
            self._check_steps(num_inference_steps)
        grid = translation.grid(config, spec, num_inference_steps, timesteps, sigmas, mu, self._shift)
        self._check_grid(grid.levels)
        if spec.flow and max(grid.levels) > 1.0:
            raise ValueError(f"set_timesteps: the grid's noise level {max(grid.levels)!r} exceeds 1 (t > 1, where alpha "
                             "< 0): diffusers' float32 grid overshoots for this shift, or sigma_max is above 1 "
                             "(scheduler config: shift, flow_shift, sigma_max); use a larger shift or pass sigmas")
        device = self._resolve_device(device)
        self._levels = grid.levels
        self.num_inference_steps = len(grid.levels) - 1
        self._full_plan = None
        self._use_plan(0)
        self._full_plan = self._plan
        rows = list(self._plan.eval_index)
        if rows == list(range(self.num_inference_steps)):  # one evaluation per step: diffusers' own arrays
            self.timesteps, self.sigmas = grid.timesteps.to(device=device, copy=True), grid.sigmas.clone()
        else:
            self.timesteps = grid.timesteps[rows].to(device=device)
            self.sigmas = torch.cat([grid.sigmas[rows], grid.sigmas[-1:]])
        self._timestep_list = self.timesteps.cpu().tolist()
        if device is not None:
            self._rows_on(device)
            if flow_family:  # FlowMatch keeps its sigmas on the device (DPM-Solver and DEIS on the CPU)
                self.sigmas = self.sigmas.to(device)
        self._history = []
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: Tensor, timestep: int | float | Tensor, sample: Tensor,
             generator: torch.Generator | None = None, variance_noise: Tensor | None = None,
             return_dict: bool = True, *, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
             s_noise: float = 1.0, per_token_timesteps: Tensor | None = None) -> SchedulerOutput | tuple:
        """One solver step (one row of the table) from ``timesteps[step_index]``, as one fused kernel.

        ``timestep`` is compared with the expected one only when it is a Python number or a CPU tensor (a
        tensor on an accelerator is not read: that would wait for the device); a different one warns and the
        step index decides, as in diffusers.

        Args:
            model_output: (batch, C, ...) the model's output at (sample, timestep); (batch, 2C, ...)
                with a learned variance_type.
            timestep: the current timestep, ``timesteps[step_index]``.
            sample: (batch, C, ...) the current state; the step computes in the wider of its and model_output's
                dtypes.
            generator: draws the noise of stochastic steps (float32 standard normal, as diffusers).
            variance_noise: (batch, C, ...) that noise, instead of drawing it.
            return_dict: return a SchedulerOutput rather than a tuple.
            s_churn, s_tmin, s_tmax, s_noise: FlowMatch's arguments; unused by Euler, as in diffusers
                (FlowMatchHeun's churn, ``s_churn > 0``, is not supported).
            per_token_timesteps: FlowMatchEuler's per-token timesteps: not supported (must be None).

        Returns:
            ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``, prev_sample shaped like sample, in the dtype the
            family's diffusers scheduler returns (:meth:`prev_sample_dtype`).

        Raises:
            ValueError: before set_timesteps, after the last step, for per_token_timesteps or s_churn > 0.
        """
        if per_token_timesteps is not None:
            raise ValueError("FusedMultistepScheduler.step: per_token_timesteps (per-token noise levels) is not "
                             "supported; pass per_token_timesteps=None")
        if s_churn != 0.0 and self._spec.solver == "heun":
            raise ValueError(f"FusedMultistepScheduler.step: s_churn={s_churn!r} (Heun's churn) is not supported; "
                             "pass s_churn=0")
        if self._plan is None:
            raise ValueError("FusedMultistepScheduler.step: call set_timesteps before step")
        validation.floating(sample, "sample", min_dim=1)
        validation.floating(model_output, "model_output", min_dim=1)
        index, looked_up = self._step_index, False
        if index is None:
            looked_up = self._begin_index is None  # then the index comes from the timestep itself
            index = self._init_step_index(timestep)
        if index >= len(self._timestep_list):
            raise ValueError(f"FusedMultistepScheduler.step: all {len(self._timestep_list)} steps are done; "
                             "call set_timesteps to sample again")
        if not looked_up:
            self._check_timestep(index, timestep)
        if self._spec.learned_variance and model_output.shape[1] != sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        validation.shaped(model_output, "model_output", sample.shape, "sample")
        result = self.prev_sample_dtype(sample.dtype, model_output.dtype)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        sample, out = sample.to(dtype), model_output.to(dtype)
        rows = self._device_rows.get(sample.device) or self._rows_on(sample.device)
        coeffs, num_history, noisy = rows[index - self._plan_start]
        if self._x0_rows is not None:
            p, q = self._x0_rows[index - self._plan_start]
            out = self._spec.threshold(p * sample + q * out)
        noise = None
        if noisy:
            if variance_noise is None:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            else:
                noise = validation.shaped(variance_noise, "variance_noise", sample.shape, "sample")
            noise = noise.to(device=sample.device, dtype=sample.dtype)
        history = self._history
        if num_history < len(history):
            history = history[:num_history]
        if any(h.dtype != dtype for h in history):  # the loop changed dtype (a step returned the model's dtype)
            history = [h.to(dtype) for h in history]
        prev_sample, converted = ops.multistep_step(sample, out, history, coeffs, noise)
        self._history = [converted, self._history[0]] if self._history else [converted]
        self._step_index = index + 1
        prev_sample = prev_sample.to(result)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def prev_sample_dtype(self, sample_dtype: torch.dtype, output_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the sample a step returns for a `sample_dtype` sample and an `output_dtype` model output:
        the family's diffusers scheduler's. FlowMatch returns the model output's dtype; DPM-Solver and DEIS that of
        their converted output (the data prediction, or the noise prediction for "dpmsolver" and
        "sde-dpmsolver"), which is the model output's where that conversion is the identity ("dpmsolver++" of a
        "sample" model, "dpmsolver" of an "epsilon" model without thresholding) and otherwise the wider of the
        two (``torch.promote_types``)."""
        if translation.FAMILIES[self._spec.family].flow:
            return output_dtype
        config = self.config
        if self._spec.family == "dpmsolver":
            noise_form = config.algorithm_type in ("dpmsolver", "sde-dpmsolver")
            if (config.prediction_type == "sample" and not noise_form
                    or config.prediction_type == "epsilon" and noise_form and not config.thresholding):
                return output_dtype
        return torch.promote_types(sample_dtype, output_dtype)

    def scale_model_input(self, sample: Tensor, *args, **kwargs) -> Tensor:
        """The model input for `sample`: sample itself (VP and flow models take x_t unscaled)."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha x0 + sigma noise`` at the noise level of each of `timesteps`.

        After set_timesteps the level is that of the grid, as DPMSolverMultistepScheduler: the step
        index when stepping has begun, else the begin index when set, else each timestep looked up
        in ``timesteps``. Before set_timesteps (training), the training level of each timestep
        (flow configs: t = timestep / num_train_timesteps).

        Args:
            original_samples: (batch, ...) clean samples x0.
            noise: (batch, ...) standard normal noise.
            timesteps: (batch,) or scalar timesteps.

        Returns:
            (batch, ...) noisy samples, original_samples' dtype and device.
        """
        device, dtype = original_samples.device, original_samples.dtype
        timesteps = torch.as_tensor(timesteps, device=device).reshape(-1)
        flow = self._spec.flow
        if self._levels is None:
            if flow:
                sigma = timesteps.to(torch.float64) / self.config.num_train_timesteps
                alpha = 1.0 - sigma
            else:
                products = self.alphas_cumprod.to(device=device, dtype=torch.float64)[timesteps.long()]
                alpha, sigma = products.sqrt(), (1.0 - products).sqrt()
        else:
            # after the last step (step index N) the level the run landed on, as diffusers' sigmas[N]
            steps = self._full_plan.eval_index + (len(self._levels) - 1,)
            points = [_grid_point(self._levels[steps[i]], flow) for i in self._noise_indices(timesteps)]
            alpha = torch.tensor([p.alpha for p in points], dtype=torch.float64, device=device)
            sigma = torch.tensor([p.sigma for p in points], dtype=torch.float64, device=device)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        return (alpha.to(dtype).reshape(shape) * original_samples
                + sigma.to(dtype).reshape(shape) * noise)

    def scale_noise(self, sample: Tensor, timestep: float | Tensor, noise: Tensor | None = None) -> Tensor:
        """FlowMatch's forward process ``sigma noise + (1 - sigma) sample`` (img2img and inpainting pipelines).

        sigma is ``sigmas`` at the step index when stepping has begun, else at the begin index when set, else at
        each timestep looked up in ``timesteps`` (as FlowMatchEulerDiscreteScheduler; before ``set_timesteps``, its
        training ``timesteps`` and ``sigmas``).

        Args:
            sample: (batch, ...) clean latents; noise: (batch, ...) standard normal noise.
            timestep: (batch,) or scalar timesteps.

        Returns:
            (batch, ...) noisy latents, sample's dtype.
        """
        timesteps = torch.as_tensor(timestep).reshape(-1)
        sigma = self.sigmas.to(device=sample.device, dtype=sample.dtype)[self._noise_indices(timesteps)]
        sigma = sigma.reshape((-1,) + (1,) * (sample.dim() - 1))
        return sigma * noise + (1.0 - sigma) * sample

    def _noise_indices(self, timesteps: Tensor) -> list[int]:
        if self._begin_index is None:
            table = self.timesteps.tolist() if self._timestep_list is None else None  # before set_timesteps
            return [self.index_for_timestep(t, table) for t in timesteps.tolist()]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.numel()

    def index_for_timestep(self, timestep: int | float | Tensor, schedule_timesteps: list | None = None) -> int:
        """Index of `timestep` in ``timesteps`` (or `schedule_timesteps`; the second one where it repeats, as
        diffusers); when it is not there, the last index (as DPMSolverMultistepScheduler), with a warning naming it.

        Reads `timestep` on the host (a device tensor is synchronised).

        Raises:
            ValueError before set_timesteps (without `schedule_timesteps`).
        """
        table = self._timestep_list if schedule_timesteps is None else schedule_timesteps
        if table is None:
            raise ValueError("FusedMultistepScheduler: call set_timesteps first")
        value = timestep.item() if isinstance(timestep, Tensor) else timestep
        matches = [i for i, t in enumerate(table) if t == value]
        if not matches:
            warnings.warn(f"FusedMultistepScheduler: timestep {value} is not one of this scheduler's timesteps; "
                          f"taking the last one, {table[-1]}, as diffusers does", stacklevel=3)
            return len(table) - 1
        return matches[1] if len(matches) > 1 else matches[0]

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _init_step_index(self, timestep) -> int:
        index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        if not 0 <= index < len(self._timestep_list):
            raise ValueError(f"FusedMultistepScheduler: begin index {index} is outside the "
                             f"{len(self._timestep_list)} steps")
        if not self._full_plan.starts_step[index]:
            raise ValueError(f"FusedMultistepScheduler: step {index} is the second evaluation of a Heun step; "
                             "begin at a step that starts one (an even index)")
        if index != self._plan_start:
            self._use_plan(index)
        self._step_index = index
        return index

    def _check_timestep(self, index: int, timestep) -> None:
        """Warns when a host-readable `timestep` is not ``timesteps[index]``: the step index decides."""
        expected = self._timestep_list[index]
        if isinstance(timestep, Tensor):
            if timestep.device.type != "cpu" or (timestep.item() == expected if timestep.numel() == 1
                                                 else bool((timestep == expected).all())):
                return
        elif timestep == expected:
            return
        value = timestep.tolist() if isinstance(timestep, Tensor) else timestep
        warnings.warn(f"FusedMultistepScheduler.step: step {index} is at timestep {expected}, got timestep {value}; "
                      "stepping from timesteps[step_index] as diffusers does (call set_timesteps to start again)",
                      stacklevel=3)

    def _use_plan(self, row: int) -> None:
        """The table of the run that (re)starts at row `row` of the whole grid's table (its history empty)."""
        start = 0 if self._full_plan is None else self._full_plan.eval_index[row]
        self._plan, self._coeffs, self._x0_rows = _step_table(self._levels, self._spec, start)
        self._plan_start = row
        self._device_rows = {}

    def _rows_on(self, device: torch.device) -> list:
        """Per row, its coefficients on `device` (copied there once per plan), history length and whether it
        draws noise."""
        rows = self._device_rows.get(device)
        if rows is None:
            noisy = [n or self._spec.noise_every_step for n in self._plan.noisy]
            rows = list(zip(self._coeffs.to(device).unbind(0), self._plan.num_history, noisy))
            self._device_rows[device] = rows
        return rows

    @staticmethod
    def _resolve_device(device) -> torch.device | None:
        if device is None:
            return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    @staticmethod
    def _check_steps(steps) -> int:
        return validation.count(steps, "set_timesteps: num_inference_steps")

    @staticmethod
    def _custom_timesteps(timesteps, num_train: int) -> list[int]:
        values = np.asarray(timesteps.cpu() if isinstance(timesteps, Tensor) else timesteps, dtype=np.float64)
        if values.ndim != 1 or values.size < 1:
            raise ValueError(f"set_timesteps: timesteps must be a non-empty 1-D list, got shape {values.shape}")
        if not np.all(values == np.round(values)) or values.min() < 0 or values.max() >= num_train:
            raise ValueError(f"set_timesteps: timesteps must be integers in [0, {num_train}), got {values.tolist()}")
        if np.any(values[1:] > values[:-1]):
            raise ValueError(f"set_timesteps: timesteps must be non-increasing, got {values.tolist()}")
        return values.astype(np.int64).tolist()

    @staticmethod
    def _check_grid(levels: tuple) -> None:
        if 0.0 in levels[:-1]:
            raise ValueError("set_timesteps: only the point the last step lands on may have zero noise")
        rising = [i for i in range(len(levels) - 1) if levels[i + 1] > levels[i]]
        if rising:
            i = rising[0]
            raise ValueError(f"set_timesteps: step {i} would raise the noise from {levels[i]!r} to {levels[i + 1]!r}; "
                             "the grid must be non-increasing")


_INIT_DEFAULTS = {name: p.default for name, p in inspect.signature(FusedMultistepScheduler.__init__).parameters.items()}


class FusedDPMSolverMultistepScheduler(FusedMultistepScheduler):
    """:class:`FusedMultistepScheduler` as ``DPMSolverMultistepScheduler``: every config is read as one of its
    (``algorithm_type="deis"`` is stored as "dpmsolver++", as diffusers does)."""

    _family = "dpmsolver"


class FusedDEISMultistepScheduler(FusedMultistepScheduler):
    """:class:`FusedMultistepScheduler` as ``DEISMultistepScheduler`` (algorithm_type "deis", solver_type
    "logrho"; the DPM-Solver names are stored as those, as diffusers does)."""

    _family = "deis"


class FusedFlowMatchEulerDiscreteScheduler(FusedMultistepScheduler):
    """:class:`FusedMultistepScheduler` as ``FlowMatchEulerDiscreteScheduler`` (FLUX, SD3, Wan, ...)."""

    _family = "flow_euler"


class FusedFlowMatchHeunDiscreteScheduler(FusedMultistepScheduler):
    """:class:`FusedMultistepScheduler` as ``FlowMatchHeunDiscreteScheduler`` (order 2: 2N - 1 timesteps)."""

    _family = "flow_heun"
