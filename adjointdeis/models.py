"""Model adapters: prediction conversions and classifier-free guidance around any callable model.

A model is called as ``model(x, t)`` or ``model(x, t, cond)`` and returns a tensor shaped like x;
``t`` has shape (batch,) in the schedule's model-time units.
"""

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .schedules import NoiseSchedule
from .solvers import PREDICTIONS

Conditioning = Tensor | Mapping[str, Tensor] | None


def to_data_and_noise(out: Tensor, x: Tensor, alpha, sigma, prediction: str) -> tuple[Tensor, Tensor]:
    """(x0-hat, eps-hat) from a raw model output, for ``x = alpha x0 + sigma eps``.

    Args:
        out: (*shape) model output; x: (*shape) the state it was evaluated at.
        alpha, sigma: floats or tensors broadcastable to x.
        prediction: "eps" | "x0" | "v" (``alpha eps - sigma x0``) | "flow" (``eps - x0``).
    """
    if prediction == "eps":
        return (x - sigma * out) / alpha, out
    if prediction == "x0":
        return out, (x - alpha * out) / sigma
    if prediction == "v":
        norm = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * out) / norm, (sigma * x + alpha * out) / norm
    if prediction == "flow":
        norm = alpha + sigma
        return (x - sigma * out) / norm, (x + alpha * out) / norm
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def from_data_and_noise(x0: Tensor, eps: Tensor, alpha, sigma, prediction: str) -> Tensor:
    """The output a `prediction`-type model gives for the given (x0, eps) pair."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


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
            if value not in PREDICTIONS:
                raise ValueError(f"unknown {name} prediction {value!r}; choose one of {', '.join(PREDICTIONS)}")
        self.model, self.schedule, self.source, self.target = model, schedule, source, target

    def forward(self, x: Tensor, t: Tensor, *cond) -> Tensor:
        out = self.model(x, t, *cond)
        shape = (-1,) + (1,) * (x.dim() - 1)
        tt = t.detach().to(torch.float64).cpu()
        alpha = self.schedule.alpha(tt).to(x).view(shape)
        sigma = self.schedule.sigma(tt).to(x).view(shape)
        x0, eps = to_data_and_noise(out, x, alpha, sigma, self.source)
        return from_data_and_noise(x0, eps, alpha, sigma, self.target)


def _cat_conditioning(uncond: Conditioning, cond: Conditioning):
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise ValueError("uncond must be a dict with the same keys as cond")
        return {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    return torch.cat([uncond, cond])


def evaluate_model(model: Callable, x: Tensor, t: Tensor, cond: Conditioning = None,
                   guidance_scale: float | Tensor | None = None, uncond: Conditioning = None) -> Tensor:
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
        ValueError if the model returns a tensor of another shape.
    """
    if guidance_scale is None:
        out = model(x, t) if cond is None else model(x, t, cond)
    else:
        both = model(torch.cat([x, x]), torch.cat([t, t]), _cat_conditioning(uncond, cond))
        if both.shape[:1] != (2 * x.shape[0],):
            raise ValueError(
                f"the model returned shape {list(both.shape)} for a guided batch of shape "
                f"{[2 * x.shape[0], *x.shape[1:]]}")
        out_uncond, out_cond = both.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    if out.shape != x.shape:
        raise ValueError(f"the model returned shape {list(out.shape)} for x of shape {list(x.shape)}")
    return out
