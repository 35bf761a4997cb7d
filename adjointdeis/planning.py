"""Planning and running a sampling call: the time grid, its coefficient table and the run loop.

:func:`plan_sampling` builds everything a run needs besides tensors, once per call, on the host in
float64: the grid (docs/math.md section 3), its (alpha, sigma) points, the model times and the solver's
coefficient table (section 4). The result, a :class:`SamplingPlan`, is plain immutable data, so
``torch.compile`` treats it as a constant. :func:`run_plan` runs a plan from x_T, one fused
:func:`adjointdeis.ops.multistep_step` per model evaluation, without syncing the host; a ``callback``
sees every evaluation (:class:`StepInfo`).
"""

import math
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import ops, validation
from .models import evaluate_model
from .predictions import conversion
from .reference import opmath_dtype
from .schedules import FlowSchedule, NoiseSchedule
from .solvers import GridPoint, StepPlan, build_plan, resolve_order
from .thresholding import DynamicThreshold

DEFAULT_STEPS = 20


@dataclass(frozen=True)
class SolverSettings:
    """The solver of a run, as :func:`adjointdeis.sample` takes it (order resolved)."""

    solver: str
    order: int
    prediction: str
    sde: bool = False
    lower_order_final: bool = True
    third_order: str = "published"
    second_order: str = "midpoint"
    threshold: DynamicThreshold | None = None
    euler_at_final: bool = False


@dataclass(frozen=True)
class SamplingPlan:
    """A sampling run without its tensors: grid, points, model times and coefficient table.

    Attributes:
        times: (N+1,) schedule times of the grid, noisiest first (the last unused when denoising to zero).
        points: (N+1,) grid points; the last is (1, 0) when denoising to zero.
        model_times: (N+1,) the model time of every grid time.
        steps: the coefficient table, one row per model evaluation.
        t_eval: the model time of every row's evaluation.
        settings: the solver that made `steps`.
        x0_rows: with thresholding, per row the ``(p, q)`` of the model output's conversion to x0; the rows of
            `steps` then take the thresholded x0 as their output (see :func:`row_output`).
    """

    times: tuple[float, ...]
    points: tuple[GridPoint, ...]
    model_times: tuple[float, ...]
    steps: StepPlan
    t_eval: tuple[float, ...]
    settings: SolverSettings
    x0_rows: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class AdjointGrid:
    """The grid AdjointDEIS integrates on (noisiest first) and, when it is not the sampling grid and the
    states are recorded, the plan whose forward run records them."""

    points: tuple[GridPoint, ...]
    model_times: tuple[float, ...]
    forward: SamplingPlan | None = None


@dataclass(frozen=True)
class StepInfo:
    """What :func:`run_plan` reports to its callback after each model evaluation.

    Attributes:
        row: index of the evaluation in the plan.
        step: grid index of the evaluation time (the step it belongs to).
        starts_step: False for a corrector evaluation inside a step (Heun's second evaluation).
        t: 0-d model time of the evaluation.
        x: (batch, *shape) the state the model was evaluated at.
        output: (batch, *shape) the model's output there (guided).
        converted: (batch, *shape) the output converted to the solver's quantity (x0 or eps).
        x_next: (batch, *shape) the state after the row's update.
    """

    row: int
    step: int
    starts_step: bool
    t: Tensor
    x: Tensor
    output: Tensor
    converted: Tensor
    x_next: Tensor


def heun_variable(sched: NoiseSchedule) -> str:
    """Heun integrates a flow schedule's own ODE ``dx/dt = eps - x0`` (as the rectified-flow papers and
    diffusers' ``FlowMatchHeunDiscreteScheduler``), every other schedule in EDM's ``(x/alpha, sigma/alpha)``."""
    return "flow" if isinstance(sched, FlowSchedule) else "rho"


