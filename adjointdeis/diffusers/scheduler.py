"""``FusedMultistepScheduler``: a diffusers scheduler whose every step is one fused adjointdeis kernel.

It reads the configs of diffusers' DDPM/DDIM/PNDM/DPM-Solver/DEIS/UniPC/Euler schedulers (keys that
only those schedulers know are ignored, as diffusers' ``from_config`` does) and reproduces
``DPMSolverMultistepScheduler`` ("dpmsolver++", "sde-dpmsolver++", solver_type "midpoint") and
``DEISMultistepScheduler`` ("deis", "logrho") step for step. Per-step coefficients are one float64
table per grid, computed on the host by :func:`adjointdeis.solvers.build_plan` in ``set_timesteps``
and copied once to the sample's device; ``step`` then only picks a row and calls
:func:`adjointdeis.ops.multistep_step`, so it never waits on the device and autograd flows through it.

Noise levels follow diffusers' precision: betas, ``alphas_cumprod`` and the grid's ``sigmas`` are the
float32 values diffusers computes from the same config (the model was trained with those), and
each step's coefficients are computed from them in float64.
"""

import functools
import math
import operator

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .. import ops
from ..schedules import DISCRETE_SPACINGS, discrete_timesteps
from ..solvers import SOLVERS, GridPoint, StepPlan, build_plan, check_solver
from .config import (FINAL_SIGMAS_TYPES, PREDICTION_TYPES, algorithm, alphas_cumprod, check_solver_type,
                     config_error)

# The solvers a scheduler step can run: one model evaluation per step.
SOLVER_NAMES = tuple(name for name, entry in SOLVERS.items() if entry.stages == 1)
SIGMA_SPACING_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
_LEARNED_VARIANCE = ("learned", "learned_range")
_KARRAS_RHO = 7.0
_BETA_SIGMAS_SHAPE = 0.6


