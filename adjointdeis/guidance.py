"""``guide``: optimise the initial noise, the injected noises and the conditioning through the sampler so the
sample meets a loss.

The AdjointDEIS use case (guided generation, e.g. face morphing with an identity loss) and direct noise
optimisation (DNO, Tang et al. 2025): the sample ``x_0 = Sampler(x_T, noises, cond)`` is differentiated with our
gradient modes and ``x_T``, the SDE's per-step noises and/or ``cond`` are updated by a torch optimiser, optionally
keeping each sample's ``x_T`` on its Gaussian shell or penalising noises that stop looking Gaussian
(:class:`ProbabilityRegularizer`).
"""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import validation
from .sampling import sample
from .schedules import NoiseSchedule

OPTIMIZE_TARGETS = ("x_T", "noise", "cond")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class GuideResult:
    """What :func:`guide` found.

    Attributes:
        sample: (batch, *shape) the sample from the optimised inputs (detached).
        x_T: (batch, *shape) the optimised initial noise (detached).
        cond: the optimised conditioning (tensor or dict of tensors, detached), or the given one.
        losses: loss value of every iteration, evaluated before that iteration's update.
        final_loss: the loss of `sample`.
        stopped_early: whether `tol` or `target_loss` ended the loop before `iters`.
        noise: (N, *shape) the per-step noises of a stochastic run (detached): the optimised ones when "noise"
            was optimised, else the ones drawn at the first iteration and kept for every later one; None for a
            run that injects none.
    """

    sample: Tensor
    x_T: Tensor
    cond: object
    losses: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    stopped_early: bool = False
    noise: Tensor | None = None


@dataclass(frozen=True)
class ProbabilityRegularizer:
    """DNO's probability regulariser (docs/math.md section 5.8): ``weight`` times minus the log of concentration
    bounds on how far noises that should be i.i.d. standard normal are from it.

    The noises are flattened into one vector and cut into rows of ``d = 4 ** subsample`` entries, M rows (a
    remainder shorter than a row is left out); for the rows in order and for `shuffles` random permutations of
    the vector, the rows' mean and second-moment matrix are compared with 0 and the identity.

    Attributes:
        weight: the regulariser's weight (DNO's gamma).
        subsample: d = 4 ** subsample entries per row.
        shuffles: random permutations averaged besides the ordered rows.
        generator: draws the permutations (the global generator when None).

    Raises:
        ValueError naming the attribute for a weight that is negative or not finite, a subsample < 0 or
        shuffles < 0; TypeError for a value of the wrong kind (a generator that is not a torch.Generator).
    """

    weight: float = 1.0
    subsample: int = 1
    shuffles: int = 100
    generator: torch.Generator | None = None

    def __post_init__(self):
        validation.real(self.weight, "ProbabilityRegularizer.weight", 0.0)
        for name in ("subsample", "shuffles"):
            validation.integer(getattr(self, name), f"ProbabilityRegularizer.{name}", 0)
        if self.generator is not None:
            validation.instance(self.generator, "ProbabilityRegularizer.generator", torch.Generator,
                                "a torch.Generator")

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        """The regulariser of `tensors` (any shapes, together at least d entries), a 0-d tensor.

        Raises:
            ValueError when they hold fewer than d entries.
        """
        flat = torch.cat([t.reshape(-1) for t in tensors])
        d = 4 ** self.subsample
        rows = flat.numel() // d
        if rows < 1:
            raise ValueError(f"ProbabilityRegularizer: {flat.numel()} noise entries, fewer than a row of "
                             f"d = 4 ** subsample = {d}")
        log_bound = gaussian_log_bound(flat[:rows * d].view(rows, d))
        if self.shuffles:
            shuffled = sum(gaussian_log_bound(flat[self._permutation(flat)][:rows * d].view(rows, d))
                           for _ in range(self.shuffles))
            log_bound = log_bound + shuffled / self.shuffles
        return -self.weight * log_bound

    def _permutation(self, flat: Tensor) -> Tensor:
        return torch.randperm(flat.numel(), generator=self.generator).to(flat.device)