def resolve_grid(sched: NoiseSchedule, steps: int | None, timesteps, denoise_to_zero: bool | None
                 ) -> tuple[int, tuple[float, ...] | None, bool]:
    """What a sample call's `steps`, `timesteps` and `denoise_to_zero` mean: (steps, grid, denoise_to_zero).

    Without `timesteps`: `steps` steps (default 20) spaced by the call's spacing. With `timesteps` of
    ``steps + 1`` values (or `steps` omitted): that grid. With exactly `steps` values: diffusers' convention,
    the model timesteps of the N steps with the end implied: zero noise (`denoise_to_zero` defaults to True), or
    with ``denoise_to_zero=False`` the schedule's cleanest time ``t_min`` (diffusers' ``final_sigmas_type=
    "sigma_min"``; a last timestep already there makes the last step the identity).

    Raises:
        ValueError naming `timesteps` when its length is neither `steps` nor ``steps + 1``.
    """
    if steps is not None:
        steps = validation.count(steps, "steps")
    if timesteps is None:
        return (DEFAULT_STEPS if steps is None else steps), None, bool(denoise_to_zero)
    values = validation.reals(timesteps, "timesteps")
    if steps is None or steps == len(values) - 1:
        return len(values) - 1, values, bool(denoise_to_zero)
    if steps == len(values):
        end = min(float(sched.t_min), values[-1])
        return steps, values + (end,), True if denoise_to_zero is None else bool(denoise_to_zero)
    raise ValueError(f"timesteps has {len(values)} values for steps={steps}: pass steps + 1 values (the whole grid, "
                     "noisiest first, ending where the last step lands) or steps values (diffusers' convention: "
                     "the model timesteps of the steps, the end implied)")


def sampling_grid(sched: NoiseSchedule, steps: int, spacing: str = "logsnr",
                  timesteps: Tensor | None = None, denoise_to_zero: bool = False) -> tuple[Tensor, list[GridPoint]]:
    """The time grid of a sampling run and its (alpha, sigma) points.

    Args:
        sched: the noise schedule.
        steps: number of steps N (ignored when `timesteps` is given).
        spacing: grid spacing for ``sched.timesteps``.
        timesteps: optional explicit grid, (N+1,) strictly decreasing, noisiest first; its last two
            entries may be equal (a zero-length last step, the identity; or, denoising to zero, an unused end).
        denoise_to_zero: replace the grid's last point by zero noise (alpha=1, sigma=0),
            as diffusers' ``final_sigmas_type="zero"``.

    Returns:
        ``(ts, points)``: ts (N+1,) float64 times (its last entry unused when denoising to
        zero), points the N+1 grid points.

    Raises:
        ValueError for a bad step count, spacing or grid.
    """
    if timesteps is None:
        ts = sched.timesteps(steps, spacing)
    elif len(timesteps) > 2 and timesteps[-1] == timesteps[-2]:
        ts = sched.check_grid(timesteps[:-1])
        ts = torch.cat([ts, ts[-1:]])
    else:
        ts = sched.check_grid(timesteps)
    alphas, sigmas = sched.alpha(ts).tolist(), sched.sigma(ts).tolist()
    points = [GridPoint(a, s) for a, s in zip(alphas, sigmas)]
    if denoise_to_zero:
        points[-1] = GridPoint(1.0, 0.0)
    return ts, points


def _plan_on_grid(sched: NoiseSchedule, ts: Tensor, points: list[GridPoint], settings: SolverSettings) -> SamplingPlan:
    threshold = settings.threshold
    steps = build_plan(points, settings.solver, settings.order, "x0" if threshold else settings.prediction,
                       sde=settings.sde, lower_order_final=settings.lower_order_final,
                       third_order=settings.third_order, heun_variable=heun_variable(sched),
                       second_order=settings.second_order, final_order_one=settings.euler_at_final)
    x0_rows = None
    if threshold is not None:
        x0_rows = tuple(conversion(settings.prediction, "x0", points[i].alpha, points[i].sigma)
                        for i in steps.eval_index)
    model_times = tuple(sched.model_time(ts).tolist())
    return SamplingPlan(tuple(ts.tolist()), tuple(points), model_times, steps,
                        tuple(model_times[i] for i in steps.eval_index), settings, x0_rows)


