"""adjointdeis: fused multistep samplers for diffusion and flow models, with gradients through sampling."""

from . import diagnostics, dsno, ops, reference
from .ctm import sample_ctm, score_from_ctm
from .dsno import FourierTemporalConv
from .guidance import guide
from .models import PredictionAdapter, evaluate_model
from .sampling import sample, sampling_grid
from .schedules import EDMSchedule, FlowSchedule, NoiseSchedule, VPSchedule
from .solvers import PREDICTIONS, SOLVERS, StepPlan, build_plan

__version__ = "0.1.0"

__all__ = [
    "EDMSchedule", "FlowSchedule", "FourierTemporalConv", "NoiseSchedule", "PREDICTIONS", "PredictionAdapter",
    "SOLVERS", "StepPlan", "VPSchedule", "build_plan", "diagnostics", "dsno", "evaluate_model", "guide", "ops",
    "reference", "sample", "sample_ctm", "sampling_grid", "score_from_ctm",
]
