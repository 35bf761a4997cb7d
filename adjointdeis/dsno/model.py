"""The DSNO model: a backbone UNet whose blocks are each followed by a temporal Fourier block.

The noise is repeated over the T trajectory times, the backbone runs on the B*T slices with each slice told
its own time, and after every residual and attention block a :class:`~adjointdeis.dsno.FourierTemporalConv`
mixes the T slices (docs/math.md section 7). The backbone is left as it is: the student runs a copy of
its module tree in which the followed blocks are wrapped, sharing every parameter, buffer and block.
"""

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import validation
from ..reference import MAX_TIMES
from ..schedules import NoiseSchedule
from .layer import FourierTemporalConv


def _block_channels(module: nn.Module) -> int | None:
    """Output channels of a block a temporal layer follows, None for any other module.

    Blocks declare themselves with a ``temporal_channels`` attribute (the zoo's ``ResBlock``); diffusers'
    ``ResnetBlock2D`` and ``Attention`` are recognised by name.
    """
    declared = getattr(module, "temporal_channels", None)
    if declared is not None:
        return declared
    kind = type(module)
    if kind.__module__.startswith("diffusers."):
        if kind.__name__ == "ResnetBlock2D":
            return module.conv2.out_channels
        if kind.__name__ == "Attention":
            return module.out_dim
    return None


def find_blocks(backbone: nn.Module, channels: Callable[[nn.Module], int | None] = _block_channels
                ) -> list[tuple[str, nn.Module, int]]:
    """The blocks a temporal layer follows: ``(name, module, output channels)`` in forward-definition order.

    Args:
        channels: ``module -> output channels`` for the blocks to follow, None for the rest; the default
            follows blocks with a ``temporal_channels`` attribute and diffusers' ``ResnetBlock2D`` and
            ``Attention``.
    """
    found = []
    for name, module in backbone.named_modules():
        c = channels(module)
        if c is not None:
            found.append((name, module, int(c)))
    return found


class _Followed(nn.Module):
    """A block followed by a temporal block: its (B*T, C, H, W) output mixed along the T slices."""

    def __init__(self, block: nn.Module, temporal: FourierTemporalConv, name: str):
        super().__init__()
        self.block, self.temporal, self.name = block, temporal, name

    def forward(self, *args, **kwargs):
        output = self.block(*args, **kwargs)
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError(f"DSNO: block {self.name!r} returned {type(output).__name__} "
                             f"{tuple(getattr(output, 'shape', ()))}; temporal blocks need (B*T, C, H, W)")
        h = output.reshape(-1, self.temporal.n_times, *output.shape[1:])
        return self.temporal(h).reshape(output.shape)


def _rewired(module: nn.Module, replacements: dict[str, nn.Module], path: str, copies: list[nn.Module]) -> nn.Module:
    """`module`'s tree with the modules named in `replacements` swapped in: the modules on the way to them
    are shallow copies (listed in `copies`), everything else (blocks, parameters, buffers) is shared."""
    if path in replacements:
        return replacements[path]
    if not any(name.startswith(path + ".") or not path for name in replacements):
        return module
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else
                      _rewired(child, replacements, f"{path}.{name}" if path else name, copies)
                      for name, child in module._modules.items()}
    copies.append(clone)
    return clone