@torch.compiler.assume_constant_result
def plan_sampling(sched: NoiseSchedule, steps: int, spacing: str, timesteps: tuple[float, ...] | None,
                  denoise_to_zero: bool, solver: str, order: int | None, prediction: str, sde: bool = False,
                  lower_order_final: bool = True, third_order: str = "published", second_order: str = "midpoint",
                  threshold: DynamicThreshold | None = None, euler_at_final: bool = False) -> SamplingPlan:
    """The plan of one sampling run (a constant for ``torch.compile``).

    Args:
        sched, steps, spacing, denoise_to_zero: as for :func:`sampling_grid`.
        timesteps: an explicit (N+1,) grid as a tuple of floats, or None.
        solver, order, prediction, sde, lower_order_final, third_order, second_order, threshold,
            euler_at_final: as for :func:`adjointdeis.sample`.

    Returns:
        The :class:`SamplingPlan`.

    Raises:
        ValueError naming the bad argument (solver, order, sde, steps, spacing, timesteps, ...).
    """
    order = resolve_order(solver, order, sde)   # before the cache: 2.0 or True would hit order 2's or 1's plan
    key = None
    if not torch.compiler.is_compiling():
        try:
            key = (schedule_key(sched), steps, spacing, timesteps, denoise_to_zero, solver, order, prediction, sde,
                   lower_order_final, third_order, second_order, threshold, euler_at_final)
            plan = _PLANS.get(key)
        except TypeError:  # a schedule (subclass) holding something unhashable is planned anew every call
            key = plan = None
        if plan is not None:
            return plan
    settings = SolverSettings(solver, order, prediction, sde, lower_order_final,
                              third_order, second_order, threshold, euler_at_final)
    grid = None if timesteps is None else torch.tensor(timesteps, dtype=torch.float64)
    ts, points = sampling_grid(sched, steps, spacing, grid, denoise_to_zero)
    plan = _plan_on_grid(sched, ts, points, settings)
    if key is not None:
        if len(_PLANS) >= PLANS_KEPT:
            _PLANS.pop(next(iter(_PLANS)))  # the oldest
        _PLANS[key] = plan
    return plan


_PLANS: dict[tuple, SamplingPlan] = {}
PLANS_KEPT = 256


def schedule_key(sched: NoiseSchedule) -> tuple:
    """A hashable snapshot of a schedule's state: its class and every attribute's value (a tensor by its
    dtype, shape and bytes), so a plan is reused only for a schedule equal to the one it was built for, even
    when the same object was changed in between."""
    def frozen(value):
        if isinstance(value, Tensor):
            return (value.dtype, tuple(value.shape), value.detach().cpu().contiguous().numpy().tobytes())
        if isinstance(value, (list, tuple)):
            return tuple(frozen(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, frozen(v)) for k, v in sorted(value.items()))
        hash(value)  # raises TypeError for what cannot be part of a key
        return value
    return (type(sched), tuple((name, frozen(value)) for name, value in sorted(vars(sched).items())))


def plan_adjoint_grid(sched: NoiseSchedule, plan: SamplingPlan, steps: int | None,
                      record_states: bool) -> AdjointGrid:
    """The AdjointDEIS grid of a run: the sampling grid, or `steps` steps uniform in log-SNR between its ends.

    A run that denoises to zero noise ends its continuous adjoint at the grid's last time before zero noise (the
    step to zero noise is differentiated exactly, see :func:`adjointdeis.gradients.continuous_adjoint`); a grid
    that starts at pure noise keeps its first step and spaces the rest.

    Args:
        sched: the run's schedule.
        plan: the sampling plan.
        steps: steps of the adjoint grid; None uses the sampling grid.
        record_states: whether the states on an adjoint grid of its own come from a forward run on it
            (then its plan is built, with the sampling plan's solver).

    Raises:
        ValueError for `steps` < 2 on a grid that starts at pure noise.
    """
    end = -1 if plan.points[-1].sigma == 0.0 else None
    points, model_times, times = plan.points[:end], plan.model_times[:end], plan.times[:end]
    if steps is None:
        return AdjointGrid(points, model_times)
    # From pure noise (log-SNR -inf: a flow grid's t = 1) the first step is the sampling grid's own.
    head = () if math.isfinite(float(sched.half_log_snr(times[0]))) else times[:1]
    if head and steps < 2:
        raise ValueError("adjoint_steps must be >= 2 on a grid that starts at pure noise (its first step is kept)")
    start = times[len(head)]
    lam = torch.linspace(float(sched.half_log_snr(start)), float(sched.half_log_snr(times[-1])),
                         steps + 1 - len(head), dtype=torch.float64)
    ts = sched.time_from_half_log_snr(lam)
    ts[0], ts[-1] = start, times[-1]
    ts, grid = sampling_grid(sched, steps, timesteps=torch.cat([torch.tensor(head, dtype=torch.float64), ts]))
    if not record_states:
        return AdjointGrid(tuple(grid), tuple(sched.model_time(ts).tolist()))
    forward = _plan_on_grid(sched, ts, grid, plan.settings)
    return AdjointGrid(forward.points, forward.model_times, forward)


