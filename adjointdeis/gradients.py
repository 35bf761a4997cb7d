"""Gradients through sampling (docs/math.md section 5): the exact discrete adjoint and AdjointDEIS.

Both run the sampler forward under ``no_grad``, keep only the states, and in the backward pass
re-run the model once per step with grad enabled, so at most one step's activations are alive. The discrete
adjoint runs the last row's model call with grad already in the forward pass and pulls that graph back first
(one re-run fewer: N - 1 for N rows).
The result is attached to autograd through one :class:`torch.autograd.Function` whose inputs are
x_T, the conditioning tensors, the explicit per-step noises and the model's parameters, so ``loss.backward()``
fills their ``.grad`` (a DistributedDataParallel model's parameter gradients averaged across ranks; an FSDP2
model's reduce-scattered by FSDP). The user's module is never modified: the model re-runs on a shadow copy
of its module tree (:class:`adjointdeis.models.ParameterAliases`). Truncation (``grad_from``) treats the first
rows as constants.
That function drives the forward run itself, from a :class:`GradientSpec` (the plans of
:mod:`adjointdeis.planning` and the settings), recording the states it needs through the run loop's callback.
"""

import contextlib
import dataclasses
import functools
import math
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from . import ops, validation
from .models import (Conditioning, ParameterAliases, evaluate_model, fully_sharded, graph_leaves, shadow,
                     synchronise)
from .planning import (AdjointGrid, NoiseSource, SamplingPlan, StepInfo, all_finite, noisy_rows, row_output,
                       run_plan, tensor_noise)
from .predictions import conversion
from .reference import opmath_dtype
from .solvers import GridPoint

GRAD_MODES = ("discrete", "adjoint", "autograd")
ADJOINT_FORMS = ("eps", "x0")
STATE_MODES = ("recorded", "resolved")


@dataclass(frozen=True)
class AdjointOptions:
    """The settings of ``grad="adjoint"`` (AdjointDEIS), as one object (cf. torchdiffeq's ``adjoint_options``).

    Attributes:
        order: 1 (AdjointDEIS-1) or 2 (AdjointDEIS-2M).
        form: "eps" (the paper's noise-prediction form) or "x0" (the data-prediction form, stable on coarse
            grids; docs/math.md section 5.3).
        steps: steps of the adjoint grid, uniform in log-SNR between the sampling grid's ends; None: the
            sampling grid.
        states: "recorded" (states from a forward solve on the adjoint grid) or "resolved" (re-solved
            backwards from the sample by DDIM inversion; ODE only).

    Raises:
        ValueError naming the setting (and its ``sample`` keyword) for a value out of range.
    """

    order: int = 1
    form: str = "eps"
    steps: int | None = None
    states: str = "recorded"

    def __post_init__(self):
        validation.integer(self.order, "AdjointOptions.order (adjoint_order)", 1, 2)
        validation.choice(self.form, "AdjointOptions.form (adjoint_form)", ADJOINT_FORMS)
        validation.choice(self.states, "AdjointOptions.states (states)", STATE_MODES)
        if self.steps is not None:
            validation.count(self.steps, "AdjointOptions.steps (adjoint_steps)")

    def check_run(self, sde: bool, thresholded: bool = False, pure_noise_start: bool = False,
                  renoise: bool = False) -> None:
        """Raises ValueError when these settings cannot differentiate a run with these options (`renoise`: solver
        "renoise", which re-noises the data prediction every step)."""
        if renoise:
            raise ValueError("grad='adjoint' integrates the adjoint of the probability-flow ODE (or of the diffusion "
                             "SDE), which solver 'renoise' (FlowMatchEuler's stochastic_sampling: fresh noise on the "
                             "data prediction every step) does not solve: use grad='discrete'")
        if pure_noise_start and self.form == "eps":
            raise ValueError("grad='adjoint': the grid starts at pure noise (alpha = 0, a flow grid's t = 1), where "
                             "the eps form divides by alpha; use adjoint_form='x0'")
        if thresholded:
            raise ValueError("grad='adjoint' integrates the probability-flow ODE's adjoint, which a thresholded "
                             "sampler (threshold=...: diffusers' thresholding) does not solve: use grad='discrete'")
        if sde and self.states == "resolved":
            raise ValueError("states='resolved' re-solves the ODE backwards; an SDE sample needs states='recorded'")


def adjoint_options(adjoint: AdjointOptions | None = None, order: int | None = None, form: str | None = None,
                    steps: int | None = None, states: str | None = None) -> AdjointOptions:
    """The AdjointDEIS settings from ``adjoint=`` or from the separate keywords of :func:`adjointdeis.sample`.

    Raises:
        ValueError when both are given; TypeError when `adjoint` is not an :class:`AdjointOptions`.
    """
    given = {name: value for name, value in (("order", order), ("form", form), ("steps", steps),
                                             ("states", states)) if value is not None}
    if adjoint is None:
        return AdjointOptions(**given)
    if not isinstance(adjoint, AdjointOptions):
        raise TypeError(f"adjoint must be an AdjointOptions, got {type(adjoint).__name__}")
    if given:
        keywords = ", ".join("states" if k == "states" else f"adjoint_{k}" for k in given)
        raise ValueError(f"pass the AdjointDEIS settings either as adjoint=AdjointOptions(...) or as keywords, "
                         f"not both (got adjoint= and {keywords})")
    return adjoint


def gradient_mode(grad: str | None, x_T: Tensor, conditioning: Conditioning, params: list[Tensor],
                  noises: list[Tensor] = ()) -> str | None:
    """The gradient mode of a run: `grad`, or "discrete" when something (x_T, the conditioning, `params`, the
    explicit `noises`) requires grad; None without autograd. Under a torch.func transform or forward-mode AD
    (:func:`adjointdeis.ops.transformed`), which differentiate plain autograd only and cannot tell the sampler
    which tensors they differentiate (a model's closure or ``functional_call`` reaches them): "autograd" (None
    without grad mode).

    Raises:
        ValueError for an unknown mode; RuntimeError for discrete or adjoint inside ``parametrize.cached()``
        (:func:`check_uncached`), or under a torch.func transform or forward-mode AD.
    """
    if grad is not None and grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; choose one of {', '.join(GRAD_MODES)} or None")
    if ops.transformed():
        if grad in ("discrete", "adjoint"):
            raise RuntimeError(f"grad={grad!r} runs its own backward pass, which torch.func transforms (grad, jvp, "
                               "vmap, ...) and forward-mode AD cannot differentiate; use grad='autograd' (the default "
                               "under them)")
        return "autograd" if torch.is_grad_enabled() else None
    if not torch.is_grad_enabled():
        return None
    wants = (x_T.requires_grad or any(t.requires_grad for t in [*conditioning.leaves(), *noises])
             or bool(params))
    mode = grad if grad is not None else "discrete" if wants else None
    check_uncached(mode)
    return mode