class DSNO(nn.Module):
    """A backbone UNet with a temporal Fourier block after each residual/attention block.

    Args:
        backbone: ``backbone(x, t)`` or ``backbone(x, t, cond)`` on (N, C, H, W) with t (N,) model times;
            an output with a ``.sample`` attribute (diffusers) is unwrapped. It becomes a submodule and is
            not modified (called alone it computes what it did before).
        times: (T,) model times of the trajectory points, noisiest first (slice i is told ``times[i]``),
            or the number T of points, placed by :func:`trajectory_times` on `schedule`.
        modes: Fourier modes kept along T (1 .. T//2+1).
        schedule: the teacher's schedule, needed when `times` is a number.
        channels: how to find the blocks (see :func:`find_blocks`).
        channelwise: temporal blocks without channel mixing.

    Raises:
        ValueError when no block is found, or for T < 2 or modes out of range.
    """

    def __init__(self, backbone: nn.Module, times: int | Sequence[float] | Tensor, modes: int = 2, *,
                 schedule: NoiseSchedule | None = None,
                 channels: Callable[[nn.Module], int | None] = _block_channels, channelwise: bool = False):
        super().__init__()
        validation.instance(backbone, "backbone", nn.Module, "an nn.Module")
        if not isinstance(times, Tensor) and not hasattr(times, "__len__"):
            times = validation.integer(times, "times", 2)
        if isinstance(times, int):
            validation.integer(times, "times", 2, MAX_TIMES)
            if schedule is None:
                raise ValueError(f"DSNO(times={times}) needs schedule= to place {times} trajectory times "
                                 "(or pass the model times themselves)")
            times = schedule.model_time(trajectory_times(schedule, times))
        times = torch.tensor(validation.reals(times, "times"), dtype=torch.float32)
        n_times = times.numel()
        if not 2 <= n_times <= MAX_TIMES:
            raise ValueError(f"times must hold 2 to {MAX_TIMES} trajectory times, got {n_times}")
        if not bool((times[1:] < times[:-1]).all()):
            raise ValueError(f"times must be strictly decreasing (noisiest first), got {times.tolist()}")
        validation.integer(modes, "modes", 1, n_times // 2 + 1)
        blocks = find_blocks(backbone, channels)
        if not blocks:
            raise ValueError(f"backbone {type(backbone).__name__} has no residual or attention block that DSNO "
                             "knows; pass channels=module -> output channels (or None) to name them")
        self.backbone = backbone
        self.n_times, self.modes = n_times, modes
        self.register_buffer("times", times)
        self.block_names = [name for name, _, _ in blocks]
        self.temporal = nn.ModuleList(
            FourierTemporalConv(c, c, n_times, modes, channelwise=channelwise) for _, _, c in blocks)
        followed = {name: _Followed(module, temporal, name)
                    for (name, module, _), temporal in zip(blocks, self.temporal)}
        copies = list(followed.values())
        # Kept out of the module registry: its parameters are the backbone's and the temporal blocks'.
        self.__dict__["_student"] = _rewired(backbone, followed, "", copies)
        self.__dict__["_copies"] = copies

    def train(self, mode: bool = True) -> "DSNO":
        super().train(mode)
        for module in self._copies:
            module.training = mode
        return self

    def forward(self, noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, C, H, W) noise (and optional (B, ...) conditioning) -> the (B, T, C, H, W) trajectory."""
        if validation.floating(noise, "noise").dim() != 4:
            raise ValueError(f"noise must be a (B, C, H, W) tensor, got {tuple(noise.shape)}")
        if cond is not None:
            validation.instance(cond, "cond", Tensor, "None or a (B, ...) tensor")
            if cond.dim() == 0 or len(cond) != len(noise):
                raise ValueError(f"cond must have noise's batch of {len(noise)} first, got {list(cond.shape)}")
        batch, T = noise.shape[0], self.n_times
        x = noise.unsqueeze(1).expand(batch, T, *noise.shape[1:]).reshape(batch * T, *noise.shape[1:])
        t = self.times.to(noise.device).repeat(batch)
        args = (x, t) if cond is None else (x, t, cond.repeat_interleave(T, dim=0))
        out = self._student(*args)
        out = getattr(out, "sample", out)
        return out.reshape(batch, T, *out.shape[1:])

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """The sample (B, C, H, W): the trajectory's last point, one network evaluation."""
        return self(noise, cond)[:, -1]


def trajectory_times(sched: NoiseSchedule, n_times: int, t_max: float | None = None,
                     t_min: float | None = None) -> Tensor:
    """T times uniform in log-SNR after ``t_max`` down to ``t_min`` (the schedule's ends by default).

    Returns:
        (T,) float64 schedule times, decreasing, the last one ``t_min``.

    Raises:
        ValueError for n_times < 2.
    """
    validation.integer(n_times, "n_times", 2)
    ends = sched.timesteps(1)
    t_max = float(ends[0]) if t_max is None else t_max
    t_min = float(ends[-1]) if t_min is None else t_min
    lam = torch.linspace(float(sched.half_log_snr(t_max)), float(sched.half_log_snr(t_min)), n_times + 1,
                         dtype=torch.float64)[1:]
    times = sched.time_from_half_log_snr(lam)
    times[-1] = t_min
    return sched.check_grid(times)