def gaussian_log_bound(rows: Tensor) -> Tensor:
    """log P_mean + log P_cov, DNO's concentration bounds for M rows that should be draws of N(0, I_d).

    With m the rows' mean and C = rows^T rows / M: ``log P_mean = min(-M |m|^2 / (2 d), -log 2)``, and with
    ``delta = max(sqrt(1 + |C - I|_2) - 1 - sqrt(d / M), 0)`` (|.|_2 the spectral norm)
    ``log P_cov = min(-M delta^2 / 2, -log 2)`` (each bound ``2 exp(.)`` capped at probability 1).

    Args:
        rows: (M, d).

    Returns:
        0-d tensor.
    """
    count, d = rows.shape
    mean = rows.mean(0)
    second = rows.T @ rows / count
    cap = -math.log(2.0)
    log_mean = (-count * mean.square().sum() / (2 * d)).clamp(max=cap)
    deviation = torch.linalg.matrix_norm(second - torch.eye(d, dtype=rows.dtype, device=rows.device), ord=2)
    excess = (torch.sqrt(1 + deviation) - 1 - math.sqrt(d / count)).clamp(min=0)
    return log_mean + (-count * excess.square() / 2).clamp(max=cap)


def _leaf(value: Tensor, trainable: bool) -> Tensor:
    value = value.detach().clone()
    return value.requires_grad_(True) if trainable else value


def _copy_cond(cond, trainable: bool):
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: _leaf(v, trainable and v.is_floating_point()) if isinstance(v, Tensor) else v
                for k, v in cond.items()}
    if isinstance(cond, Tensor):
        return _leaf(cond, trainable and cond.is_floating_point())
    raise TypeError(f"cond must be a tensor or a dict of tensors, got {type(cond).__name__}")


def _cond_tensors(cond) -> list[Tensor]:
    """The floating-point tensors of cond (a tensor or a dict), those that "cond" optimises."""
    values = cond.values() if isinstance(cond, Mapping) else [cond]
    return [v for v in values if isinstance(v, Tensor) and v.is_floating_point()]


def _detached(cond):
    if isinstance(cond, Mapping):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in cond.items()}
    return None if cond is None else cond.detach()


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.detach().flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def _check_options(optimize, optimizer, iters, lr, clip_grad, tol, cond, regularizer) -> tuple[str, ...]:
    if optimize is None:
        optimize = ("x_T", "cond") if _cond_tensors(cond) else ("x_T",)
    if not isinstance(optimize, (str, Iterable)):
        raise validation.ArgumentTypeError(f"optimize must be a name or names from {', '.join(OPTIMIZE_TARGETS)}; "
                                           f"got optimize={optimize!r}")
    targets = (optimize,) if isinstance(optimize, str) else tuple(optimize)
    unknown = [t for t in targets if not validation.known(t, OPTIMIZE_TARGETS)]
    if unknown:
        raise ValueError(f"unknown optimize entry {unknown[0]!r}; choose from {', '.join(OPTIMIZE_TARGETS)}")
    if not targets:
        raise ValueError(f"optimize is empty; choose from {', '.join(OPTIMIZE_TARGETS)}")
    if "cond" in targets and not _cond_tensors(cond):
        raise ValueError("optimize includes 'cond' but no floating-point cond tensor was given")
    if regularizer is not None and not isinstance(regularizer, ProbabilityRegularizer):
        raise TypeError(f"regularizer must be a ProbabilityRegularizer, got {type(regularizer).__name__}")
    if regularizer is not None and not {"x_T", "noise"} & set(targets):
        raise ValueError("regularizer penalises optimised noise: optimize must include 'x_T' or 'noise'")
    validation.choice(optimizer, "optimizer", OPTIMIZERS)
    validation.count(iters, "iters")
    validation.positive(lr, "lr")
    if clip_grad is not None:
        validation.positive(clip_grad, "clip_grad")
    if tol is not None:
        validation.real(tol, "tol", 0.0)
    return targets


