"""adjointdeis: fused multistep samplers for diffusion and flow models, with gradients through sampling.

The public surface is below; the building blocks stay importable from their modules (``adjointdeis.solvers``
for the solver registry and coefficient tables, ``adjointdeis.planning`` for grids and the run loop,
``adjointdeis.predictions``, ``adjointdeis.gradients``, ...). docs/architecture.md maps the modules.
"""

from . import diagnostics, dsno, ops, reference
from .ctm import sample_ctm, score_from_ctm
from .dsno import FourierTemporalConv
from .gradients import AdjointOptions
from .guidance import ProbabilityRegularizer, guide
from .models import PredictionAdapter
from .planning import StepInfo, empty_cache
from .sampling import sample
from .schedules import EDMSchedule, FlowSchedule, NoiseSchedule, VPSchedule
from .thresholding import DynamicThreshold

__version__ = "0.1.0"

__all__ = [
    "AdjointOptions", "DynamicThreshold", "EDMSchedule", "FlowSchedule", "FourierTemporalConv", "NoiseSchedule", "PredictionAdapter",
    "ProbabilityRegularizer", "StepInfo", "VPSchedule", "diagnostics", "dsno", "empty_cache", "guide", "ops", "reference", "sample", "sample_ctm",
    "score_from_ctm",
]