def _time_of_sigma(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of VE noise levels: linear interpolation in log sigma, clamped."""
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), log_table, np.arange(len(log_table), dtype=np.float64))


def _grid_point(sigma: float, flow: bool) -> GridPoint:
    """(alpha, sigma) of one grid value: flow t (alpha = 1 - t) or a VP level in VE units sigma/alpha."""
    if flow:
        return GridPoint(1.0 - sigma, sigma)
    alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return GridPoint(alpha, sigma * alpha)


@functools.lru_cache(maxsize=64)
def _step_table(grid: tuple, flow: bool, solver: str, order: int, prediction: str, sde: bool,
                lower_order_final: bool, euler_at_final: bool, start: int) -> tuple[StepPlan, Tensor]:
    """The coefficient rows of steps ``start .. N-1`` along `grid`, with diffusers' order rules.

    Orders warm up from 1 at `start` (history restarts there); `lower_order_final` and `euler_at_final`
    lower the last orders as :func:`adjointdeis.solvers.step_orders` says, counting all N steps; the step to
    zero noise is first order. A last step whose two grid values are equal (diffusers'
    karras/exponential/beta grids ending at sigma_min) is the identity. The plan is immutable, so the cache
    can share it; its rows as a tensor are cached beside it for the steps, which only read them (users get
    ``step_plan``, whose ``coeffs`` is a copy).

    Args:
        grid: N+1 float noise levels (see :func:`_grid_point`), strictly decreasing but for the last pair.

    Returns:
        ``(plan, coeffs)``: a :class:`StepPlan` with ``N - start`` rows, ``eval_index`` the global step
        indices, and its (N - start, 7) float64 rows.
    """
    num_steps = len(grid) - 1
    points = [_grid_point(s, flow) for s in grid]
    identity_last = grid[-1] == grid[-2]
    span = points[start:]
    if identity_last:
        span[-1] = GridPoint(1.0, 0.0)
    plan = build_plan(span, solver, order, prediction, sde=sde, lower_order_final=lower_order_final,
                      final_order_one=euler_at_final, total_steps=num_steps)
    rows, num_history = list(plan.rows), list(plan.num_history)
    if identity_last:
        rows[-1] = (1.0, 0.0, 0.0, 0.0, 0.0, *rows[-1][5:])
        num_history[-1] = 0
    plan = StepPlan(tuple(rows), tuple(range(start, num_steps)), tuple(num_history),
                    tuple(row[4] != 0 for row in rows), (True,) * len(rows))
    return plan, plan.coeffs


class FusedMultistepScheduler(SchedulerMixin, ConfigMixin):
    """Multistep DPM-Solver++ / DEIS / DDIM for diffusers pipelines, one fused kernel per step.

    Swap it into a pipeline with ``pipe.scheduler = FusedMultistepScheduler.from_config(pipe.scheduler.config)``.
    With ``solver=None`` the solver follows ``algorithm_type``: a DEIS config gives DEIS, any other
    DPM-Solver++; a DPM-Solver config gives the same samples as ``DPMSolverMultistepScheduler`` and a
    DEIS config those of ``DEISMultistepScheduler`` (to float32 rounding).

    ``step`` keeps the converted outputs of the last two steps as history on the scheduler
    (``set_timesteps`` clears it), never synchronises with the device (the step index is counted; the
    timestep is looked up once, on the first step, only when no begin index was set), and is
    differentiable in ``model_output``, ``sample`` and ``variance_noise``.

    diffusers' ``from_config`` passes on only the values a config set explicitly (a saved config, such
    as a pipeline's on the Hub, sets them all): the config of an in-memory ``DEISMultistepScheduler()``
    leaves algorithm_type at its default, so pass ``solver="deis"`` there.

    Where it departs from diffusers: a step computes in the sample's dtype (DPMSolverMultistep upcasts
    to float32) and returns it; a first timestep that is not in ``timesteps`` raises (diffusers takes
    the last index); a grid that repeats a noise level before its last step raises (diffusers' 1000
    "linspace" steps do, and its multistep updates then divide by zero); a zero-length last step (a
    karras/exponential/beta/log-SNR grid ending at sigma_min) is the identity (diffusers' third-order
    update gives NaN there); prediction conversions are exact for the grid's (alpha, sigma), where
    diffusers assumes VP for "v_prediction" and flow sigmas for "flow_prediction"; with
    use_flow_sigmas and "sigma_min" the last level is DPMSolverMultistep's, for DEIS too (whose flow
    grid ends with a zero-length step).

    Args:
        num_train_timesteps: number of training noise levels N.
        beta_start, beta_end, beta_schedule: the VP betas: "linear", "scaled_linear" or
            "squaredcos_cap_v2" (Glide cosine; beta_start/beta_end unused).
        trained_betas: explicit betas instead of the three above.
        solver: "dpmpp" (DPM-Solver++), "deis" (log-rho DEIS) or "ddim" (order 1, ignores
            solver_order); None: "deis" if algorithm_type is "deis", else "dpmpp".
        solver_order: 1, 2 or 3 (1 or 2 for the SDE).
        prediction_type: "epsilon", "sample", "v_prediction" or "flow_prediction".
        algorithm_type: "dpmsolver++", "sde-dpmsolver++" (stochastic; solver "dpmpp" or "ddim") or
            "deis" (picks the solver when ``solver`` is None). Stored normalised to the solver run.
        solver_type: "midpoint", the only second-order DPM-Solver++ form; the other schedulers'
            names ("logrho", "bh1", "bh2") are accepted and stored as "midpoint".
        lower_order_final: with fewer than 15 steps, take the last two at order at most 1 and 2.
        euler_at_final: take the last step at order 1.
        final_sigmas_type: where the last step lands: "zero" (no noise) or "sigma_min" (the
            cleanest training level); None: "sigma_min" for DEIS (as DEISMultistepScheduler),
            "zero" otherwise. Stored resolved.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas: noise levels
            spaced in sigma^(1/7), log sigma, a Beta(0.6, 0.6) quantile ramp or log-SNR between the
            training extremes, instead of ``timestep_spacing``; at most one.
        use_flow_sigmas: flow matching (alpha = 1 - t, sigma = t), t uniform then shifted by flow_shift.
        flow_shift: the shift s: ``t -> s t / (1 + (s - 1) t)``.
        use_dynamic_shifting, time_shift_type: with a ``mu`` passed to set_timesteps the shift is
            ``exp(mu)`` ("exponential", the only type).
        lambda_min_clipped: leave out the training timesteps whose half log-SNR is below this.
        variance_type: "learned" / "learned_range": the model output carries a variance in its second
            half of channels, which is dropped; other values (DDPM's "fixed_small", ...) change nothing.
        thresholding: dynamic thresholding is not supported (must be False).
        timestep_spacing: "linspace", "leading" (plus steps_offset) or "trailing".
        steps_offset: added to the "leading" timesteps.
        rescale_betas_zero_snr: rescale the betas to zero terminal SNR (the last ``alphas_cumprod``
            is then 2^-24, as diffusers).

    Raises:
        ValueError naming the config key for a value it cannot honour (unknown beta_schedule,
        prediction_type, solver, algorithm_type, solver_order, ...); ImportError for
        use_beta_sigmas without scipy.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

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
        prediction_type: str = "epsilon",
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
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
        thresholding: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise config_error("prediction_type", prediction_type, PREDICTION_TYPES)
        default_solver, sde = algorithm(algorithm_type)
        solver = default_solver if solver is None else solver
        if solver not in SOLVER_NAMES:
            raise config_error("solver", solver, SOLVER_NAMES)
        entry = check_solver(solver)
        if sde and not entry.sde_orders:
            able = " or ".join(repr(name) for name in SOLVER_NAMES if SOLVERS[name].sde_orders)
            raise ValueError(f"FusedMultistepScheduler: algorithm_type 'sde-dpmsolver++' needs solver {able}, "
                             f"not {solver!r}")
        order = solver_order if len(entry.orders) > 1 else entry.default_order   # ddim: order 1 whatever solver_order
        allowed = entry.sde_orders if sde else entry.orders
        if order not in allowed:
            raise ValueError(f"FusedMultistepScheduler: solver_order {solver_order!r} is not available for "
                             f"solver {solver!r}{' with sde-dpmsolver++' if sde else ''}; choose one of "
                             f"{', '.join(map(str, allowed))}")
        check_solver_type(solver_type, solver, order)
        if final_sigmas_type is None:
            final_sigmas_type = "sigma_min" if solver == "deis" else "zero"
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise config_error("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        if timestep_spacing not in DISCRETE_SPACINGS:
            raise config_error("timestep_spacing", timestep_spacing, DISCRETE_SPACINGS)
        if time_shift_type != "exponential":
            raise config_error("time_shift_type", time_shift_type, ("exponential",))
        spacing_keys = [k for k, v in zip(SIGMA_SPACING_KEYS, (use_karras_sigmas, use_exponential_sigmas,
                                                             use_beta_sigmas, use_lu_lambdas)) if v]
        if len(spacing_keys) > 1:
            raise ValueError(f"FusedMultistepScheduler: only one of {', '.join(SIGMA_SPACING_KEYS)} can be set, "
                             f"got {', '.join(spacing_keys)}")
        if spacing_keys and use_flow_sigmas:
            raise ValueError(f"FusedMultistepScheduler: {spacing_keys[0]} cannot be combined with use_flow_sigmas")
        if use_beta_sigmas:
            try:
                import scipy.stats  # noqa: F401
            except ImportError as error:
                raise ImportError("FusedMultistepScheduler: use_beta_sigmas needs scipy") from error
        if thresholding:
            raise ValueError("FusedMultistepScheduler: thresholding=True (dynamic thresholding of x0) is not "
                             "supported; set thresholding=False")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)):
            raise ValueError(f"FusedMultistepScheduler: steps_offset must be an integer, got {steps_offset!r}")

        self.betas, self.alphas_cumprod = alphas_cumprod(self.config, torch.float32)
        algorithm_type = "sde-dpmsolver++" if sde else ("deis" if solver == "deis" else "dpmsolver++")
        self.register_to_config(solver=solver, algorithm_type=algorithm_type, final_sigmas_type=final_sigmas_type,
                                solver_type="midpoint")
        self.alphas = 1.0 - self.betas
        ve_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self._ve_table = ve_sigmas.numpy().astype(np.float64)
        self._log_ve_table = np.log(ve_sigmas.numpy()).astype(np.float64)
        self._solver = solver
        self._order = order
        self._prediction = PREDICTION_TYPES[prediction_type]
        self._sde = sde
        self._flow = use_flow_sigmas
        self._learned_variance = variance_type in _LEARNED_VARIANCE

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(self.alphas_cumprod.numel() - 1, -1, -1, dtype=torch.int64)
        self.sigmas = ve_sigmas
        self._grid = None
        self._timestep_list = None
        self._plan, self._coeffs = None, None
        self._plan_start = 0
        self._device_rows = {}
        self._history = []
        self._step_index = None
        self._begin_index = None

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
        step indices; row ``[a, b0, b1, b2, c, p, q]`` is what :func:`adjointdeis.ops.multistep_step`
        takes, with the model evaluated at ``timesteps[eval_index[row]]``.
        """
        return self._plan

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Sets the index of the first step (pipelines call it before the loop, e.g. for img2img).

        Args:
            begin_index: index into ``timesteps`` of the first ``step`` call.
        """
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None, sigmas: list[float] | None = None,
                      mu: float | None = None) -> None:
        """Builds the time grid and its coefficient table; clears the history and the step index.

        Args:
            num_inference_steps: number of steps N, spaced by the config.
            device: where ``timesteps`` and the coefficient table go (else the table follows the
                sample on its first step).
            timesteps: custom integer model timesteps, non-increasing, in [0, num_train_timesteps);
                the last step lands as final_sigmas_type says.
            sigmas: custom noise levels, N+1 values including where the last step lands (0 or not):
                VE sigma = sigma_t / alpha_t for VP configs, t for flow configs; strictly
                decreasing (the last two may be equal: an identity last step). Model timesteps are
                the nearest training timestep (VP) or ``int(t * num_train_timesteps)`` (flow).
            mu: with use_dynamic_shifting, the flow shift is ``exp(mu)`` for this grid.

        Raises:
            ValueError: not exactly one of num_inference_steps / timesteps / sigmas, a custom grid
                that is not as described, or a grid that repeats a noise level before its last step.
        """
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps, timesteps or sigmas"
                             f"{'' if not given else f'; got {given}'}")
        config = self.config
        spacing_key = next((k for k in SIGMA_SPACING_KEYS if config[k]), None)
        if spacing_key is not None and (timesteps is not None or sigmas is not None):
            raise ValueError(f"set_timesteps: custom {given[0]} cannot be combined with {spacing_key}=True")
        if mu is not None and not config.use_dynamic_shifting:
            raise ValueError("set_timesteps: mu needs use_dynamic_shifting=True")
        shift = math.exp(mu) if mu is not None else config.flow_shift
        num_train = config.num_train_timesteps
        if len(self._ve_table) != num_train:
            raise ValueError(f"set_timesteps: trained_betas has {len(self._ve_table)} entries but "
                             f"num_train_timesteps is {num_train}")

        if sigmas is not None:
            grid, model_times = self._custom_sigmas(sigmas, num_train)
        else:
            if timesteps is not None:
                model_times = self._custom_timesteps(timesteps, num_train)
                level = model_times / num_train if self._flow else self._ve_table[model_times]
            elif self._flow:
                steps = self._check_steps(num_inference_steps)
                ramp = 1.0 - np.linspace(1, 1 / num_train, steps + 1)
                level = np.flip(shift * ramp / (1 + (shift - 1) * ramp))[:-1].copy()
                model_times = (level * num_train).astype(np.int64)
            elif spacing_key is not None:
                level, model_times = self._sigma_spaced(spacing_key, self._check_steps(num_inference_steps))
            else:
                steps = self._check_steps(num_inference_steps)
                model_times = discrete_timesteps(config.timestep_spacing, steps, num_train, config.steps_offset,
                                                 self._last_timestep())
                if model_times.max() >= num_train:
                    raise ValueError(f"set_timesteps: {steps} 'leading' steps with steps_offset "
                                     f"{config.steps_offset} reach timestep {int(model_times.max())}, beyond the "
                                     f"{num_train} training timesteps; use fewer steps")
                level = self._ve_table[model_times]
            final = 0.0 if config.final_sigmas_type == "zero" else self._ve_table[0]
            grid = np.concatenate([level, [final]]).astype(np.float32)
        self._check_grid(grid, model_times)

        device = self._resolve_device(device)
        self.sigmas = torch.from_numpy(grid)
        self.timesteps = torch.from_numpy(np.asarray(model_times, dtype=np.int64)).to(device=device)
        self.num_inference_steps = len(model_times)
        self._grid = tuple(grid.astype(np.float64).tolist())
        self._timestep_list = np.asarray(model_times, dtype=np.int64).tolist()
        self._use_plan(0)
        if device is not None:
            self._rows_on(device)
        self._history = []
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor,
             generator: torch.Generator | None = None, variance_noise: Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One solver step from ``timesteps[step_index]`` to the next noise level, as one fused kernel.

        ``timestep`` is checked against the expected one only when it is a Python number or a CPU
        tensor; a tensor on an accelerator is not read (that would wait for the device), so a wrong
        one goes unnoticed there.

        Args:
            model_output: (batch, C, ...) the model's output at (sample, timestep); (batch, 2C, ...)
                with a learned variance_type.
            timestep: the current timestep, ``timesteps[step_index]``.
            sample: (batch, C, ...) the current state; the step computes in its dtype.
            generator: draws the SDE noise (float32 standard normal, as diffusers).
            variance_noise: (batch, C, ...) SDE noise to use instead of drawing it.
            return_dict: return a SchedulerOutput rather than a tuple.

        Returns:
            ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``, prev_sample shaped and typed like sample.

        Raises:
            ValueError: before set_timesteps, after the last step, or with an unexpected timestep.
        """
        if self._plan is None:
            raise ValueError("FusedMultistepScheduler.step: call set_timesteps before step")
        index = self._step_index
        if index is None:
            index = self._init_step_index(timestep)
        if index >= self.num_inference_steps:
            raise ValueError(f"FusedMultistepScheduler.step: all {self.num_inference_steps} steps are done; "
                             "call set_timesteps to sample again")
        expected = self._timestep_list[index]
        if isinstance(timestep, Tensor):
            if timestep.device.type == "cpu" and (
                    timestep.item() != expected if timestep.numel() == 1 else not bool((timestep == expected).all())):
                self._wrong_timestep(index, timestep)
        elif timestep != expected:
            self._wrong_timestep(index, timestep)
        if self._learned_variance and model_output.shape[1] != sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        noise = None
        if self._sde:
            if variance_noise is None:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            else:
                noise = variance_noise
            noise = noise.to(device=sample.device, dtype=sample.dtype)
        rows = self._device_rows.get(sample.device) or self._rows_on(sample.device)
        coeffs, num_history = rows[index - self._plan_start]
        history = self._history
        if num_history < len(history):
            history = history[:num_history]
        if history and history[0].dtype != sample.dtype:
            history = [h.to(sample.dtype) for h in history]
        prev_sample, converted = ops.multistep_step(sample, model_output, history, coeffs, noise)
        self._history = [converted, self._history[0]] if self._history else [converted]
        self._step_index = index + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

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
            timesteps: (batch,) or scalar integer timesteps.

        Returns:
            (batch, ...) noisy samples, original_samples' dtype and device.

        Raises:
            ValueError when a looked-up timestep is not in ``timesteps``.
        """
        device, dtype = original_samples.device, original_samples.dtype
        timesteps = torch.as_tensor(timesteps, device=device).reshape(-1)
        if self._grid is None:
            if self._flow:
                sigma = timesteps.to(torch.float64) / self.config.num_train_timesteps
                alpha = 1.0 - sigma
            else:
                products = self.alphas_cumprod.to(device=device, dtype=torch.float64)[timesteps.long()]
                alpha, sigma = products.sqrt(), (1.0 - products).sqrt()
        else:
            if self._begin_index is None:
                indices = [self.index_for_timestep(t) for t in timesteps.tolist()]
            else:
                index = self._step_index if self._step_index is not None else self._begin_index
                indices = [index] * timesteps.numel()
            points = [_grid_point(self._grid[i], self._flow) for i in indices]
            alpha = torch.tensor([p.alpha for p in points], dtype=torch.float64, device=device)
            sigma = torch.tensor([p.sigma for p in points], dtype=torch.float64, device=device)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        return (alpha.to(dtype).reshape(shape) * original_samples
                + sigma.to(dtype).reshape(shape) * noise)

    def index_for_timestep(self, timestep: int | float | Tensor) -> int:
        """Index of `timestep` in ``timesteps`` (the second one where it repeats, as diffusers).

        Reads `timestep` on the host (a device tensor is synchronised).

        Raises:
            ValueError before set_timesteps or when `timestep` is not among ``timesteps``.
        """
        if self._timestep_list is None:
            raise ValueError("FusedMultistepScheduler: call set_timesteps first")
        value = timestep.item() if isinstance(timestep, Tensor) else timestep
        matches = [i for i, t in enumerate(self._timestep_list) if t == value]
        if not matches:
            raise ValueError(f"FusedMultistepScheduler: timestep {value} is not one of this scheduler's "
                             f"timesteps {self._timestep_list}")
        return matches[1] if len(matches) > 1 else matches[0]

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _init_step_index(self, timestep) -> int:
        index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        if not 0 <= index < self.num_inference_steps:
            raise ValueError(f"FusedMultistepScheduler: begin index {index} is outside the "
                             f"{self.num_inference_steps} steps")
        if index != self._plan_start:
            self._use_plan(index)
        self._step_index = index
        return index

    def _use_plan(self, start: int) -> None:
        config = self.config
        self._plan, self._coeffs = _step_table(self._grid, self._flow, self._solver, self._order, self._prediction,
                                               self._sde, config.lower_order_final, config.euler_at_final, start)
        self._plan_start = start
        self._device_rows = {}

    def _rows_on(self, device: torch.device) -> list:
        """Per step, its coefficient row on `device` (copied there once per plan) and its history length."""
        rows = self._device_rows.get(device)
        if rows is None:
            rows = list(zip(self._coeffs.to(device).unbind(0), self._plan.num_history))
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

    def _wrong_timestep(self, index: int, timestep) -> None:
        value = timestep.tolist() if isinstance(timestep, Tensor) else timestep
        raise ValueError(f"FusedMultistepScheduler.step: step {index} expects timestep "
                         f"{self._timestep_list[index]}, got {value}; steps must follow scheduler.timesteps "
                         "in order (call set_timesteps to start again)")

    @staticmethod
    def _check_steps(steps) -> int:
        try:
            count = operator.index(steps)
        except TypeError:
            count = None
        if count is None or isinstance(steps, bool) or count < 1:
            raise ValueError(f"set_timesteps: num_inference_steps must be a positive integer, got {steps!r}")
        return count

    def _last_timestep(self) -> int:
        clip = self.config.lambda_min_clipped
        if clip == -math.inf:
            return self.config.num_train_timesteps
        products = self.alphas_cumprod
        half_log_snr = torch.log(products.sqrt()) - torch.log((1 - products).sqrt())
        return self.config.num_train_timesteps - int((half_log_snr < clip).sum())

    def _sigma_spaced(self, key: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """N noise levels between the training extremes spaced as `key` says, and their model timesteps."""
        low, high = float(self._ve_table[0]), float(self._ve_table[-1])
        ramp = np.linspace(0, 1, steps)
        if key == "use_karras_sigmas":
            top, bottom = high ** (1 / _KARRAS_RHO), low ** (1 / _KARRAS_RHO)
            level = (top + ramp * (bottom - top)) ** _KARRAS_RHO
        elif key == "use_lu_lambdas":
            top, bottom = float(self._log_ve_table[-1]), float(self._log_ve_table[0])
            level = np.exp(top + ramp * (bottom - top))
        elif key == "use_exponential_sigmas":
            level = np.exp(np.linspace(math.log(high), math.log(low), steps))
        else:
            import scipy.stats
            quantiles = scipy.stats.beta.ppf(1 - ramp, _BETA_SIGMAS_SHAPE, _BETA_SIGMAS_SHAPE)
            level = low + quantiles * (high - low)
        times = _time_of_sigma(level, self._log_ve_table)
        rounded = key in ("use_karras_sigmas", "use_lu_lambdas") and self.config.beta_schedule != "squaredcos_cap_v2"
        # As diffusers: karras / log-SNR timesteps are rounded, the others truncated.
        model_times = (times.round() if rounded else times).astype(np.int64)
        return level, model_times

    def _custom_timesteps(self, timesteps, num_train: int) -> np.ndarray:
        values = np.asarray(timesteps.cpu() if isinstance(timesteps, Tensor) else timesteps, dtype=np.float64)
        if values.ndim != 1 or values.size < 1:
            raise ValueError(f"set_timesteps: timesteps must be a non-empty 1-D list, got shape {values.shape}")
        if not np.all(values == np.round(values)) or values.min() < 0 or values.max() >= num_train:
            raise ValueError(f"set_timesteps: timesteps must be integers in [0, {num_train}), got {values.tolist()}")
        if np.any(values[1:] > values[:-1]):
            raise ValueError(f"set_timesteps: timesteps must be non-increasing, got {values.tolist()}")
        return values.astype(np.int64)

    def _custom_sigmas(self, sigmas, num_train: int) -> tuple[np.ndarray, np.ndarray]:
        grid = np.asarray(sigmas.cpu() if isinstance(sigmas, Tensor) else sigmas, dtype=np.float64)
        if grid.ndim != 1 or grid.size < 2:
            raise ValueError("set_timesteps: sigmas must be a 1-D list of N+1 noise levels (the last one where "
                             f"the last step lands), got shape {grid.shape}")
        if not np.all(np.isfinite(grid)) or grid.min() < 0 or (self._flow and grid.max() > 1):
            raise ValueError(f"set_timesteps: sigmas must be finite, >= 0{' and <= 1' if self._flow else ''}, "
                             f"got {grid.tolist()}")
        grid = grid.astype(np.float32)
        level = grid[:-1].astype(np.float64)
        if self._flow:
            model_times = (level * num_train).astype(np.int64)
        else:
            model_times = _time_of_sigma(level, self._log_ve_table).round().astype(np.int64)
        return grid, model_times

    @staticmethod
    def _check_grid(grid: np.ndarray, model_times: np.ndarray) -> None:
        if grid[-2] == 0:
            raise ValueError("set_timesteps: only the point the last step lands on may have zero noise")
        repeated = np.nonzero(grid[1:-1] >= grid[:-2])[0]
        if repeated.size:
            i = int(repeated[0])
            raise ValueError(
                f"set_timesteps: steps {i} and {i + 1} (timesteps {int(model_times[i])}, {int(model_times[i + 1])}) "
                f"have noise levels {float(grid[i])!r} <= {float(grid[i + 1])!r}; the grid must be strictly "
                "decreasing: use fewer steps or another spacing")
        if grid[-1] > grid[-2]:
            raise ValueError(f"set_timesteps: the last step would raise the noise from {float(grid[-2])!r} to "
                             f"{float(grid[-1])!r}")