class _FixedNoise:
    """A ``noise(row, x)`` source that draws each row's noise once (from `source`, a ``noise(row, x)`` callable,
    else standard normal from `generator`) and gives the same tensor at every later run: guide's objective is
    then one function of what it optimises, and its sample is the one the returned inputs give."""

    def __init__(self, source: Callable | None, generator: torch.Generator | None):
        self.source, self.generator, self.rows = source, generator, {}

    def __call__(self, row: int, x: Tensor) -> Tensor:
        if row not in self.rows:
            self.rows[row] = (self.source(row, x) if self.source is not None else
                              torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype))
        return self.rows[row]

    def drawn(self) -> Tensor | None:
        """(N, *shape) the rows' noises in row order (detached), or None when the run injected none."""
        return torch.stack([self.rows[r] for r in sorted(self.rows)]).detach() if self.rows else None


def _initial_noise(model, x_T: Tensor, sched: NoiseSchedule, steps: int, cond, sample_kwargs: dict,
                   source: Callable | None = None) -> Tensor:
    """(N, *x_T.shape) the noises a run draws (from `source`, a ``noise(row, x)`` callable, else from
    ``sample_kwargs["generator"]``, removed from it), found by one sampling run without gradients.

    Raises:
        ValueError when the run injects no noise.
    """
    draws = _FixedNoise(source, sample_kwargs.pop("generator", None))
    with torch.no_grad():
        sample(model, x_T, sched, steps=steps, cond=_detached(cond), noise=draws, **sample_kwargs)
    start = draws.drawn()
    if start is None:
        raise ValueError("optimize includes 'noise' but the run injects none: pass sde=True (or solver='renoise')")
    return start