_DEVICE_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}
_ROW_VIEWS: dict[tuple, tuple[tuple[Tensor, ...], ...]] = {}
DEVICE_TABLES_KEPT = 1024
"""How many (plan, device, dtype) coefficient tables :func:`device_tables` keeps (and as many sets of row views
:func:`row_views`); later ones are made per call."""


def _kept(cache: dict, key: tuple, make: Callable[[], object]) -> object:
    """``cache[key]``, made by `make` and kept while the cache has room; under torch.compile made in the graph
    (its constants, not kept tensors for the graph to guard on)."""
    if torch.compiler.is_compiling():
        return make()
    value = cache.get(key)
    if value is None:
        value = make()
        if len(cache) < DEVICE_TABLES_KEPT:
            cache[key] = value
    return value


def device_tables(plan: SamplingPlan, device: torch.device, time_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A plan's coefficient table (S, 7+) float64 and its evaluation times (S,) `time_dtype`, on `device`.

    Kept for the life of the process (never evicted, a few KB each), so that a run reuses them instead of
    copying from the host every call, and a CUDA graph that captured a run keeps reading live memory: a graph
    is captured after a warm-up run of the same plan, and the capture then copies nothing from the host.
    """
    def upload() -> tuple[Tensor, Tensor]:
        return (torch.tensor(plan.steps.rows, dtype=torch.float64).to(device),
                torch.tensor(plan.t_eval, dtype=torch.float64).to(device=device, dtype=time_dtype))

    return _kept(_DEVICE_TABLES, (plan.steps, plan.t_eval, str(device), time_dtype), upload)


def row_views(plan: SamplingPlan, device: torch.device, time_dtype: torch.dtype,
              batch: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Each row's coefficients (7+,), model time (0-d) and model times for a batch (batch,): views of
    :func:`device_tables`' tables, made at once and kept like them, so that a run spends nothing on them per row."""
    def views() -> tuple[tuple[Tensor, ...], ...]:
        coeffs, t_eval = device_tables(plan, device, time_dtype)
        return coeffs.unbind(0), t_eval.unbind(0), t_eval[:, None].expand(-1, batch).unbind(0)

    return _kept(_ROW_VIEWS, (plan.steps, plan.t_eval, str(device), time_dtype, batch), views)


def all_finite(x: Tensor) -> bool:
    """Whether every element of `x` is finite. A sum is finite only if every term is (an Inf or NaN term makes
    each partial sum it enters non-finite, in any order of summation), so one sum answers in one read of x
    (twice as fast as a min/max reduction); only a sum that overflows is checked again, by a min/max reduction,
    which propagates NaN. Syncs the host once (twice after an overflow)."""
    if x.numel() == 0:
        return True
    if math.isfinite(x.detach().sum().item()):
        return True
    low, high = torch.aminmax(x.detach())
    return bool(torch.isfinite(torch.stack([low, high])).all())


def _capturing(x: Tensor) -> bool:
    """Whether `x`'s CUDA stream is being captured into a graph (no host sync is allowed then)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _vmapped() -> bool:
    """Whether torch.func.vmap is active: a batched tensor has no value for the host to read."""
    stack = torch._C._functorch.get_interpreter_stack()
    return stack is not None and any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def _owners(t: Tensor) -> tuple[int, int, int, int]:
    """Who holds `t`: Python references, C++ references to its TensorImpl, to its storage (views), weak references.
    Called straight from the frame whose references are counted (each call level adds references of its own)."""
    return (sys.getrefcount(t), t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata),
            weakref.getweakrefcount(t))


def _nobody() -> tuple[int, int, int, int]:
    held = [torch.empty(1)]
    t = held.pop()
    return _owners(t)


def _untraced(fn: Callable[[], object]) -> object:
    """fn() with no trace or profile function set: a tracer that reads a frame's f_locals holds references of
    its own, which would skew the counts measured below (towards judging held tensors free)."""
    trace, profile = sys.gettrace(), sys.getprofile()
    sys.settrace(None)
    sys.setprofile(None)
    try:
        return fn()
    finally:
        sys.setprofile(profile)
        sys.settrace(trace)


_NOBODY = _untraced(_nobody)  # what _owners sees of a tensor only one local name holds (the interpreter's own counts)
_FREE_WITH = tuple((_NOBODY[0] - 1 + k, *_NOBODY[1:]) for k in range(8))
"""``_owners(t) == _FREE_WITH[k]``: nothing holds `t` but k Python references of the calling frame's own (local
names, entries of its lists)."""


def _same_kind(t: Tensor, like: Tensor) -> bool:
    """Whether `t` can stand in for a buffer like `like`: the same shape, dtype and device, and contiguous (the step
    writes contiguous outputs; a noise of the caller's, e.g. a channels_last one, is not)."""
    return t.shape == like.shape and t.dtype == like.dtype and t.device == like.device and t.is_contiguous()


RETAIN_BYTES = 64 << 20
"""The most bytes of free buffers that finished CPU runs keep for the next ones (:data:`RETAINED`); 0 keeps none."""


class Retained:
    """Buffers that finished CPU runs left free (their history, dropped states), which the next runs take before
    allocating: at most :data:`RETAIN_BYTES`, the newest kept first. A run of the same shape then writes into
    memory the process has touched already. Without it, glibc returns the two buffers a call frees (the history
    and, once the caller drops it, the sample) to the OS whenever they top its heap, and the next call faults
    every page in again: 2016 faults a call at 16x4x128x128 float32, which then takes 1.3-1.7x twenty step kernels
    instead of 0.5-0.7x (bench/RESULTS.md). Thread-safe; :func:`empty_cache` frees them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: list[Tensor] = []  # oldest first

    def take(self, like: Tensor) -> Tensor | None:
        """A kept buffer with `like`'s shape, dtype and device, made in the current inference mode, or None."""
        inference = torch.is_inference_mode_enabled()
        with self._lock:
            for i in range(len(self._buffers) - 1, -1, -1):
                t = self._buffers[i]
                if _same_kind(t, like) and t.is_inference() == inference:
                    return self._buffers.pop(i)
        return None

    def keep(self, free: list[Tensor]) -> None:
        """Adds `free` (tensors nothing else holds), dropping the oldest beyond RETAIN_BYTES."""
        with self._lock:
            kept, total = [], 0
            for t in reversed(self._buffers + free):
                size = t.numel() * t.element_size()
                if total + size <= RETAIN_BYTES:
                    kept.append(t)
                    total += size
            self._buffers = kept[::-1]

    def clear(self) -> None:
        with self._lock:
            self._buffers = []

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._buffers)


