"""Calling models: classifier-free guidance, the conditioning's tensors, prediction adapters.

A model is called as ``model(x, t)`` or ``model(x, t, cond)`` and returns a tensor shaped like x;
``t`` has shape (batch,) in the schedule's model-time units; ``cond`` is a tensor or a dict of tensors
with a leading batch axis.
"""

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import validation
from .predictions import check_prediction, from_data_and_noise, to_data_and_noise
from .schedules import NoiseSchedule

Cond = Tensor | Mapping[str, Tensor] | None


@dataclass(frozen=True)
class Conditioning:
    """The conditioning of a sampling run, (cond, uncond, guidance_scale), flattened into leaf tensors and back.

    The leaves are what gradients flow to: the tensors of cond, then of uncond (a dict's in sorted key
    order), then a tensor guidance scale.
    """

    cond: object = None
    uncond: object = None
    guidance_scale: object = None

    def leaves(self) -> list[Tensor]:
        out = []
        for value in (self.cond, self.uncond):
            if isinstance(value, Mapping):
                out += [value[k] for k in sorted(value)]
            elif isinstance(value, Tensor):
                out.append(value)
        if isinstance(self.guidance_scale, Tensor):
            out.append(self.guidance_scale)
        return out

    def rebuild(self, leaves: list[Tensor]) -> "Conditioning":
        """The same structure with the tensors replaced by `leaves`, in the order of :meth:`leaves`."""
        it = iter(leaves)
        rebuilt = []
        for value in (self.cond, self.uncond):
            if isinstance(value, Mapping):
                rebuilt.append({k: next(it) for k in sorted(value)})
            elif isinstance(value, Tensor):
                rebuilt.append(next(it))
            else:
                rebuilt.append(value)
        w = next(it) if isinstance(self.guidance_scale, Tensor) else self.guidance_scale
        return Conditioning(rebuilt[0], rebuilt[1], w)


def model_parameters(model, parameters) -> list[Tensor]:
    """Parameters that receive gradients: the given ones, else the module's that require grad."""
    if parameters is not None:
        return [p for p in parameters if p.requires_grad]
    if isinstance(model, torch.nn.Module):
        return [p for p in model.parameters() if p.requires_grad]
    return []


def _shadow(module: torch.nn.Module, aliases: dict[int, Tensor],
            memo: dict[int, tuple[torch.nn.Module, torch.nn.Module]]) -> torch.nn.Module:
    """A shallow copy of `module` and its submodules whose parameters are looked up in `aliases` (by id).

    Each copy has its own ``_parameters``, ``_buffers`` and ``_modules`` dicts (the buffers themselves are shared),
    so nothing assigned during its forward reaches the original. A submodule registered twice is copied once;
    a ``torch.compile``'d module becomes a compiled module around the copy of its original, with the same compiler
    settings (dynamo's cache is keyed by code, so this does not recompile). `memo` maps each original's id to
    (original, copy).
    """
    if id(module) in memo:
        return memo[id(module)][1]
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded by torch.compile
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        copy = type(module)(_shadow(module._orig_mod, aliases, memo), module.dynamo_ctx)
    else:
        copy = object.__new__(type(module))
        state = copy.__dict__
        state.update(module.__dict__)
        state["_parameters"] = {k: None if v is None else aliases.get(id(v), v) for k, v in module._parameters.items()}
        state["_buffers"] = dict(module._buffers)
        memo[id(module)] = (module, copy)  # before the children: a submodule may hold its parent
        state["_modules"] = {k: None if v is None else _shadow(v, aliases, memo) for k, v in module._modules.items()}
    memo[id(module)] = (module, copy)
    return copy


def shadow(module: torch.nn.Module) -> torch.nn.Module:
    """`module` as a tree of shallow copies (:func:`_shadow`, the same parameters): what its forward assigns
    (attributes, replaced buffers) stays in the copies; buffers changed in place are the module's own."""
    return _shadow(module, {}, {})


_COPIED_DICTS = ("_parameters", "_buffers", "_modules")
_MISSING = object()