@torch.inference_mode(False)  # guide differentiates whatever the caller's context: it needs autograd on
@torch.enable_grad()
def guide(model: Callable, sched: NoiseSchedule, loss_fn: Callable[[Tensor], Tensor], x_T: Tensor, cond=None,
          optimize: str | Iterable[str] | None = None, steps: int = 20, iters: int = 50, lr: float = 0.05,
          optimizer: str = "adam", grad: str = "discrete", preserve_norm: bool = True,
          clip_grad: float | None = None, tol: float | None = None, target_loss: float | None = None,
          callback: Callable[[int, float, Tensor], None] | None = None, progress: bool = True,
          regularizer: ProbabilityRegularizer | None = None, **sample_kwargs) -> GuideResult:
    """Optimises x_T, the injected noises and/or cond so that ``loss_fn(sample(model, x_T, sched, cond=cond))`` is
    small.

    Each iteration samples with gradients (`grad`), evaluates the loss (plus the `regularizer` of the
    optimised noises), backpropagates to the optimised inputs, optionally clips their gradient, and takes one
    optimiser step; with `preserve_norm` each sample's x_T is then scaled back to its original norm (kept on its
    Gaussian shell, where a standard normal x_T concentrates). The model's own parameters are never
    differentiated (guide passes ``parameters=[]`` to sample), nor are `uncond`, a tensor
    `guidance_scale` or noises that are not optimised (their ``.grad`` is left alone). Gradients are enabled
    inside, so guide also works when called under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Args:
        model: ``model(x, t[, cond])`` as for ``adjointdeis.sample``.
        sched: the noise schedule.
        loss_fn: (batch, *shape) sample -> scalar tensor loss.
        x_T: (batch, *shape) initial noise; not modified (the optimised copy is returned).
        cond: conditioning, a tensor or dict of tensors (batch-leading); not modified.
        optimize: which inputs to optimise: any of "x_T", "noise" (the per-step noises of a stochastic run,
            ``sde=True`` or solver "renoise": DNO; they start as ``sample_kwargs["noise"]``: its tensors, or a
            ``noise(row, x)`` callable's draws; else as the draws of ``sample_kwargs["generator"]``) and "cond"
            (its floating-point tensors: a dict's all; class labels are not optimised). Default: x_T, and cond
            when it holds a floating-point tensor. A stochastic run's noise that is not optimised is drawn once,
            at the first iteration, and kept for every later one and the final sample (returned as
            :attr:`GuideResult.noise`).
        steps: sampling steps per iteration.
        iters: maximum number of iterations (optimiser steps), at least 1.
        lr: learning rate.
        optimizer: "adam" or "sgd".
        grad: gradient mode, "discrete" (exact), "adjoint" (AdjointDEIS) or "autograd".
        preserve_norm: keep each sample's x_T at its initial norm after every step.
        clip_grad: clip the joint gradient norm of the optimised tensors to this value.
        tol: stop when the loss changes by at most ``tol * max(|previous|, |current|, 1)`` between
            iterations (relative for losses above 1, absolute below, as scipy's ``ftol``).
        target_loss: stop as soon as the loss is at most this value.
        callback: ``callback(iteration, loss, sample)`` after each loss evaluation.
        progress: show a tqdm bar over iterations (hidden when not on a terminal).
        regularizer: DNO's :class:`ProbabilityRegularizer` of the optimised x_T and noises together, added to
            the loss (the losses reported include it).
        **sample_kwargs: passed to ``adjointdeis.sample`` (solver, order, spacing, prediction,
            uncond, guidance_scale, sde, generator...).

    Returns:
        :class:`GuideResult` with the final sample, the optimised x_T, noises and cond, and the loss history.

    Raises:
        ValueError for an unknown optimize entry or optimizer name, iters < 1, optimising "cond"
        without a cond, a non-positive lr or clip_grad, a loss that is not a real scalar tensor or does not depend
        on the sample, optimising "noise" of a run that injects none, a `regularizer` without optimised noise, or
        optimising "x_T" with a ``grad_steps`` truncation that never reaches the first step, or a
        ``parameters=`` in `sample_kwargs` other than an empty one;
        TypeError for a loss_fn that is not callable or an x_T that is not a floating-point tensor;
        FloatingPointError for a loss that is not finite.
    """
    validation.function(loss_fn, "loss_fn", "loss_fn(sample) -> scalar tensor")
    validation.floating(x_T, "x_T", min_dim=1)
    targets = _check_options(optimize, optimizer, iters, lr, clip_grad, tol, cond, regularizer)
    if target_loss is not None:
        validation.real(target_loss, "target_loss")
    if callback is not None:
        validation.function(callback, "callback", "callback(iteration, loss, sample)")
    validation.flag(preserve_norm, "preserve_norm")
    validation.flag(progress, "progress")
    if grad is None:
        raise ValueError("guide needs a gradient mode: grad='discrete', 'adjoint' or 'autograd'")
    parameters = sample_kwargs.get("parameters", ())
    if parameters is None or list(parameters):  # None: the module's own
        raise ValueError("guide optimises inputs (x_T, noise, cond), never the model's parameters: parameters= "
                         "would only build up their .grad over every iteration; leave it out (guide passes "
                         "parameters=[]), or fine-tune the model with sample(..., parameters=...) in a loop of "
                         "your own")
    truncation = sample_kwargs.get("grad_steps")
    most = truncation[1] if isinstance(truncation, tuple) and len(truncation) == 2 else truncation
    if "x_T" in targets and isinstance(most, int) and isinstance(steps, int) and most < steps:
        raise ValueError(f"guide: grad_steps={truncation!r} differentiates at most the last {most} of the {steps} "
                         "steps, so x_T would get no gradient; leave 'x_T' out of optimize (optimise the noise or "
                         "cond) or let grad_steps reach every step")
    x = _leaf(x_T, "x_T" in targets)
    cond_var = _copy_cond(cond, "cond" in targets)
    # Only what guide optimises is differentiated: the caller's uncond, guidance scale and (not optimised) noise
    # tensors get no .grad even when they require grad.
    # (Copies, not views: made here, outside the caller's inference mode, they can be saved for backward.)
    for key in ("uncond", "guidance_scale"):
        if isinstance(sample_kwargs.get(key), (Tensor, Mapping)):
            sample_kwargs[key] = _copy_cond(sample_kwargs[key], False)
    noise_var, fixed = None, None
    if "noise" in targets:
        given = sample_kwargs.pop("noise", None)
        if given is None or callable(given):
            start = _initial_noise(model, x_T.detach(), sched, steps, cond, sample_kwargs, given)
        elif isinstance(given, Tensor):
            start = given
        elif isinstance(given, (list, tuple)) and given and all(isinstance(n, Tensor) for n in given):
            start = torch.stack(list(given))
        else:
            raise validation.ArgumentTypeError("noise must be a noise(row, x) callable, a sequence of tensors or one "
                                               f"(N, *x_T.shape) tensor; got noise={given!r}")
        noise_var = _leaf(start, True)
        sample_kwargs["noise"] = noise_var
    elif isinstance(sample_kwargs.get("noise"), Tensor):
        sample_kwargs["noise"] = _leaf(sample_kwargs["noise"], False)
    elif isinstance(sample_kwargs.get("noise"), (list, tuple)):
        sample_kwargs["noise"] = [_leaf(n, False) if isinstance(n, Tensor) else n for n in sample_kwargs["noise"]]
    else:  # a stochastic run's noise (from a callable or the generator): drawn once, the same at every iteration
        source, generator = sample_kwargs.pop("noise", None), sample_kwargs.pop("generator", None)
        if source is not None and generator is not None:
            raise ValueError("guide: pass the noise either as noise= or drawn from generator=, not both")
        fixed = _FixedNoise(source, generator)
        sample_kwargs["noise"] = fixed
    trainable = ([x] if "x_T" in targets else []) + ([noise_var] if noise_var is not None else []) \
        + (_cond_tensors(cond_var) if "cond" in targets else [])
    penalised = ([x] if "x_T" in targets else []) + ([noise_var] if noise_var is not None else [])

    def objective(x0: Tensor) -> Tensor:
        loss = loss_fn(x0)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError("loss_fn must return a scalar tensor (one element, real floating point)"
                             + (f"; got dtype {loss.dtype}, shape {list(loss.shape)}" if isinstance(loss, Tensor)
                                else f"; got {type(loss).__name__}"))
        total = loss if regularizer is None else loss + regularizer(penalised)
        if torch.is_grad_enabled() and not total.requires_grad:
            raise ValueError("loss_fn returned a loss that does not depend on the sample (it has no gradient: "
                             "detached, or computed from .item()/numpy)")
        return total
    for tensor in trainable:
        tensor.requires_grad_(True)
    shell = _per_sample_norm(x) if preserve_norm and "x_T" in targets else None
    opt = OPTIMIZERS[optimizer](trainable, lr=lr)
    sample_kwargs.setdefault("parameters", [])

    def run(grad_mode):
        return sample(model, x, sched, steps=steps, cond=cond_var, grad=grad_mode, **sample_kwargs)

    losses: list[float] = []
    result, stopped = None, False
    bar = tqdm(range(iters), disable=None if progress else True, desc="guide", leave=False)
    for it in bar:
        opt.zero_grad(set_to_none=True)
        x0 = run(grad)
        loss = objective(x0)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"guide: the loss is {value} at iteration {it} (loss_fn"
                                     f"{' plus the regularizer' if regularizer is not None else ''} is not finite)")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        if callback is not None:
            callback(it, value, x0.detach())
        reached = target_loss is not None and value <= target_loss
        settled = (tol is not None and len(losses) > 1
                   and abs(losses[-2] - value) <= tol * max(abs(losses[-2]), abs(value), 1.0))
        if reached or settled:
            result, stopped = x0.detach(), True
            break
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(trainable, clip_grad)
        opt.step()
        if shell is not None:
            with torch.no_grad():
                x.mul_(shell / _per_sample_norm(x))
    bar.close()
    if result is None:
        with torch.no_grad():
            result = run(None)
            final_loss = float(objective(result))
    else:
        final_loss = losses[-1]
    return GuideResult(sample=result, x_T=x.detach(), cond=_detached(cond_var), losses=losses,
                       final_loss=final_loss, stopped_early=stopped,
                       noise=noise_var.detach() if noise_var is not None else fixed.drawn() if fixed is not None
                       else None)
