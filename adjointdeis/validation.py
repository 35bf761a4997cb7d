"""The argument checks every public entry point shares: small typed checkers that raise naming the argument.

Each checker takes the value and the argument's name as the caller spells it (``"steps"``, ``"--lr"``,
``"scheduler config: beta_end"``), returns the value normalised (a Python ``int`` or ``float``, the tensor itself)
and raises :class:`ArgumentTypeError` (a ``TypeError`` that is also a ``ValueError``) for a value of the wrong
kind or ``ValueError`` for one out of range, with a message
``"<name> must be <what was expected>; got <name>=<value>"``. None of them reads a tensor's values (no host sync):
they look at types, dtypes and shapes only, so they are cheap enough for every model call. The layer map
(tests/test_architecture.py) puts this module with the kernels: everything may import it.
"""

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind: a ``TypeError`` that is also a ``ValueError``, so that code catching either
    for a bad argument catches it (as NumPy's ``AxisError`` is both a ``ValueError`` and an ``IndexError``)."""


def _shown(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"


def _fail(kind: type, name: str, expected: str, value) -> Exception:
    """``"<where>: <argument> must be <expected>; got <argument>=<value>"`` for a name ``"<where>: <argument>"``."""
    return kind(f"{name} must be {expected}; got {name.rpartition(': ')[2]}={_shown(value)}")


def integer(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (a Python or NumPy int, not a bool or float) in ``[minimum, maximum]``.

    Raises:
        ArgumentTypeError for a value that is not an integer; ValueError for one out of range.
    """
    if minimum == 1 and maximum is None:
        expected = "a positive integer"
    elif minimum is None:
        expected = "an integer" + ("" if maximum is None else f" <= {maximum}")
    else:
        expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, bool) or isinstance(value, Tensor):
        raise _fail(ArgumentTypeError, name, expected, value)
    try:
        number = operator.index(value)
    except TypeError:
        raise _fail(ArgumentTypeError, name, expected, value) from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _fail(ValueError, name, expected, value)
    return number


def count(value, name: str, minimum: int = 1) -> int:
    """A count: an integer >= `minimum` (steps, iterations, channels, modes)."""
    return integer(value, name, minimum)


def real(value, name: str, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
         high_open: bool = False) -> float:
    """A finite real number (a Python or NumPy number or a one-element real tensor, not a bool) in the interval.

    Args:
        low, high: the interval's ends; `low_open` / `high_open` exclude them.

    Raises:
        ArgumentTypeError for a value that is not a real number; ValueError for NaN, an infinity or a value outside.
    """
    parts = []
    if low > -math.inf:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high < math.inf:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    expected = "a finite number" + (f" {' and '.join(parts)}" if parts else "")
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or (
            isinstance(value, Tensor) and (value.numel() != 1 or value.is_complex() or value.dtype == torch.bool)):
        raise _fail(ArgumentTypeError, name, expected, value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(ArgumentTypeError, name, expected, value) from None
    inside = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not abs(number) < math.inf or not inside:  # math.isfinite, but also of a SymFloat (torch.compile, dynamic)
        raise _fail(ValueError, name, expected, value)
    return number


def positive(value, name: str) -> float:
    """A finite real number > 0 (a learning rate, a shift, a radius)."""
    return real(value, name, 0.0, low_open=True)


def probability(value, name: str) -> float:
    """A real number in [0, 1]."""
    return real(value, name, 0.0, 1.0)


def choice(value, name: str, choices: Iterable) -> object:
    """One of `choices` (a registry's names, an enumeration's values)."""
    options = tuple(choices)
    try:
        known = value in options
    except TypeError:
        known = False
    if not known:
        raise _fail(ValueError, name, f"one of {', '.join(repr(o) for o in options)}", value)
    return value


def flag(value, name: str) -> bool:
    """A bool (or a NumPy bool)."""
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(ArgumentTypeError, name, "True or False", value)
    return bool(value)


def instance(value, name: str, kind: type | tuple[type, ...], expected: str) -> object:
    """A value of type `kind`, described as `expected` in the message."""
    if not isinstance(value, kind):
        raise _fail(ArgumentTypeError, name, expected, value)
    return value


def function(value, name: str, signature: str) -> Callable:
    """A callable, described by its `signature` in the message (``"model(x, t[, cond]) -> Tensor"``)."""
    if not callable(value):
        raise _fail(ArgumentTypeError, name, f"callable as {signature}", value)
    return value


def floating(value, name: str, min_dim: int = 0) -> Tensor:
    """A real floating-point tensor (float64/32/16, bfloat16: not an integer, bool or complex one) of at least
    `min_dim` dimensions."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise _fail(ArgumentTypeError, name, "a real floating-point tensor", value)
    if value.dim() < min_dim:
        what = "a leading batch dimension" if min_dim == 1 else f"at least {min_dim} dimensions"
        raise _fail(ValueError, name, f"a floating-point tensor with {what}", value)
    return value


def shaped(value, name: str, shape: Sequence[int], like: str) -> Tensor:
    """A real floating-point tensor of exactly `shape` (that of the argument `like`)."""
    floating(value, name)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have {like}'s shape {list(shape)}; got shape {list(value.shape)}")
    return value


def broadcastable(value, name: str, shape: Sequence[int], like: str) -> Tensor:
    """A real floating-point tensor that broadcasts to `shape` (that of `like`) without changing it."""
    floating(value, name)
    try:
        fits = torch.broadcast_shapes(tuple(value.shape), tuple(shape)) == tuple(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} with shape {list(value.shape)} must broadcast to {like}'s shape {list(shape)}")
    return value


def model_output(out, x: Tensor, who: str = "the model") -> Tensor:
    """What a model returned at x: a real floating-point tensor of x's shape (checked without a host sync).

    Raises:
        ArgumentTypeError naming `who` for a non-tensor or an integer, bool or complex tensor; ValueError for another shape.
    """
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise ArgumentTypeError(f"{who} must return a real floating-point tensor shaped like x {list(x.shape)}; "
                        f"got {_shown(out) if isinstance(out, Tensor) else type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{who} returned shape {list(out.shape)} for x of shape {list(x.shape)}; it must return "
                         "a tensor shaped like x")
    return out


def conditioning(value, name: str) -> object:
    """None, a tensor or a mapping of names to tensors."""
    if value is None:
        return value
    for tensor in value.values() if isinstance(value, Mapping) else [value]:
        if not isinstance(tensor, Tensor):
            raise _fail(ArgumentTypeError, name, "None, a tensor or a dict of tensors", value)
    return value


def same_structure(cond, uncond, names: tuple[str, str] = ("cond", "uncond")) -> None:
    """`uncond` has the structure of `cond`: both tensors, or both mappings with the same keys, and each pair of
    tensors with the same shape after the batch dimension (so that the two branches concatenate)."""
    first, second = names
    if isinstance(cond, Mapping) != isinstance(uncond, Mapping):
        raise ArgumentTypeError(f"{second} must have the structure of {first} (both tensors or both dicts); got "
                        f"{type(cond).__name__} and {type(uncond).__name__}")
    if isinstance(cond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(f"{second} must be a dict with the same keys as {first}; got {sorted(map(str, uncond))} "
                             f"for {sorted(map(str, cond))}")
        pairs = [(f"{first}[{k!r}]", cond[k], f"{second}[{k!r}]", uncond[k]) for k in cond]
    else:
        pairs = [(first, cond, second, uncond)]
    for a_name, a, b_name, b in pairs:
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape[1:] != b.shape[1:]:
            raise ValueError(f"{b_name} with shape {list(b.shape)} must match {a_name}'s shape {list(a.shape)} "
                             "after the batch dimension")


def guidance_scale(value, name: str, shape: Sequence[int]) -> object:
    """A classifier-free guidance scale: a finite number, or a real floating-point tensor broadcastable to the
    output's `shape`."""
    if isinstance(value, Tensor):
        return broadcastable(value, name, shape, "the model output")
    return real(value, name)


def tensors(values, name: str) -> list[Tensor]:
    """An iterable of tensors, as a list."""
    if isinstance(values, Tensor) or not isinstance(values, Iterable):
        raise _fail(ArgumentTypeError, name, "an iterable of tensors", values)
    values = list(values)
    for k, value in enumerate(values):
        if not isinstance(value, Tensor):
            raise _fail(ArgumentTypeError, f"{name}[{k}]", "a tensor", value)
    return values


def reals(values, name: str) -> tuple[float, ...]:
    """A 1-D real tensor (any real dtype, any device: one host sync) or a sequence of real numbers, as floats.

    Raises:
        ArgumentTypeError for anything else (a string, a complex or multi-dimensional tensor, a non-number).
    """
    expected = "a 1-D real tensor or a sequence of numbers"
    if isinstance(values, Tensor):
        if values.is_complex() or values.dtype == torch.bool or values.dim() > 1:
            raise _fail(ArgumentTypeError, name, expected, values)
        return tuple(values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).tolist())
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise _fail(ArgumentTypeError, name, expected, values)
    try:
        return tuple(real_number(v) for v in values)
    except TypeError:
        raise _fail(ArgumentTypeError, name, expected, values) from None


def real_number(value) -> float:
    """float(value) for a real number (not a bool, string or complex); TypeError otherwise. NaN passes."""
    if isinstance(value, (bool, str, bytes, complex)) or (isinstance(value, Tensor) and value.is_complex()):
        raise TypeError(type(value).__name__)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(type(value).__name__) from None


def device(value, name: str) -> torch.device:
    """A torch.device, or a string or index torch.device reads (``"cpu"``, ``"cuda:1"``, 0); CUDA only where
    a CUDA device is available."""
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise _fail(ArgumentTypeError, name, "a torch.device or a device string such as 'cpu' or 'cuda'", value)
    try:
        found = torch.device(value)
    except RuntimeError:
        raise _fail(ValueError, name, "a torch.device or a device string such as 'cpu' or 'cuda'", value) from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise _fail(ValueError, name, "a device this machine has (no CUDA device is available)", value)
    return found


def known(value, registry) -> bool:
    """Whether `value` is a name of `registry` (a dict or tuple of names); False for unhashable values."""
    return isinstance(value, str) and value in registry
