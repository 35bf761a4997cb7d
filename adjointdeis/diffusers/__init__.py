"""diffusers integration: a drop-in scheduler that runs adjointdeis' fused, differentiable steps.

``FusedMultistepScheduler`` (the scheduler; ``FusedDPMSolverMultistepScheduler``, ``FusedDEISMultistepScheduler``,
``FusedFlowMatchEulerDiscreteScheduler`` and ``FusedFlowMatchHeunDiscreteScheduler`` fix its family), ``denoise``
(a pipeline's loop with gradients) and
``schedule_from_config`` (our noise schedule for a scheduler config) all read diffusers configs through
:mod:`adjointdeis.diffusers.config`.

Needs the optional dependency diffusers (``pip install adjointdeis[diffusers]``).
"""

try:
    import diffusers as _diffusers  # noqa: F401
except ImportError as error:
    raise ImportError(
        "adjointdeis.diffusers needs the diffusers package, which could not be imported "
        f"({error}); install it with: pip install adjointdeis[diffusers]") from error

from .config import schedule_from_config
from .scheduler import (FusedDEISMultistepScheduler, FusedDPMSolverMultistepScheduler,
                        FusedFlowMatchEulerDiscreteScheduler, FusedFlowMatchHeunDiscreteScheduler,
                        FusedMultistepScheduler)
from .pipeline import denoise

__all__ = ["FusedDEISMultistepScheduler", "FusedDPMSolverMultistepScheduler", "FusedFlowMatchEulerDiscreteScheduler",
           "FusedFlowMatchHeunDiscreteScheduler", "FusedMultistepScheduler", "denoise", "schedule_from_config"]