RETAINED = Retained()


def empty_cache() -> None:
    """Frees the buffers finished CPU sampling runs kept for the next ones (see :class:`Retained`)."""
    RETAINED.clear()


class Spares:
    """The tensors a CPU run has dropped, recycled as the output buffers of later steps when nothing else holds
    them (no name, container, view, weak or C++ reference: nobody can see them change). The loop then writes into
    memory it has already touched instead of two fresh allocations per step, which the C allocator may hand back
    to the OS and page-fault in again at every step. What is left free at the end of the run goes to
    :data:`RETAINED`, where the next run's spares come from before any fresh allocation."""

    def __init__(self) -> None:
        self.dropped: list[Tensor] = []
        self.fresh = 0  # the buffers allocated because no dropped or retained tensor was free
        self.reused = 0  # the buffers taken from RETAINED
        self.in_place = 0  # the outputs written in place of their step's own operands

    def take(self, like: Tensor) -> Tensor:
        """A dropped tensor that nothing else holds, with `like`'s shape, dtype and device, a retained one, or a
        fresh one."""
        while self.dropped:
            t = self.dropped.pop()
            if _owners(t) == _FREE_WITH[1] and _same_kind(t, like):
                return t
        t = RETAINED.take(like)
        if t is not None:
            self.reused += 1
            return t
        self.fresh += 1
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)

    def retire(self, leftovers: list[Tensor | None]) -> None:
        """Hands to RETAINED what nothing else holds of `leftovers` and the dropped tensors (both emptied): plain
        tensors outside any graph, that no name, container, view or weak reference outside this call reaches."""
        leftovers += self.dropped
        self.dropped = []
        free = []
        while leftovers:
            t = leftovers.pop()
            if (t is not None and type(t) is Tensor and not t.requires_grad and t.is_contiguous()
                    and _owners(t) == _FREE_WITH[1]):
                free.append(t)
        if free:
            RETAINED.keep(free)