def check_uncached(mode: str | None) -> None:
    """Raises RuntimeError for grad="discrete" or "adjoint" inside ``torch.nn.utils.parametrize.cached()``: its cache
    would hand every model call of the run and of the reverse pass the weights of the first call, whose graph (none,
    or one already pulled back) is not that call's."""
    if mode in ("discrete", "adjoint") and getattr(parametrize, "_cache_enabled", 0):
        raise RuntimeError(f"grad={mode!r} cannot run inside torch.nn.utils.parametrize.cached(): its cache gives "
                           "every model call the weights of the first call; sample and backpropagate outside it, or "
                           "use grad='autograd'")


def truncation_steps(grad_steps: int | tuple[int, int], generator: torch.Generator | None = None,
                     steps: int | None = None) -> int:
    """K of a truncated run: `grad_steps` itself, or for ``(lo, hi)`` a uniform draw from lo..hi inclusive,
    ``torch.randint(lo, hi + 1, (1,), generator=generator)`` (AlignProp's random truncation).

    Args:
        steps: the run's steps, which hi may not exceed (checked before the draw).

    Raises:
        ValueError naming `grad_steps` for a pair that is not two integers with 1 <= lo <= hi (<= steps).
    """
    if not isinstance(grad_steps, tuple):
        return grad_steps
    top = "hi" if steps is None else f"hi <= {steps} (the run's steps)"
    if (len(grad_steps) != 2 or any(isinstance(k, bool) or not isinstance(k, int) for k in grad_steps)
            or not 1 <= grad_steps[0] <= grad_steps[1] or (steps is not None and grad_steps[1] > steps)):
        raise ValueError(f"grad_steps as a range must be (lo, hi), integers with 1 <= lo <= {top}, got "
                         f"{grad_steps!r}")
    lo, hi = grad_steps
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def check_adjoint_inputs(adjoint_grid: AdjointGrid, noises: list[Tensor] | None, grad_from: int,
                         draws: bool = False) -> None:
    """Raises ValueError for what grad="adjoint" cannot do: differentiate explicit noises, use them on an adjoint
    grid of its own (its forward run has other rows), draw a stochastic run's noise (`draws`: from the generator)
    on an adjoint grid of its own (its forward run would draw other noise, another path than the sample's), or
    truncate (`grad_steps`)."""
    if grad_from:
        raise ValueError("grad_steps (truncated backpropagation) needs grad='discrete' or 'autograd'")
    if draws and adjoint_grid.forward is not None:
        raise ValueError("grad='adjoint' with adjoint_steps records the states of a stochastic run in a forward run "
                         "on its own grid, which would draw other noise than the sample's (another path, so another "
                         "gradient); drop adjoint_steps, pass noise as a callable noise(row, x) for that run's rows, "
                         "or use grad='discrete'")
    if noises is None:
        return
    if any(z.requires_grad for z in noises):
        raise ValueError("grad='adjoint' does not differentiate the injected noise; use grad='discrete' (exact) for "
                         "noises that require grad")
    if adjoint_grid.forward is not None:
        raise ValueError("grad='adjoint' with adjoint_steps records its states on its own grid, whose rows the "
                         "given noise tensors do not match; pass noise as a callable noise(row, x) or drop "
                         "adjoint_steps")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adjoints of half and bfloat16 models accumulate in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class GradientSpec:
    """Everything a differentiable run needs besides tensors.

    Attributes:
        model: ``model(x, t[, cond])``.
        plan: the sampling plan.
        conditioning: the structure of (cond, uncond, guidance_scale); its tensors are passed separately.
        num_params: how many parameter tensors follow the conditioning's leaves.
        mode: "discrete" or "adjoint".
        adjoint, adjoint_grid: the AdjointDEIS settings and grid (mode "adjoint").
        generator, progress, check_finite, callback, noise: as for :func:`adjointdeis.planning.run_plan`; the
            callback sees the sampling run only.
        num_noises: how many explicit noise tensors (one per noisy row) follow the conditioning's leaves, before
            the parameters; `noise` is then None.
        grad_from: the first row differentiated (truncation; the earlier rows are constants).
        default_parameters: the parameters are the model's own by default (no ``parameters=``): a warning names
            the other tensors requiring grad that the model reaches (:func:`warn_unseen_leaves`).
        autocast: the ``torch.autocast`` settings the sampling run was made under (:func:`autocast_state`, set by
            :func:`sample_with_gradients`), which the reverse pass's model re-runs are made under again.
    """

    model: Callable
    plan: SamplingPlan
    conditioning: Conditioning
    num_params: int
    mode: str
    adjoint: AdjointOptions | None = None
    adjoint_grid: AdjointGrid | None = None
    generator: torch.Generator | None = None
    progress: bool = False
    check_finite: bool = True
    callback: Callable[[StepInfo], None] | None = None
    noise: NoiseSource | None = None
    num_noises: int = 0
    grad_from: int = 0
    default_parameters: bool = False
    autocast: tuple | None = None


@torch.compiler.disable(reason="adjointdeis runs grad='discrete'/'adjoint' eagerly (its reverse pass re-runs the "
                                "model from a host-side plan); grad='autograd' compiles with fullgraph=True")
def sample_with_gradients(spec: GradientSpec, x_T: Tensor, params: list[Tensor], noises: list[Tensor] = ()) -> Tensor:
    """Runs `spec` from x_T and attaches the sample to autograd through x_T, the conditioning, the explicit
    `noises` (one (batch, *shape) tensor per noisy row) and `params`. Under ``torch.compile`` it runs eagerly (a
    graph break; dynamo cannot trace the reverse pass's model re-runs and host-side plan), the code around it
    compiled.

    Returns:
        (batch, *shape) the sample.
    """
    check_initialised(spec.mode, params)
    spec = dataclasses.replace(spec, model=as_module(spec.model), autocast=autocast_state(x_T.device))
    return _Sampler.apply(spec, x_T, *spec.conditioning.leaves(), *noises, *params)