def synchronise(memo: dict[int, tuple[torch.nn.Module, torch.nn.Module]], back: bool) -> None:
    """Gives each copy of a :func:`_shadow` tree what its original holds now (``back=False``: before a call on the
    copies), or each original what its copy's forward assigned (``back=True``: after it): the attributes and
    buffers that are other objects on the other side (a counter incremented, a buffer replaced by a new tensor).
    The parameters (aliases in the copies) are left as they are."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    for original, copy in memo.values():
        if eval_frame is not None and isinstance(copy, eval_frame.OptimizedModule):
            continue  # its state is its compiled forward, bound to its own original (a copy among the others)
        source, target = (copy, original) if back else (original, copy)
        mine = target.__dict__
        for key, value in source.__dict__.items():
            if key not in _COPIED_DICTS and mine.get(key, _MISSING) is not value:
                mine[key] = value
        for key, value in source._buffers.items():
            if target._buffers.get(key, _MISSING) is not value:
                target._buffers[key] = value


def fully_sharded(model) -> bool:
    """Whether `model` is (or holds) a module sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``), whose
    hooks gather its parameters around every forward and reduce-scatter their gradients into the sharded
    parameters' ``.grad`` after every backward."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # loaded by fully_shard
    return (fsdp is not None and isinstance(model, torch.nn.Module)
            and any(isinstance(m, fsdp.FSDPModule) for m in model.modules()))


class ParameterAliases:
    """The user's module run on detached aliases of some of its parameters, without touching the module.

    The aliases share their parameters' storage and carry their own ``.grad``, so a backward pass with
    ``inputs=aliases`` adds the parameter gradients into it in place as each becomes ready: no second
    parameter-sized set of gradients is alive, the user's ``nn.Parameter`` objects and their ``.grad`` are never
    replaced or written, and concurrent calls (threads) share nothing mutable. The model runs as :attr:`module`, a
    shadow tree of shallow copies of the user's submodules (:func:`_shadow`).

    Attributes:
        params: the user's parameters; aliases: their aliases (requiring grad); module: the shadow module;
        copies: each submodule's (original, copy) (:func:`synchronise`).
    """

    def __init__(self, model: torch.nn.Module, params: list[Tensor]):
        self.params = params
        self.aliases = [p.detach().requires_grad_(True) for p in params]
        self.copies: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
        self.module = _shadow(model, {id(p): a for p, a in zip(params, self.aliases)}, self.copies)

    @staticmethod
    def of(model, params: list[Tensor]) -> "ParameterAliases | None":
        """Aliases of `params` in `model`, or None when they cannot accumulate in place: without parameters,
        a model that is not an nn.Module or is sharded (:func:`fully_sharded`: its hooks swap the parameters
        themselves), a parameter it does not own, or one not in float32/float64 (a
        gradient buffer has its parameter's dtype; half-precision parameters accumulate in float32 instead)."""
        if not params or not isinstance(model, torch.nn.Module) or fully_sharded(model):
            return None
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned or p.dtype not in (torch.float32, torch.float64) for p in params):
            return None
        return ParameterAliases(model, params)

    @property
    def grads(self) -> list[Tensor]:
        """The accumulated gradients, one per parameter (the aliases' ``.grad``; None for one not reached yet)."""
        return [alias.grad for alias in self.aliases]

    def escaped(self, out: Tensor) -> bool:
        """Whether `out`'s graph reaches one of the user's parameters itself rather than its alias (a forward
        that holds a submodule outside ``_modules``, or a parameter in a closure), whose gradient the aliases
        would miss. Walks the whole graph of every output: which parameters a forward reaches may change from
        call to call (a branch on t), at about 1% of a small UNet's forward and backward."""
        targets = {id(p) for p in self.params}
        return any(id(leaf) in targets for leaf in graph_leaves(out))