def _count(t: Tensor | None, tensors: list[Tensor]) -> int:
    """How many entries of `tensors` are `t` itself."""
    n = 0
    for u in tensors:
        n += u is t
    return n


def _unkept(tensors: list[Tensor | None], kept: list[Tensor | None]) -> list[Tensor]:
    """The tensors of `tensors` (None aside) that are none of `kept`'s.

    A function of its own, so that run_plan has no closure: a name a closure reads is a cell, and deleting one is a
    bytecode (DELETE_DEREF) torch.compile's tracer of torch 2.13 cannot handle."""
    unkept = []
    for t in tensors:
        if t is not None and not _count(t, kept):
            unkept.append(t)
    return unkept


RECYCLE_BYTES = 1 << 17
"""The smallest state a CPU run recycles buffers for: glibc's default mmap threshold (128 KiB). Smaller blocks
come from malloc's free lists, faster than the ownership check."""


def _recycles(x: Tensor) -> bool:
    """Whether a run from `x` recycles its dropped tensors: plain CPU tensors of at least :data:`RECYCLE_BYTES`
    outside compilation (on CUDA the caching allocator already reuses memory; a compiled graph plans its own
    buffers), torch.func transforms and forward-mode AD (whose tangents the out-of-place steps carry)."""
    return (x.device.type == "cpu" and type(x) is Tensor and x.numel() * x.element_size() >= RECYCLE_BYTES
            and not torch.compiler.is_compiling() and not ops.transformed())


NoiseSource = Callable[[int, Tensor], Tensor]
"""Where a run's injected noise comes from: ``noise(row, x)`` returns the standard normal noise of stochastic row
`row` (a :class:`SamplingPlan` row index), shaped like the current state `x`, on its device and in its dtype."""


def noisy_rows(plan: SamplingPlan) -> tuple[int, ...]:
    """The rows of `plan` that inject noise, in order (N of them: the length of a run's explicit noise)."""
    return tuple(row for row, noisy in enumerate(plan.steps.noisy) if noisy)


def noise_tensors(noise, plan: SamplingPlan, x_T: Tensor) -> list[Tensor] | None:
    """The explicit per-row noises of a run: `noise` as a sequence of N tensors or one ``(N, *x_T.shape)`` tensor,
    N the plan's noisy rows (:func:`noisy_rows`); None when `noise` is None or a :data:`NoiseSource`.

    Returns:
        N tensors shaped like x_T (rows of a stacked tensor are its views, so gradients flow back to it).

    Raises:
        TypeError naming `noise` for anything else, a non-tensor entry or a dtype other than x_T's;
        ValueError naming `noise` for a wrong count, shape or device.
    """
    if noise is None or callable(noise):
        return None
    count = len(noisy_rows(plan))
    if isinstance(noise, Tensor):
        if noise.shape != (count, *x_T.shape):
            raise ValueError(f"noise: a tensor of noises must have shape (N, *x_T.shape) = {[count, *x_T.shape]} "
                             f"(N = {count} noisy rows in this run), got {list(noise.shape)}")
        tensors = list(noise.unbind(0))
    elif isinstance(noise, (list, tuple)):
        tensors = list(noise)
        if len(tensors) != count:
            raise ValueError(f"noise: got {len(tensors)} tensors for a run with {count} noisy rows")
        for i, z in enumerate(tensors):
            if not isinstance(z, Tensor):
                raise TypeError(f"noise[{i}] must be a tensor, got {type(z).__name__}")
            if z.shape != x_T.shape:
                raise ValueError(f"noise[{i}] must have x_T's shape {list(x_T.shape)}, got {list(z.shape)}")
    else:
        raise TypeError("noise must be callable as noise(row, x) -> Tensor, a sequence of tensors or one "
                        f"(N, *x_T.shape) tensor, got {type(noise).__name__}")
    for i, z in enumerate(tensors):
        if z.dtype != x_T.dtype:
            raise TypeError(f"noise[{i}] must have x_T's dtype {x_T.dtype}, got {z.dtype}")
        if z.device != x_T.device:
            raise ValueError(f"noise[{i}] must be on x_T's device {x_T.device}, got {z.device}")
    return tensors


