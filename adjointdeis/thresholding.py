"""Dynamic thresholding of a data prediction (docs/math.md section 2.1), on the device without a host sync.

Imagen's dynamic thresholding (Saharia et al. 2022), as diffusers' schedulers apply it (``thresholding=True``,
``dynamic_thresholding_ratio``, ``sample_max_value``): per sample, ``s`` is the `ratio` quantile of ``|x0|`` over
all of its elements, clamped to ``[1, max_value]``, and ``x0`` is clamped to ``[-s, s]`` and divided by ``s``.
The quantile's rank depends only on the element count and the ratio, both known on the host, so the order
statistics are taken with ``topk`` at host-known positions: nothing is read back from the device, the whole
function compiles to one graph, and autograd differentiates it (the gradient reaches the two order statistics
the quantile interpolates between, and every element that is not clipped).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import validation


# torch.quantile's rank is the ratio rounded to the input's dtype times n - 1: multiplied in float64 since torch
# 2.14, in the input's dtype before (float32 ranks differ in the last bit, and so do the interpolated quantiles).
_RANK_IN_INPUT_DTYPE = torch.__version__ < (2, 14)


@dataclass(frozen=True)
class DynamicThreshold:
    """The settings of dynamic thresholding.

    Attributes:
        ratio: the quantile of ``|x0|`` per sample, in [0, 1] (diffusers' ``dynamic_thresholding_ratio``).
        max_value: the largest threshold, > 0 (``sample_max_value``); below 1 it is the threshold itself.

    Raises:
        ValueError naming the attribute for a value out of range.
    """

    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self):
        # Stored as the Python floats validated (a tensor or NumPy scalar given stays the caller's to change).
        object.__setattr__(self, "ratio",
                           validation.probability(self.ratio, "DynamicThreshold.ratio (dynamic_thresholding_ratio)"))
        # The threshold divides x0 in float32 (half and bfloat16 included): it must not underflow there.
        object.__setattr__(self, "max_value", validation.real(
            self.max_value, "DynamicThreshold.max_value (sample_max_value)", torch.finfo(torch.float32).tiny))

    def __call__(self, x0: Tensor) -> Tensor:
        return dynamic_threshold(x0, self.ratio, self.max_value)


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamically thresholded data prediction, diffusers' ``_threshold_sample`` without its host sync.

    Computed in float32 for half and bfloat16 inputs (as diffusers), the quantile interpolated linearly at rank
    ``ratio (n - 1)`` exactly as ``torch.quantile`` does, so the result is diffusers' bit for bit.

    Args:
        x0: (batch, ...) the data prediction (returned as it is when it has no elements).
        ratio: quantile of ``|x0|`` per sample, in [0, 1].
        max_value: upper clamp of the threshold (> 0).

    Returns:
        (batch, ...) the thresholded prediction, x0's dtype.
    """
    if x0.numel() == 0:
        return x0
    dtype = x0.dtype
    work = x0 if dtype in (torch.float32, torch.float64) else x0.float()
    flat = work.reshape(work.shape[0], -1)
    n = flat.shape[1]
    if work.dtype == torch.float64:
        rank = float(ratio) * (n - 1)
    elif _RANK_IN_INPUT_DTYPE:
        rank = float(np.float32(ratio) * np.float32(n - 1))
    else:
        rank = float(np.float32(ratio)) * (n - 1)
    lo, hi = int(math.floor(rank)), min(int(math.ceil(rank)), n - 1)
    top = flat.abs().topk(n - lo, dim=1).values  # descending: the last is the lo-th smallest
    s = top[:, -1]
    if hi != lo:
        s = torch.lerp(s, top[:, -1 - (hi - lo)], rank - lo)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)
