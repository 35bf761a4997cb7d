"""DSNO: one network evaluation maps noise to a whole sampling trajectory (operator learning).

    student = DSNO(backbone, times=4, modes=2, schedule=sched)
    trajectory = student(noise, cond)          # (B, T, C, H, W); trajectory[:, -1] is the sample

:class:`FourierTemporalConv` is the temporal layer (docs/math.md section 7), :class:`DSNO` the model around a
backbone UNet. Distilling a teacher into a student is an application:
:func:`adjointdeis.dsno.distillation.distill`.
"""

from .layer import FourierTemporalConv
from .model import DSNO, find_blocks, trajectory_times

__all__ = ["DSNO", "FourierTemporalConv", "find_blocks", "trajectory_times"]