def tensor_noise(plan: SamplingPlan, tensors: list[Tensor]) -> NoiseSource:
    """The :data:`NoiseSource` that hands noisy row ``noisy_rows(plan)[k]`` the tensor ``tensors[k]``."""
    index = {row: k for k, row in enumerate(noisy_rows(plan))}
    return lambda row, x: tensors[index[row]]


def truncation_row(plan: SamplingPlan, grad_steps: int) -> int:
    """The first row of the last `grad_steps` steps of `plan` (a step's rows: its evaluation and any corrector).

    Raises:
        ValueError naming `grad_steps` unless 1 <= grad_steps <= the plan's steps.
    """
    starts = [row for row, starts_step in enumerate(plan.steps.starts_step) if starts_step]
    if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or not 1 <= grad_steps <= len(starts):
        raise ValueError(f"grad_steps must be an integer in [1, {len(starts)}] (the run's steps), got {grad_steps!r}")
    return starts[len(starts) - grad_steps]


def row_output(plan: SamplingPlan, row: int, x: Tensor, out: Tensor) -> Tensor:
    """What row `row` of `plan` takes as its output: the model's, or with thresholding the thresholded x0.

    Args:
        x: (batch, *shape) the state the model was evaluated at; out: (batch, *shape) its (guided) output.
    """
    out = out if out.dtype == x.dtype else out.to(x.dtype)
    if plan.x0_rows is None:
        return out
    p, q = plan.x0_rows[row]
    return plan.settings.threshold(p * x + q * out)