def graph_leaves(out: Tensor):
    """The leaf tensors that require grad in `out`'s autograd graph (each once per node reaching it), walked
    lazily from `out`."""
    seen, stack = set(), [out.grad_fn]
    mark, push = seen.add, stack.append  # bound once: 2.3x faster on a UNet's graph than a generator per node
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        mark(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            yield leaf
        for successor, _ in node.next_functions:
            push(successor)


class PredictionAdapter(torch.nn.Module):
    """Wraps a model so that it predicts `target` instead of `source` ("eps" | "x0" | "v" | "flow").

    Args:
        model: ``model(x, t[, cond])`` returning a `source`-type prediction.
        schedule: the schedule whose alpha/sigma relate x, x0 and eps at model time t
            (``t`` is interpreted through ``schedule.model_time``'s inverse: for every
            built-in schedule model time and schedule time coincide).
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, source: str, target: str):
        super().__init__()
        for name, value in (("source", source), ("target", target)):
            check_prediction(value, name)
        self.model, self.schedule, self.source, self.target = model, schedule, source, target

    def forward(self, x: Tensor, t: Tensor, *cond) -> Tensor:
        out = self.model(x, t, *cond)
        shape = (-1,) + (1,) * (x.dim() - 1)
        tt = t.detach().to(torch.float64).cpu()
        alpha = self.schedule.alpha(tt).to(x).view(shape)
        sigma = self.schedule.sigma(tt).to(x).view(shape)
        x0, eps = to_data_and_noise(out, x, alpha, sigma, self.source)
        return from_data_and_noise(x0, eps, alpha, sigma, self.target)


def _cat_conditioning(uncond: Cond, cond: Cond):
    if isinstance(cond, Mapping):
        return {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    return torch.cat([uncond, cond])


def check_conditioning(x: Tensor, cond: Cond, guidance_scale, uncond: Cond) -> None:
    """Checks a run's conditioning once, before the loop (:func:`evaluate_model` assumes it).

    Raises:
        ValueError / TypeError naming cond, uncond or guidance_scale: not None, a tensor or a dict of tensors;
        uncond without guidance; guidance without both branches, uncond not of cond's structure, or a branch
        without x's batch along its first dimension; a scale that is not a finite number or a floating tensor
        broadcastable to x.
    """
    validation.conditioning(cond, "cond")
    validation.conditioning(uncond, "uncond")
    if guidance_scale is None:
        if uncond is not None:
            raise ValueError("uncond is the unconditional branch of classifier-free guidance; pass guidance_scale "
                             "too (or leave uncond out)")
        return
    if cond is None or uncond is None:
        raise ValueError("guidance_scale needs both cond and uncond")
    validation.same_structure(cond, uncond)
    for name, branch in (("cond", cond), ("uncond", uncond)):  # concatenated along the batch, beside [x, x]
        for key, value in (branch.items() if isinstance(branch, Mapping) else [(None, branch)]):
            if value.dim() == 0 or value.shape[0] != x.shape[0]:
                label = name if key is None else f"{name}[{key!r}]"
                raise ValueError(f"with guidance, {label} must have x_T's batch of {x.shape[0]} along its first "
                                 f"dimension (the branches are concatenated beside [x, x]); got shape "
                                 f"{list(value.shape)}")
    validation.guidance_scale(guidance_scale, "guidance_scale", x.shape)


def evaluate_model(model: Callable, x: Tensor, t: Tensor, cond: Cond = None,
                   guidance_scale: float | Tensor | None = None, uncond: Cond = None) -> Tensor:
    """One model evaluation, with classifier-free guidance when `guidance_scale` is given.

    Guidance evaluates the unconditional and conditional branches in one batched call and
    returns ``out_uncond + w (out_cond - out_uncond)``.

    Args:
        x: (batch, *shape) state; t: (batch,) model time.
        cond, uncond: conditioning (tensor or dict of tensors with a leading batch axis).
        guidance_scale: scalar or tensor broadcastable to the output (per sample, per frame).

    Returns:
        (batch, *shape) model output.

    Raises:
        ValueError / TypeError if the model returns anything but a real floating-point tensor shaped like its x
        (:func:`adjointdeis.validation.model_output`; no host sync).
    """
    if guidance_scale is None:
        return validation.model_output(model(x, t) if cond is None else model(x, t, cond), x)
    doubled = torch.cat([x, x])
    both = validation.model_output(model(doubled, torch.cat([t, t]), _cat_conditioning(uncond, cond)), doubled)
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)