class _MethodModule(torch.nn.Module):
    """``function(module, *args, x, t[, cond], **keywords)`` as a module over `module` (its submodule): a bound
    method of a module, or a ``functools.partial`` of one or of a module, which the reverse pass then treats as
    it treats a module (:func:`as_module`)."""

    def __init__(self, module: torch.nn.Module, function: Callable, args: tuple = (), keywords: dict | None = None):
        super().__init__()
        self.module, self.function, self.args, self.keywords = module, function, args, dict(keywords or {})

    def forward(self, *inputs):
        return self.function(self.module, *self.args, *inputs, **self.keywords)


def as_module(model):
    """`model` as the reverse pass runs it: a bound method of an ``nn.Module`` (``net.forward_eps``) or a
    ``functools.partial`` of a module or of such a method becomes a :class:`_MethodModule` over that module, so
    that the re-runs go to a shadow of it, its train-mode buffers are kept and replayed, and its parameters
    accumulate in place, as for the module itself (a DDP module's is left as it is); any other model as it is."""
    method, args, keywords = model, (), {}
    if isinstance(model, functools.partial):
        method, args, keywords = model.func, model.args, model.keywords
        if isinstance(method, torch.nn.Module):
            method = types.MethodType(type(method).__call__, method)
    if not isinstance(method, types.MethodType) or not isinstance(method.__self__, torch.nn.Module) \
            or isinstance(method.__self__, torch.nn.parallel.DistributedDataParallel):
        return model
    return _MethodModule(method.__self__, method.__func__, args, keywords)


def check_initialised(mode: str, params: list[Tensor]) -> None:
    """Raises ValueError naming `parameters` when one is a lazy module's uninitialised parameter
    (``nn.LazyLinear`` before its first call): the reverse pass differentiates the parameters as they are when
    sampling starts, and the first call would give them their shape only then."""
    if any(torch.nn.parameter.is_lazy(p) for p in params):
        raise ValueError(f"grad={mode!r}: parameters include a lazy module's uninitialised parameter (a "
                         "torch.nn.LazyLinear, LazyConv2d... not called yet); call the model once on a dummy batch "
                         "before sampling, or use grad='autograd'")


def autocast_state(device: torch.device) -> tuple:
    """The ``torch.autocast`` settings in force now, for the CPU and `device`: ``((device_type, enabled, dtype),
    ...), cache_enabled``."""
    types = ("cpu",) if device.type == "cpu" or not torch.amp.is_autocast_available(device.type) else \
        ("cpu", device.type)
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in types), \
        torch.is_autocast_cache_enabled()


@contextlib.contextmanager
def _autocasting(state: tuple | None):
    """Runs the block under the autocast settings `state` (:func:`autocast_state`; None: as they are): a model
    re-run in the reverse pass computes what its forward call computed even when ``backward()`` is called outside
    the ``torch.autocast`` region the sampling ran in (as torch.utils.checkpoint restores them)."""
    if state is None:
        yield
        return
    settings, cache_enabled = state
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in settings:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled))
        yield


def _chain(record: Callable[[StepInfo], None], callback: Callable[[StepInfo], None] | None):
    if callback is None:
        return record

    def both(info: StepInfo) -> None:
        record(info)
        callback(info)
    return both


def _forward(spec: GradientSpec, x_T: Tensor, conditioning: Conditioning,
             noise: NoiseSource | None) -> tuple[Tensor, list[Tensor]]:
    """The sampling run of grad="adjoint" and the states its backward pass needs: the grid states with the final
    one (recorded) or none (resolved)."""
    def run(plan, callback):
        return run_plan(spec.model, x_T, plan, cond=conditioning.cond, guidance_scale=conditioning.guidance_scale,
                        uncond=conditioning.uncond, generator=spec.generator, progress=spec.progress,
                        check_finite=spec.check_finite, callback=callback, noise=noise)

    states = []
    last_row, last_input = len(spec.plan.steps) - 1, []
    callback = spec.callback
    if _ends_at_zero_noise(spec.plan):  # the step to zero noise is differentiated exactly, from its input
        callback = _chain(lambda info: last_input.append(info.x) if info.row == last_row else None, callback)
    if spec.adjoint.states == "resolved":
        return run(spec.plan, callback), last_input

    def record_grid(info: StepInfo) -> None:
        if info.starts_step:
            states.append(info.x)

    if spec.adjoint_grid.forward is None:
        x = run(spec.plan, _chain(record_grid, callback))
        return x, states + [x] + last_input
    x = run(spec.plan, callback)
    return x, states + [run(spec.adjoint_grid.forward, record_grid)] + last_input


@dataclass(frozen=True)
class _ModelGraph:
    """One row's output with its autograd graph, ready to pull back.

    Attributes:
        x_in: (batch, *shape) the leaf the model was evaluated at.
        cond_in: the conditioning's leaves the output was computed from (detached; requiring grad as theirs do).
        out: (batch, *shape) the row's output (:func:`adjointdeis.planning.row_output`), or the model's.
        aliases: the :class:`ParameterAliases` whose ``module`` computed `out`; None: the model itself did.
    """

    x_in: Tensor
    cond_in: list[Tensor]
    out: Tensor
    aliases: ParameterAliases | None


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The global generators' state (the CPU's, and `device`'s when it is a GPU), read without a device sync."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replaying(state: tuple[tuple[Tensor, Tensor | None] | None, list[tuple[Tensor, Tensor]]] | None,
               device: torch.device):
    """Runs the block with the global generators and the training-mode buffers as a forward call found them:
    `state` is (the generators' state or None, [(buffer, its value before the call)...]) (None: as they are); the
    generators are restored after, the buffers are left (:func:`_buffers_kept` restores them after the pass). A
    model re-run in the reverse pass draws what its forward call drew (dropout masks), as torch.utils.checkpoint,
    and reads the state that call read (the power iteration's vector of a train-mode spectral_norm)."""
    if state is None:
        yield
        return
    generators, buffers = state
    with torch.no_grad():
        for buffer, value in buffers:
            buffer.copy_(value)
    if generators is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if generators[1] is not None else [], device_type="cuda"):
        torch.set_rng_state(generators[0])
        if generators[1] is not None:
            torch.cuda.set_rng_state(generators[1], device)
        yield