def run_plan(model: Callable, x_T: Tensor, plan: SamplingPlan, *, cond=None, guidance_scale=None, uncond=None,
             generator: torch.Generator | None = None, progress: bool = False, check_finite: bool = True,
             callback: Callable[[StepInfo], None] | None = None, noise: NoiseSource | None = None,
             grad_from: int = 0) -> Tensor:
    """Runs a :class:`SamplingPlan` from x_T; the loop never syncs the host.

    Args:
        model: ``model(x, t[, cond])`` -> tensor shaped like x.
        x_T: (batch, *shape) the initial state.
        plan: the plan, from :func:`plan_sampling`.
        cond, guidance_scale, uncond: the conditioning (see :func:`adjointdeis.models.evaluate_model`).
        generator: draws the noise of stochastic rows (when `noise` is None).
        progress: show a tqdm progress bar.
        check_finite: after the loop (one host sync), raise if the result is not finite; skipped where the host
            cannot read the result (torch.compile, CUDA graph capture, torch.func.vmap).
        callback: called with a :class:`StepInfo` after every model evaluation.
        noise: the noise of stochastic rows, ``noise(row, x) -> Tensor`` shaped like x (see :data:`NoiseSource`);
            default: standard normal draws from `generator`.
        grad_from: rows before this one run under ``torch.no_grad()`` (constants for autograd: truncated
            backpropagation, see :func:`truncation_row`; under forward-mode AD, which no_grad does not stop, the
            state is detached there).

    Returns:
        (batch, *shape) the final state.

    Raises:
        FloatingPointError when `check_finite` and the result is not finite.
    """
    steps = plan.steps
    coeff_rows, t_points, t_rows = row_views(plan, x_T.device, opmath_dtype(x_T.dtype), x_T.shape[0])
    count = len(steps.eval_index)
    rows = range(count)
    if progress and not torch.compiler.is_compiling():
        rows = tqdm(rows, disable=None, desc="sampling", leave=False)
    rows = zip(rows, coeff_rows, t_rows, steps.starts_step, (*steps.starts_step[1:], True), steps.noisy,
               steps.num_history, steps.skip or (False,) * count)  # what each row reads, in one tuple
    x, x_start, history = x_T, x_T, []
    depth = max(steps.num_history, default=0)
    save_m0 = depth > 0 or callback is not None
    spares = Spares() if _recycles(x_T) else None
    check = check_finite and not torch.compiler.is_compiling() and not _capturing(x_T) and not _vmapped()
    # a recycling last row checks its x_next in its kernel, block by block in cache (a callback could change it)
    flag = torch.ones((), dtype=torch.bool) if check and spares is not None and callback is None else None
    last, verdict = count - 1, None
    ambient = grad_now = torch.is_grad_enabled()
    try:  # grad mode set only where it changes (rows before grad_from), and put back however the loop ends
        for row, coeff_row, t_row, starts, ends, noisy, num_history, skip in rows:
            grad = ambient and row >= grad_from
            if grad is not grad_now:
                torch.set_grad_enabled(grad)
                grad_now = grad
                if grad and ops.transformed():  # forward-mode tangents pass no_grad: cut them where grad starts
                    x, x_start, history = x.detach(), x_start.detach(), [h.detach() for h in history]
            recycle = spares is not None and not grad
            if starts:
                if recycle and x_start is not x and x_start is not x_T:
                    spares.dropped.append(x_start)  # a step's start state outlives its step's rows
                x_start = x
            out = evaluate_model(model, x, t_row, cond, guidance_scale, uncond)
            z = None
            if noisy:
                z = (validation.model_output(noise(row, x), x, "noise") if noise is not None
                     else torch.randn(x.shape, generator=generator, out=spares.take(x)) if recycle
                     else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
            operands = history[:num_history] + [x_start] if skip else history[:num_history]
            if recycle:  # in place of operands no later row reads and nothing else holds, else into dropped ones
                # _owners(t) == _FREE_WITH[k]: nothing holds t but this frame's k references (names, list entries)
                keeps_x = callback is not None or (x is x_start and not ends)  # the step's next row reads x
                free = not keeps_x and _owners(x) == _FREE_WITH[1 + (x_start is x) + _count(x, operands)]
                x_next = x if free else spares.take(x)
                oldest = history[-1] if save_m0 and depth and len(history) == depth else None
                claimed = oldest is not None and _owners(oldest) == _FREE_WITH[2 + _count(oldest, operands)]
                m0 = oldest if claimed else spares.take(x) if save_m0 else None
                spares.in_place += free + claimed
                del oldest
                verdict = flag if row == last else None
                # grad is off and no transform runs here, and nothing else holds a buffer it writes: the raw op
                ops.multistep_step_out_unchecked(x, row_output(plan, row, x, out), operands, coeff_row, z, x_next,
                                                 m0, verdict)
            else:
                x_next, m0 = ops.multistep_step(x, row_output(plan, row, x, out), operands, coeff_row, z, save_m0)
            if callback is not None:
                if grad_now is not ambient:
                    torch.set_grad_enabled(ambient)
                    grad_now = ambient
                callback(StepInfo(row, steps.eval_index[row], starts, t_points[row], x, out, m0, x_next))
            outputs = [m0, *history]
            kept = [x_start, x_next, *outputs[:depth]]
            if recycle:
                spares.dropped += _unkept([x, z, *outputs[depth:]], kept)
            x, history = x_next, kept[2:]
            del m0, x_next, operands, outputs, kept  # no name of the loop's may hold a tensor it recycles
    finally:
        torch.set_grad_enabled(ambient)
    if spares is not None:  # what it dropped, and its history unless the last row ran with grad: for the next run
        leftovers = [] if ambient and last >= grad_from else [None if x_start is x_T else x_start, *history]
        x_start = history = z = None
        spares.retire(leftovers)
    if check and not (verdict.item() if verdict is not None else all_finite(x)):
        raise FloatingPointError(
            "sample: the result is not finite: the model returned NaN or Inf during sampling "
            "(or the grid reaches a time where the prediction cannot be converted)")
    return x
