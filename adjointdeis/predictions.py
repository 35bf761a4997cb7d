"""What a model predicts, and the conversions between predictions (docs/math.md section 2).

A model evaluated at ``x = alpha x0 + sigma eps`` returns one of four quantities, each a fixed linear
combination ``out = u x0 + w eps`` of the clean data and the noise. :data:`PREDICTIONS` is the registry:
name -> :class:`Prediction`, whose weights ``(u, w)`` are all the conversions need. Every conversion is
affine in ``(x, out)``: ``target = p x + q out``, which is what keeps a solver step one fused kernel.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from . import validation


@dataclass(frozen=True)
class Prediction:
    """One kind of model output.

    Attributes:
        name: the registry key ("eps", "x0", "v", "flow").
        meaning: the output in terms of x0 and eps, for messages and docs.
        weights: ``(alpha, sigma) -> (u, w)`` with ``out = u x0 + w eps``.
    """

    name: str
    meaning: str
    weights: Callable[[float, float], tuple[float, float]]


PREDICTIONS: dict[str, Prediction] = {p.name: p for p in (
    Prediction("eps", "the noise eps", lambda alpha, sigma: (0.0, 1.0)),
    Prediction("x0", "the clean data x0", lambda alpha, sigma: (1.0, 0.0)),
    Prediction("v", "alpha eps - sigma x0", lambda alpha, sigma: (-sigma, alpha)),
    Prediction("flow", "the flow-matching velocity eps - x0", lambda alpha, sigma: (-1.0, 1.0)),
)}
# The quantities a solver can ask for, and the prediction that is that quantity itself.
TARGETS = {"x0": "x0", "eps": "eps", "velocity": "flow"}


def check_prediction(prediction: str, name: str = "prediction") -> Prediction:
    """The registry entry of `prediction`.

    Raises:
        ValueError naming `name` for an unknown prediction.
    """
    if not validation.known(prediction, PREDICTIONS):
        label = "prediction" if name == "prediction" else f"{name} prediction"
        raise ValueError(f"unknown {label} {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return PREDICTIONS[prediction]


def conversion(prediction: str, target: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(p, q) such that the `target` quantity is ``p x + q out`` for a `prediction`-type output.

    Args:
        prediction: what the model outputs, a key of :data:`PREDICTIONS`.
        target: "x0", "eps" or "velocity" (``eps - x0``).
        alpha, sigma: the schedule at the evaluation time.

    Returns:
        (p, q), floats.

    Raises:
        ValueError for an unknown prediction or a conversion that divides by zero.
    """
    u, w = check_prediction(prediction).weights(alpha, sigma)
    if TARGETS[target] == prediction:
        return 0.0, 1.0
    if target == "velocity":
        (pe, qe), (px, qx) = (conversion(prediction, k, alpha, sigma) for k in ("eps", "x0"))
        return pe - px, qe - qx
    # Solve x = alpha x0 + sigma eps, out = u x0 + w eps for x0 or eps.
    det = alpha * w - sigma * u
    if det == 0.0:
        raise ValueError(
            f"cannot convert a {prediction!r} prediction to {target!r} where {'alpha' if alpha == 0.0 else 'sigma'} "
            "is 0; start the grid below t = 1")
    if target == "x0":
        return w / det, -sigma / det
    return -u / det, alpha / det


def to_data_and_noise(out: Tensor, x: Tensor, alpha, sigma, prediction: str) -> tuple[Tensor, Tensor]:
    """(x0-hat, eps-hat) from a raw model output, for ``x = alpha x0 + sigma eps``.

    Args:
        out: (*shape) model output; x: (*shape) the state it was evaluated at.
        alpha, sigma: floats or tensors broadcastable to x.
        prediction: a key of :data:`PREDICTIONS`.

    Returns:
        (x0-hat, eps-hat), each shaped like x.

    Raises:
        ValueError for an unknown prediction.
    """
    u, w = check_prediction(prediction).weights(alpha, sigma)
    if prediction == "x0":
        return out, (x - alpha * out) / sigma
    if prediction == "eps":
        return (x - sigma * out) / alpha, out
    det = alpha * w - sigma * u
    return (w * x - sigma * out) / det, (alpha * out - u * x) / det


def from_data_and_noise(x0: Tensor, eps: Tensor, alpha, sigma, prediction: str) -> Tensor:
    """The output a `prediction`-type model gives for the pair (x0, eps): ``u x0 + w eps``.

    Raises:
        ValueError for an unknown prediction.
    """
    u, w = check_prediction(prediction).weights(alpha, sigma)
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    return w * eps + u * x0