def _training_buffers(model) -> list[Tensor]:
    """The buffers of `model`'s training-mode submodules (none for a model that is not a module)."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [b for m in model.modules() if m.training for b in m._buffers.values() if b is not None]


@contextlib.contextmanager
def _buffers_kept(model):
    """Restores the buffers of `model`'s training-mode submodules after the block: the reverse pass's re-runs of a
    train-mode BatchNorm would otherwise move its running statistics (the forward pass moved them as autograd's)."""
    kept = [(b, b.clone()) for b in _training_buffers(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


def _isolated(spec: GradientSpec) -> GradientSpec:
    """`spec` with its module model run as a :func:`shadow` (DDP's wrapped module's), so that the reverse pass's
    re-runs assign nothing to the user's module (a counter, a replaced buffer); an FSDP2 model, whose hooks act on
    its own modules, and a model that is not a module run as they are."""
    model = vjp_model(spec.model)
    if not isinstance(model, torch.nn.Module) or fully_sharded(model):
        return spec
    return dataclasses.replace(spec, model=shadow(model))


def _condition_inputs(cond_leaves) -> list[Tensor]:
    return [c.detach().requires_grad_(c.requires_grad) for c in cond_leaves]


def _forward_discrete(spec: GradientSpec, x_T: Tensor, cond_leaves: list[Tensor], noise: NoiseSource | None,
                      aliases: ParameterAliases | None
                      ) -> tuple[Tensor, list[Tensor], _ModelGraph | None, list | None]:
    """The sampling run of grad="discrete": the sample, every differentiated row's input, the last row's
    output with its graph, for the reverse pass to pull back instead of re-running the model there, and per row
    what its model call found (:func:`_replaying`): the global generators' state when the call drew random
    numbers, and the value of each training-mode buffer that some call of the run changed in place (None for a
    row with neither). A buffer's value is kept once per call that changed it (its version counter moved; no
    device sync).

    Only the last row runs with grad enabled (``run_plan``'s `grad_from`), its input made a leaf that requires grad
    when the row before reports it, and its model call made as :func:`model_vjp` would (on ``aliases.module``, or
    DDP's wrapped module); the other rows call ``spec.model`` without grad. The graph is None when the reverse pass
    must re-run that row instead: the output does not require grad (model_vjp then raises), or its graph reaches
    one of the user's parameters rather than its alias (:meth:`ParameterAliases.escaped`). The user's callback
    sees detached tensors, without grad.
    """
    last = len(spec.plan.steps) - 1
    grad_model = aliases.module if aliases is not None else vjp_model(spec.model)
    cond_in = _condition_inputs(cond_leaves)
    conditioning = spec.conditioning.rebuild(cond_in)
    x_T = x_T.detach().requires_grad_(last == 0)
    states, graphs, rng = [], [], []
    tracked = _training_buffers(vjp_model(spec.model))
    versions, initial = [b._version for b in tracked], [b.detach().clone() for b in tracked]
    changed, seen = {}, []  # buffer index -> its value after the last call that changed it; per row, before it

    def record(info: StepInfo) -> None:
        if info.row == last - 1:
            info.x_next.requires_grad_()  # a fresh tensor made without grad: the last row's input, as a leaf
        if info.row >= spec.grad_from:
            states.append(info.x.detach())
        if info.row == last:
            out = row_output(spec.plan, last, info.x, info.output)
            graphs.append(_ModelGraph(info.x, cond_in, out, aliases))

    def callback(info: StepInfo) -> None:
        record(info)
        if spec.callback is not None:
            with torch.no_grad():
                spec.callback(dataclasses.replace(info, x=info.x.detach(), output=info.output.detach(),
                                                  converted=info.converted.detach(), x_next=info.x_next.detach()))

    def model(*args):  # called once a row
        before = _rng_state(x_T.device)
        seen.append(dict(changed))
        if not torch.is_grad_enabled():
            out = spec.model(*args)
        elif aliases is None:
            out = grad_model(*args)
        else:  # on the shadow, which the user's module gives its state to and takes what the call assigned from
            synchronise(aliases.copies, back=False)
            out = grad_model(*args)
            synchronise(aliases.copies, back=True)
        after = _rng_state(x_T.device)
        drew = not all(a is None or torch.equal(a, b) for a, b in zip(before, after))
        rng.append(before if drew else None)  # kept only for a call that drew (5 KB on the CPU)
        for i, b in enumerate(tracked):
            if b._version != versions[i]:
                versions[i], changed[i] = b._version, b.detach().clone()
        return out

    with torch.enable_grad():
        x = run_plan(model, x_T, spec.plan, cond=conditioning.cond, guidance_scale=conditioning.guidance_scale,
                     uncond=conditioning.uncond, generator=spec.generator, progress=spec.progress,
                     check_finite=spec.check_finite, callback=callback, noise=noise, grad_from=last)
    graph = graphs[0]
    if not graph.out.requires_grad or (aliases is not None and aliases.escaped(graph.out)):
        if aliases is not None:
            aliases.module = None
        graph = None
    if len(rng) != len(spec.plan.steps):  # a call a row, else none
        return x.detach(), states, graph, None
    replay = [None if g is None and not changed else (g, [(tracked[i], before.get(i, initial[i])) for i in changed])
              for g, before in zip(rng, seen)]
    return x.detach(), states, graph, replay


class _Sampler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: GradientSpec, x_T: Tensor, *leaves: Tensor):
        num_cond = len(leaves) - spec.num_params - spec.num_noises
        noises = leaves[num_cond:num_cond + spec.num_noises]
        noise = tensor_noise(spec.plan, list(noises)) if noises else spec.noise
        if spec.num_params and fully_sharded(vjp_model(spec.model)):
            check_sharded(spec, vjp_model(spec.model), list(leaves[num_cond + spec.num_noises:]))
        ctx.reuse = None
        if spec.mode == "discrete":
            aliases = ParameterAliases.of(vjp_model(spec.model), list(leaves[num_cond + spec.num_noises:]))
            x, states, graph, ctx.rng = _forward_discrete(spec, x_T, list(leaves[:num_cond]), noise, aliases)
            ctx.reuse = aliases, graph
        else:
            x, states = _forward(spec, x_T, spec.conditioning.rebuild(list(leaves[:num_cond])), noise)
        ctx.spec = spec
        ctx.num_cond = num_cond
        ctx.num_leaves = len(leaves)
        ctx.save_for_backward(*leaves[:num_cond], *leaves[num_cond + spec.num_noises:], *states)
        ctx.final = None
        if spec.mode == "adjoint":
            ctx.final = states[-1] if _ends_at_zero_noise(spec.plan) else x
        return x

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        spec = ctx.spec
        check_uncached(spec.mode)
        if torch.is_grad_enabled():  # backward(create_graph=True): the engine records this pass for another
            raise RuntimeError(f"grad={spec.mode!r} gives first derivatives only; a double backward "
                               "(create_graph=True: Hessian-vector products, gradient penalties) needs grad='autograd'")
        saved = ctx.saved_tensors
        num_saved = ctx.num_leaves - spec.num_noises
        leaves, states = list(saved[:num_saved]), list(saved[num_saved:])
        cond_leaves, params = leaves[:ctx.num_cond], leaves[ctx.num_cond:]
        grad_noises = [None] * spec.num_noises
        with _buffers_kept(vjp_model(spec.model)):
            spec = _isolated(spec)
            if spec.mode == "discrete":
                wanted = ctx.needs_input_grad[2 + ctx.num_cond:2 + ctx.num_cond + spec.num_noises]
                reuse, ctx.reuse = ctx.reuse, None  # used once: a second backward starts afresh
                grad_x_T, grad_cond, grad_params = discrete_adjoint(spec, grad_x, states, cond_leaves, params,
                                                                    grad_noises if any(wanted) else None, reuse,
                                                                    ctx.rng)
            else:  # its model calls draw new numbers at new points: the global generators are left as they were
                with torch.random.fork_rng(devices=[grad_x.device] if grad_x.device.type == "cuda" else [],
                                           device_type="cuda"):
                    grad_x_T, grad_cond, grad_params = continuous_adjoint(spec, grad_x, states, ctx.final,
                                                                          cond_leaves, params)
        reduce_across_ranks(ctx.spec.model, grad_params)
        if spec.check_finite and not all_finite(grad_x_T):
            raise FloatingPointError(f"grad={spec.mode!r}: the adjoint state became non-finite (NaN/Inf); "
                                     "for grad='adjoint' try adjoint_form='x0' or a finer adjoint grid. Under a "
                                     "GradScaler's loss scaling (float16 autocast) pass check_finite=False: the "
                                     "non-finite gradients then reach the scaler, which skips the step, as with "
                                     "grad='autograd'")
        if spec.grad_from:
            grad_x_T = None  # truncated: x_T is a constant of the differentiated steps
        return (None, grad_x_T, *grad_cond, *grad_noises, *grad_params)


class _DifferentiatedOnly(torch.autograd.Function):
    """`out` as plain autograd computed it, its backward pass reaching `leaves` only: a nested
    ``torch.autograd.grad`` of `out`'s own graph with respect to them (as torch.utils.checkpoint re-enters)."""

    @staticmethod
    def forward(ctx, held: list[Tensor], *leaves: Tensor) -> Tensor:
        ctx.out, ctx.leaves = held[0], leaves  # not an input: out's graph is reachable from here only
        return ctx.out.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        wanted = [i for i, leaf in enumerate(ctx.leaves) if leaf.requires_grad]
        grads = torch.autograd.grad(ctx.out, [ctx.leaves[i] for i in wanted], grad, allow_unused=True,
                                    create_graph=torch.is_grad_enabled())
        result = [None] * len(ctx.leaves)
        for i, g in zip(wanted, grads):
            result[i] = g
        ctx.out = ctx.leaves = None
        return (None, *result)


def differentiated_only(out: Tensor, leaves: list[Tensor]) -> Tensor:
    """`out` (a sample computed with plain autograd) whose gradients reach `leaves` and nothing else its graph holds
    (the model's other parameters, a closure's tensors): ``sample(grad="autograd", parameters=...)``."""
    if not out.requires_grad:
        return out
    return _DifferentiatedOnly.apply([out], *leaves)


def vjp_model(model):
    """The module to differentiate: DDP's wrapped module (its hooks would not fire on a VJP)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, ddp) else model


def reduce_across_ranks(model, grads: list[Tensor | None]) -> None:
    """Averages parameter gradients over the process group, as DDP's reducer would."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    import torch.distributed as dist

    group = model.process_group
    world = dist.get_world_size(group)
    present = [g for g in grads if g is not None]
    if not present:
        return
    flat = torch.cat([g.reshape(-1) for g in present])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in present:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _model_graph(spec: GradientSpec, x: Tensor, t: Tensor, cond_leaves, aliases: ParameterAliases | None,
                 row: int | None, rng=None) -> _ModelGraph:
    """Runs the model at x with grad enabled (see :func:`model_vjp`)."""
    model = vjp_model(spec.model)
    x_in = x.detach().requires_grad_(True)
    cond_in = _condition_inputs(cond_leaves)
    c = spec.conditioning.rebuild(cond_in)

    def output(module):
        with _autocasting(spec.autocast):
            with _replaying(rng, x.device):
                out = evaluate_model(module, x_in, t, c.cond, c.guidance_scale, c.uncond)
            return out if row is None else row_output(spec.plan, row, x_in, out)

    in_place = aliases is not None and aliases.module is not None
    out = output(aliases.module if in_place else model)
    if in_place and aliases.escaped(out):
        aliases.module, in_place = None, False
        out = output(model)
    return _ModelGraph(x_in, cond_in, out, aliases if in_place else None)


@contextlib.contextmanager
def _reentrant_checkpoint_named(mode: str):
    """Re-raises torch's refusal of ``torch.utils.checkpoint(..., use_reentrant=True)`` inside the model (it cannot
    be pulled back by ``torch.autograd.grad`` or ``backward(inputs=...)``, which every model VJP of grad="discrete"
    and "adjoint" is) as a RuntimeError saying what to change; the user never called either."""
    try:
        yield
    except RuntimeError as e:
        if "use_reentrant=True" not in str(e):
            raise
        raise RuntimeError(f"grad={mode!r} pulls each model call back with torch.autograd.grad (or backward with "
                           "inputs=), which torch.utils.checkpoint(use_reentrant=True) inside the model refuses; "
                           "pass use_reentrant=False to checkpoint (the same memory saving) or use "
                           "grad='autograd'") from e


def model_vjp(spec: GradientSpec, x: Tensor, t: Tensor, cond_leaves, params, cotangent_of_out,
              aliases: ParameterAliases | None = None, row: int | None = None, graph: _ModelGraph | None = None,
              rng: tuple | None = None, first: bool = False):
    """Re-runs the model at x with grad enabled and pulls a cotangent back.

    Args:
        row: the plan's row whose output is differentiated (:func:`adjointdeis.planning.row_output`: the
            thresholded x0 with thresholding); None: the model's output itself.
        cotangent_of_out: callable mapping the output's dtype to the cotangent tensor.
        aliases: optional :class:`ParameterAliases` of `params`: the model then runs as ``aliases.module`` and the
            parameters' gradients are added into ``aliases.grads`` in place, so no second parameter-sized set of
            gradients is alive at once and the user's module is not touched. When the forward reaches one of
            the user's parameters itself (see :meth:`ParameterAliases.escaped`), the aliases are dropped for
            this and later calls (``aliases.module`` becomes None) and the gradients are returned instead.
            An FSDP2 model (:func:`adjointdeis.models.fully_sharded`) is differentiated by a plain backward pass
            instead: FSDP's own hooks then add the (averaged) parameter gradients into the sharded parameters'
            ``.grad`` at every call, so None is returned for them.
        graph: the output already computed with its graph (x, t, `cond_leaves`, `aliases` and `row` then unused):
            pulled back without re-running the model; its graph is freed.
        rng: the global generators' state and buffer values the model runs from (:func:`_replaying`; None: as
            they are).
        first: the pass's first call, whose graph :func:`warn_unseen_leaves` walks.

    Returns:
        (vjp_x, [vjp_cond...], [vjp_param...]) with None where a leaf is not reached (and for
        every parameter when they were accumulated in place).

    Raises:
        RuntimeError when the output does not require grad.
    """
    with torch.enable_grad():
        if graph is None:
            graph = _model_graph(spec, x, t, cond_leaves, aliases, row, rng)
        x_in, cond_in, out = graph.x_in, graph.cond_in, graph.out
        if not out.requires_grad:
            raise RuntimeError(
                f"grad={spec.mode!r}: the model output does not depend on x or on any tensor that requires "
                "grad; is the model's output connected to its inputs?")
        cond_wrt = [c for c in cond_in if c.requires_grad]
        if first:
            warn_unseen_leaves(spec, out, [x_in, *cond_in, *params,
                                           *(graph.aliases.aliases if graph.aliases is not None else ())])
        with _reentrant_checkpoint_named(spec.mode):
            if graph.aliases is not None:  # (never for an FSDP2 model)
                torch.autograd.backward(out, cotangent_of_out(out), inputs=[x_in, *cond_wrt, *graph.aliases.aliases])
                grads = [x_in.grad] + [c.grad for c in cond_wrt] + [None] * len(params)
            elif params and fully_sharded(vjp_model(spec.model)):  # FSDP's post-backward hooks reduce-scatter into
                torch.autograd.backward(out, cotangent_of_out(out))  # the parameters' .grad (not with inputs=)
                grads = [x_in.grad] + [c.grad for c in cond_wrt] + [None] * len(params)
            else:
                grads = torch.autograd.grad(out, [x_in, *cond_wrt, *params], grad_outputs=cotangent_of_out(out),
                                            allow_unused=True)
    vjp_x = grads[0] if grads[0] is not None else torch.zeros_like(x_in)
    it = iter(grads[1:])
    vjp_cond = [next(it) if c.requires_grad else None for c in cond_in]
    vjp_params = list(it)
    return vjp_x, vjp_cond, vjp_params


def warn_unseen_leaves(spec: GradientSpec, out: Tensor, known: list[Tensor]) -> None:
    """Warns when `out`'s graph reaches tensors that require grad beyond `known` (the differentiated inputs and
    parameters), with the parameters taken by default: plain autograd would give them a gradient and this mode
    gives none (a model that is not an nn.Module holding one in a closure, or a module reached outside
    ``_modules``). One walk of one model call's graph."""
    if not spec.default_parameters:
        return
    known_ids = {id(t) for t in known}
    unseen = {id(leaf): leaf for leaf in graph_leaves(out) if id(leaf) not in known_ids}
    if unseen:
        shapes = ", ".join(str(list(t.shape)) for t in list(unseen.values())[:4])
        warnings.warn(f"grad={spec.mode!r}: the model reaches {len(unseen)} tensor(s) that require grad and are not "
                      f"among its parameters ({shapes}{', ...' if len(unseen) > 4 else ''}: e.g. a module in a "
                      "closure); they get no gradient here, unlike with grad='autograd'. Pass them in parameters= "
                      "to differentiate them, or parameters=[] (or requires_grad_(False)) to treat them as "
                      "constants", stacklevel=2)


def check_sharded(spec: GradientSpec, model, params: list[Tensor]) -> None:
    """Raises ValueError for what an FSDP2 model's parameter gradients cannot do: FSDP adds every VJP into
    ``.grad`` unscaled, so only grad="discrete" (whose parameter VJPs all have weight 1) and all the parameters
    that require grad (``parameters=`` a subset would not restrict FSDP's hooks)."""
    if spec.mode != "discrete":
        raise ValueError(f"grad={spec.mode!r} cannot differentiate the parameters of an FSDP2 (fully_shard) model: "
                         "FSDP adds each model VJP into .grad unscaled; use grad='discrete', or parameters=[]")
    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    if {id(p) for p in params} != wanted:
        raise ValueError("parameters= of an FSDP2 (fully_shard) model must be all its parameters that require grad "
                         "(FSDP's hooks fill every one); freeze the others with requires_grad_(False)")


def _accumulate(acc: list[Tensor | None], updates: list[Tensor | None], scale: Tensor) -> None:
    """acc[i] += scale * updates[i] for the updates present, one fused launch per dtype group."""
    groups = {}
    for i, u in enumerate(updates):
        if u is None:
            continue
        if acc[i] is None:
            acc[i] = torch.zeros(u.shape, dtype=accumulation_dtype(u.dtype), device=u.device)
        groups.setdefault((acc[i].dtype, u.dtype, u.device), []).append(i)
    for (_, _, device), index in groups.items():  # a model split over devices: the scale goes to each
        ops.multi_tensor_axpy_([acc[i] for i in index], [updates[i] for i in index], scale.to(device))


def _finish(acc: list[Tensor | None], like: list[Tensor]) -> list[Tensor | None]:
    return [None if a is None else a.to(t.dtype) for a, t in zip(acc, like)]


def discrete_adjoint(spec: GradientSpec, grad_x: Tensor, states: list[Tensor], cond_leaves, params,
                     grad_noises: list[Tensor | None] | None = None,
                     reuse: tuple[ParameterAliases | None, _ModelGraph | None] | None = None,
                     rng: list[tuple | None] | None = None):
    """Exact gradient of the computed sample (docs/math.md section 5.1): reverse pass over the plan's rows.

    Per row j, one model VJP at the recorded x_j with cotangent ``q_j gfull_j``, then one fused
    kernel (:func:`ops.discrete_adjoint_step`) for dL/dx_j and the adjoints of earlier outputs,
    and one fused accumulation of the conditioning and parameter adjoints. The rows before
    ``spec.grad_from`` are constants (truncation): the pass stops there, `states` holding the inputs of the
    rows from it on.

    Args:
        grad_noises: when given, one entry per noisy row, set to dL/dz of that row's noise,
            ``c_j xbar_{j+1}`` (docs/math.md section 5.6), in the noise's dtype; None for a truncated row.
        reuse: what the forward pass made (:func:`_forward_discrete`): the parameters' aliases, and the last row's
            output with its graph, pulled back there without re-running the model (None: re-run it); None: new
            aliases, and the model re-runs at every row.
        rng: per row, what the forward pass's model call there found (the global generators' state, the
            training-mode buffers it changed), set again for its re-run (:func:`_replaying`), or None where there
            is nothing to set; None: the re-runs run from the generators and buffers as they are.
    """
    plan = spec.plan.steps
    device = grad_x.device
    acc_dtype = accumulation_dtype(states[0].dtype)
    coeffs = plan.coeffs
    skip_weight, starts = _skip_operands(plan, coeffs)
    a, b0, b1, b2, c_noise, p, q = coeffs[:, :7].unbind(1)
    b3 = coeffs[:, 7] if coeffs.shape[1] > 7 else torch.zeros_like(a)
    noise_index = {row: k for k, row in enumerate(noisy_rows(spec.plan))}
    previous = lambda v: torch.cat([v.new_zeros(1), v[:-1]])  # row j-1's value at row j; 0 before row 0
    table = torch.stack([a, p, b1, b2, previous(b0), previous(q)], 1).to(device)
    one = torch.ones((), dtype=torch.float64, device=device)
    batch = states[0].shape[0]
    t_eval = torch.tensor(spec.plan.t_eval, dtype=torch.float64).to(device, dtype=opmath_dtype(states[0].dtype))
    last = len(plan) - 1
    xbar = grad_x.to(acc_dtype)
    gfull = float(b0[last]) * xbar
    cot = float(q[last]) * gfull
    pending, pending3, start_adjoint = None, None, {}
    acc_cond = [None] * len(cond_leaves)
    aliases, last_graph = reuse if reuse is not None else (ParameterAliases.of(vjp_model(spec.model), params), None)
    acc_params = [None] * len(params)
    for j in range(last, spec.grad_from - 1, -1):
        if grad_noises is not None and j in noise_index:
            grad_noises[noise_index[j]] = (float(c_noise[j]) * xbar).to(grad_x.dtype)  # xbar = dL/dx_{j+1}
        if starts[j] is not None:  # x_{j+1} reads the step's start state x_s: its partial adjoint e_j xbar_{j+1}
            part = skip_weight[j] * xbar
            start_adjoint[starts[j]] = part if starts[j] not in start_adjoint else start_adjoint[starts[j]] + part
        reaches_m3 = float(b3[j]) * xbar if plan.num_history[j] == 3 else None  # partial adjoint of m_{j-3}
        vjp_x, vjp_cond, vjp_params = model_vjp(spec, states[j - spec.grad_from], t_eval[j].expand(batch),
                                                cond_leaves, params, lambda out, c=cot: c.to(out.dtype), aliases,
                                                row=j, graph=last_graph, rng=None if rng is None else rng[j],
                                                first=j == last)
        last_graph = None  # row `last`'s, pulled back and freed
        _accumulate(acc_cond, vjp_cond, one)
        _accumulate(acc_params, vjp_params, one)  # all None when added in place
        vjp_x = vjp_x.to(acc_dtype)
        if j in start_adjoint:
            vjp_x = vjp_x + start_adjoint.pop(j)
        xbar, gfull, cot, pend_prev = ops.discrete_adjoint_step(xbar, vjp_x, gfull, pending, pending3, table[j])
        # rows of order >= 3 reach m_{j-2}; a four-term row's m_{j-3} term arrives one row later, as pend2
        pending = pend_prev if plan.num_history[j] >= 2 or pending3 is not None else None
        pending3 = reaches_m3
    if aliases is not None:  # added in place until the aliases were dropped (escaped), returned after
        acc_params = [a if g is None else g if a is None else g + a for a, g in zip(acc_params, aliases.grads)]
    return xbar.to(grad_x.dtype), _finish(acc_cond, cond_leaves), _finish(acc_params, params)


def _skip_operands(plan, coeffs: Tensor) -> tuple[list[float], list[int | None]]:
    """Per row, the weight of its step-start operand and the row whose input that state is (None: no such operand).

    The weight is zeroed in `coeffs` (in place), whose history columns the fused adjoint reads as outputs.
    """
    weights, starts, start = [], [], 0
    for j in range(len(plan)):
        start = j if plan.starts_step[j] else start
        if plan.skips(j):
            column = 2 + plan.num_history[j] if plan.num_history[j] < 2 else 7
            weights.append(float(coeffs[j, column]))
            starts.append(start)
            coeffs[j, column] = 0.0
        else:
            weights.append(0.0)
            starts.append(None)
    return weights, starts


def _ends_at_zero_noise(plan: SamplingPlan) -> bool:
    return plan.points[-1].sigma == 0.0


def _adjoint_step_coefficients(form: str, sde: bool, t: GridPoint, s: GridPoint):
    """(A, B, Bz, mx, mz) of one first-order AdjointDEIS step from t (cleaner) to s (noisier).

    x: a(s) = A a(t) + B V,  V = mx (a^T dD/dx)   z: a_z(s) = a_z(t) + Bz W,  W = mz (a^T dD/dz)
    with D = eps-hat (eps form, docs/math.md section 5.2) or x0-hat (x0 form, section 5.3). A step to pure
    noise (alpha_s = 0, a flow grid's t = 1) uses ``alpha_s e^{-h} = alpha_t sigma_s / sigma_t``, the exact limit
    of the x0 form there; the eps form divides by alpha_s and is refused.

    Raises:
        ValueError for the eps form at alpha_s = 0.
    """
    h = s.half_log_snr - t.half_log_snr  # < 0
    if s.alpha == 0.0:
        if form == "eps":
            raise ValueError("grad='adjoint': the grid starts at pure noise (alpha = 0, a flow grid's t = 1), where "
                             "the eps form divides by alpha; use adjoint_form='x0'")
        scaled = t.alpha * s.sigma / t.sigma  # alpha_s e^{-h}
        if not sde:
            return t.sigma / s.sigma, scaled / s.sigma**2, scaled / s.sigma, t.sigma**2, t.sigma
        return 0.0, 0.0, 2.0 * scaled / s.sigma, t.sigma**2, t.sigma
    if form == "eps":
        factor = 2.0 if sde else 1.0
        return (t.alpha / s.alpha, factor * s.sigma * math.expm1(h) / s.alpha**2,
                factor * s.sigma * math.expm1(h) / s.alpha, t.alpha**2, t.alpha)
    if not sde:
        return (t.sigma / s.sigma, s.alpha / s.sigma**2 * math.expm1(-h),
                s.alpha / s.sigma * math.expm1(-h), t.sigma**2, t.sigma)
    # SDE drift in x0 form, d x / d lambda = ((log sigma)' - 1) x + 2 alpha x0-hat.
    return (t.sigma**2 * s.alpha / (s.sigma**2 * t.alpha), -2.0 * h * s.alpha / s.sigma**2,
            2.0 * s.alpha / s.sigma * math.expm1(-h), t.sigma**2, t.sigma)


def continuous_adjoint(spec: GradientSpec, grad_x: Tensor, grid_states: list[Tensor], final: Tensor,
                       cond_leaves, params):
    """AdjointDEIS-1 / -2M (docs/math.md sections 5.2-5.3) along the adjoint grid, cleaner to noisier.

    Each step is one model VJP, one fused :func:`ops.multistep_step` for the state adjoint
    (``a(s) = A a(t) + B (w0 V_t + w1 V_prev)`` with ``V_t = mx (p a + vjp)`` kept as history) and
    fused accumulations of the conditioning and parameter adjoints.
    """
    cfg = spec.adjoint
    grid = spec.adjoint_grid.points
    prediction, sde = spec.plan.settings.prediction, spec.plan.settings.sde
    device = grad_x.device
    acc_dtype = accumulation_dtype(final.dtype)
    target = "eps" if cfg.form == "eps" else "x0"
    batch = final.shape[0]
    acc_cond, acc_params = [None] * len(cond_leaves), [None] * len(params)
    ends_at_zero = _ends_at_zero_noise(spec.plan)
    if ends_at_zero:
        grad_x = _last_step_vjp(spec, grad_x.to(acc_dtype), final, cond_leaves, params, acc_cond, acc_params)
    steps = list(range(len(grid) - 2, -1, -1))
    rows, z_scales, cot_scales, h_prev, mz_prev = [], [], [], None, None
    for k in steps:
        t, s = grid[k + 1], grid[k]
        p, q = conversion(prediction, target, t.alpha, t.sigma)
        A, B, Bz, mx, mz = _adjoint_step_coefficients(cfg.form, sde, t, s)
        h = s.half_log_snr - t.half_log_snr
        second = cfg.order == 2 and h_prev is not None and math.isfinite(h)  # first order into pure noise
        w0, w1 = (1.0 + 0.5 * h / h_prev, -0.5 * h / h_prev) if second else (1.0, 0.0)
        rows.append([A, B * w0, B * w1, 0.0, 0.0, mx * p, mx])
        z_scales.append([Bz * w0 * mz, 0.0 if mz_prev is None else Bz * w1 * mz_prev])  # W = mz * vjp
        cot_scales.append(q)
        h_prev, mz_prev = h, mz
    rows = torch.tensor(rows, dtype=torch.float64, device=device)
    z_scales = torch.tensor(z_scales, dtype=torch.float64, device=device)
    times = torch.tensor(spec.adjoint_grid.model_times, dtype=torch.float64).to(device, dtype=opmath_dtype(final.dtype))
    a_x, x_t = grad_x.to(acc_dtype), final
    hist_v, hist_vjp = None, None
    for i, k in enumerate(steps):
        t, s = grid[k + 1], grid[k]
        if cfg.states == "recorded":
            x_t = grid_states[k + 1]
        t_model = times[k + 1].expand(batch)
        cot = cot_scales[i] * a_x
        vjp_x, vjp_cond, vjp_params = model_vjp(spec, x_t, t_model, cond_leaves, params, lambda out: cot.to(out.dtype),
                                                first=i == 0 and not ends_at_zero)
        second_order = cfg.order == 2 and i > 0
        a_next, v_t = ops.multistep_step(a_x, vjp_x.to(acc_dtype), [hist_v] if second_order else [], rows[i])
        vjps = vjp_cond + vjp_params
        _accumulate_split(acc_cond, acc_params, vjps, z_scales[i, 0])
        if second_order:
            _accumulate_split(acc_cond, acc_params, hist_vjp, z_scales[i, 1])
        if cfg.states == "resolved":
            x_t = _ddim_inversion_step(spec, x_t, t_model, t, s, cond_leaves)
        a_x, hist_v, hist_vjp = a_next, v_t, vjps
    return a_x.to(grad_x.dtype), _finish(acc_cond, cond_leaves), _finish(acc_params, params)


def _last_step_vjp(spec: GradientSpec, grad_x: Tensor, x: Tensor, cond_leaves, params, acc_cond, acc_params) -> Tensor:
    """The exact VJP of a run's last row, the first-order step to zero noise from its input x, into the
    accumulators; returns dL/dx there (the continuous adjoint then starts from the grid's last time before zero).

    Raises:
        ValueError when that row reads a history (it cannot: a step to zero noise is first order).
    """
    steps = spec.plan.steps
    a, b0, _, _, _, p, q = steps.rows[-1]
    if steps.num_history[-1]:
        raise ValueError("grad='adjoint': the step to zero noise must be first order")
    t = torch.tensor(spec.plan.t_eval[-1], dtype=torch.float64).to(x.device, dtype=opmath_dtype(x.dtype))
    cot = (q * b0) * grad_x
    vjp_x, vjp_cond, vjp_params = model_vjp(spec, x, t.expand(x.shape[0]), cond_leaves, params,
                                            lambda out: cot.to(out.dtype), first=True)
    one = torch.ones((), dtype=torch.float64, device=x.device)
    _accumulate_split(acc_cond, acc_params, vjp_cond + vjp_params, one)
    return (a + b0 * p) * grad_x + vjp_x.to(grad_x.dtype)


def _accumulate_split(acc_cond, acc_params, updates, scale):
    _accumulate(acc_cond, updates[:len(acc_cond)], scale)
    _accumulate(acc_params, updates[len(acc_cond):], scale)


@torch.no_grad()
def _ddim_inversion_step(spec, x_t, t_model, t: GridPoint, s: GridPoint, cond_leaves):
    """x_s = (alpha_s / alpha_t) x_t + alpha_s (rho_s - rho_t) eps(x_t, t): DDIM run backwards."""
    pe, qe = conversion(spec.plan.settings.prediction, "eps", t.alpha, t.sigma)
    c = spec.conditioning.rebuild([leaf.detach() for leaf in cond_leaves])
    with _autocasting(spec.autocast):
        out = evaluate_model(vjp_model(spec.model), x_t, t_model, c.cond, c.guidance_scale, c.uncond)
    eps = pe * x_t + qe * out.to(x_t.dtype)
    return (s.alpha / t.alpha) * x_t + s.alpha * (s.rho - t.rho) * eps
