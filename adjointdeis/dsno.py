"""DSNO: one network evaluation maps noise to a whole sampling trajectory (operator learning).

    student = ad.dsno.distill(teacher, sched, times=4, n_trajectories=10000, iters=3000, num_classes=10)
    trajectory = student(noise, cond)          # (B, T, C, H, W); trajectory[:, -1] is the sample

A :class:`DSNO` wraps a UNet (the zoo's :class:`~adjointdeis.zoo.networks.DigitsUNet` or a diffusers
``UNet2DModel``): the noise is repeated over the T trajectory times, the backbone runs on the B*T slices with
each slice told its own time, and a temporal block (:class:`~adjointdeis.FourierTemporalConv`, MATH section 7)
mixes the T slices after every residual and attention block. Distillation regresses the teacher's data
predictions at the T times with the weight ``clamp(sqrt(SNR_t), 1, 1e4)``.

The temporal layer runs as the fused op :func:`adjointdeis.ops.fourier_temporal_conv` (no FFT, no complex
tensor on the activations; see MATH section 7 and the op's docstring).
"""

import copy
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import ops
from .models import to_data_and_noise
from .sampling import run_plan, sampling_grid
from .schedules import NoiseSchedule
from .solvers import build_plan, resolve_order

_TRAJECTORY_SEED = 2**32  # offset of the teacher trajectories' noise seed

__all__ = ["DSNO", "FourierTemporalConv", "TeacherTrajectories", "distill", "find_blocks", "teacher_trajectories",
           "trajectory_times"]


ACTIVATIONS = ("leaky_relu", None)
NEGATIVE_SLOPE = 0.01


class FourierTemporalConv(nn.Module):
    """DSNO's temporal block on activations (B, T, C, H, W): ``y = x + LeakyReLU(layer(x))``.

    ``layer`` keeps the first ``modes`` bins of the rfft along T and multiplies bin k by a complex
    ``C_in x C_out`` matrix W_k (or, channel-wise, a complex scalar per channel), back through the
    irfft. It runs as the fused op ops.fourier_temporal_conv (one GEMM with a synthesised
    block-circulant kernel plus one epilogue pass; no FFT).

    The weight is stored as a real parameter (modes, C_in, C_out, 2) (channel-wise: (modes, C, 2)),
    real and imaginary parts last (safetensors holds no complex tensors), initialised small,
    uniform in [0, 1/(C_in C_out)) as in FNO/DSNO, so that a residual block starts close to the
    identity.

    Args:
        in_channels: C_in.
        out_channels: C_out (equal to in_channels when residual or channelwise).
        n_times: T, the trajectory points, in [2, 32].
        modes: bins kept, in [1, T // 2 + 1].
        residual: add the input (y = x + act(layer(x))).
        activation: "leaky_relu" (slope 0.01) or None.
        channelwise: per-channel complex multipliers instead of channel mixing.

    Raises:
        ValueError for an out-of-range or inconsistent argument.
    """

    def __init__(self, in_channels: int, out_channels: int, n_times: int, modes: int, residual: bool = True,
                 activation: str | None = "leaky_relu", channelwise: bool = False):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if not 2 <= n_times <= 32:
            raise ValueError(f"n_times must be in [2, 32], got {n_times}")
        if not 1 <= modes <= n_times // 2 + 1:
            raise ValueError(f"modes must be in [1, n_times // 2 + 1] = [1, {n_times // 2 + 1}], got {modes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if (residual or channelwise) and in_channels != out_channels:
            why = "residual" if residual else "channelwise"
            raise ValueError(f"{why}=True needs in_channels == out_channels, got {in_channels} and {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.n_times, self.modes = n_times, modes
        self.residual, self.activation, self.channelwise = residual, activation, channelwise
        shape = (modes, in_channels, 2) if channelwise else (modes, in_channels, out_channels, 2)
        self.weight = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialises the weight uniformly in [0, 1 / (C_in C_out))."""
        scale = 1.0 / (self.in_channels * (1 if self.channelwise else self.out_channels))
        with torch.no_grad():
            self.weight.uniform_(0.0, scale)

    def complex_weight(self, dtype: torch.dtype = torch.complex64) -> Tensor:
        """The weight as a complex tensor (modes, C_in, C_out) (channel-wise: (modes, C))."""
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        return torch.view_as_complex(self.weight.to(real).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block.

        Args:
            x: (B, n_times, in_channels, H, W), float64/float32/float16/bfloat16.

        Returns:
            (B, n_times, out_channels, H, W) in x's dtype.
        """
        if x.dim() != 5 or x.shape[1] != self.n_times or x.shape[2] != self.in_channels:
            raise ValueError(
                f"FourierTemporalConv: x must have shape (B, n_times={self.n_times}, "
                f"in_channels={self.in_channels}, H, W), got {list(x.shape)}"
            )
        weight = self.complex_weight(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        slope = NEGATIVE_SLOPE if self.activation == "leaky_relu" else None
        conv = ops.fourier_temporal_conv_channelwise if self.channelwise else ops.fourier_temporal_conv
        return conv(x, weight, self.modes, self.residual, slope)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, n_times={self.n_times}, modes={self.modes}, "
                f"residual={self.residual}, activation={self.activation!r}, channelwise={self.channelwise}")


def _block_channels(module: nn.Module) -> int | None:
    """Output channels of a residual or attention block of a known UNet, None for any other module."""
    from .zoo.networks import ResBlock

    kind = type(module)
    if isinstance(module, ResBlock):
        return module.conv2.out_channels
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
            knows the zoo's ``ResBlock`` and diffusers' ``ResnetBlock2D`` and ``Attention``.
    """
    found = []
    for name, module in backbone.named_modules():
        c = channels(module)
        if c is not None:
            found.append((name, module, int(c)))
    return found


class DSNO(nn.Module):
    """A backbone UNet with a temporal Fourier block after each residual/attention block.

    Args:
        backbone: ``backbone(x, t)`` or ``backbone(x, t, cond)`` on (N, C, H, W) with t (N,) model times;
            an output with a ``.sample`` attribute (diffusers) is unwrapped. It becomes a submodule.
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
        if isinstance(times, int):
            if schedule is None:
                raise ValueError(f"DSNO(times={times}) needs schedule= to place {times} trajectory times "
                                 "(or pass the model times themselves)")
            times = schedule.model_time(trajectory_times(schedule, times))
        times = torch.as_tensor(times, dtype=torch.float32).flatten()
        n_times = times.numel()
        if n_times < 2:
            raise ValueError(f"times must hold at least 2 trajectory times, got {n_times}")
        if not 1 <= modes <= n_times // 2 + 1:
            raise ValueError(f"modes must be in 1..{n_times // 2 + 1} for {n_times} times, got {modes}")
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
        self._active = False
        for index, (name, module, _) in enumerate(blocks):
            module.register_forward_hook(_TemporalHook(self, index, name))

    def forward(self, noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, C, H, W) noise (and optional (B, ...) conditioning) -> the (B, T, C, H, W) trajectory."""
        if not isinstance(noise, Tensor) or noise.dim() != 4:
            raise ValueError(f"noise must be a (B, C, H, W) tensor, got {tuple(getattr(noise, 'shape', ()))}")
        batch, T = noise.shape[0], self.n_times
        x = noise.unsqueeze(1).expand(batch, T, *noise.shape[1:]).reshape(batch * T, *noise.shape[1:])
        t = self.times.to(noise.device).repeat(batch)
        args = (x, t) if cond is None else (x, t, cond.repeat_interleave(T, dim=0))
        self._active = True
        try:
            out = self.backbone(*args)
        finally:
            self._active = False
        out = getattr(out, "sample", out)
        return out.reshape(batch, T, *out.shape[1:])

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """The sample (B, C, H, W): the trajectory's last point, one network evaluation."""
        return self(noise, cond)[:, -1]


class _TemporalHook:
    """The forward hook that applies temporal block `index` to a block's (B*T, C, H, W) output.

    An object rather than a closure, so that ``copy.deepcopy`` of a DSNO rebinds the copy's hooks to the copy.
    """

    def __init__(self, owner: DSNO, index: int, name: str):
        self.owner, self.index, self.name = owner, index, name

    def __call__(self, module, args, output):
        owner = self.owner
        if not owner._active:
            return output
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError(f"DSNO: block {self.name!r} returned {type(output).__name__} "
                             f"{tuple(getattr(output, 'shape', ()))}; temporal blocks need (B*T, C, H, W)")
        h = output.reshape(-1, owner.n_times, *output.shape[1:])
        return owner.temporal[self.index](h).reshape(output.shape)


def trajectory_times(sched: NoiseSchedule, n_times: int, t_max: float | None = None,
                     t_min: float | None = None) -> Tensor:
    """T times uniform in log-SNR after ``t_max`` down to ``t_min`` (the schedule's ends by default).

    Returns:
        (T,) float64 schedule times, decreasing, the last one ``t_min``.
    """
    if n_times < 2:
        raise ValueError(f"n_times must be >= 2, got {n_times}")
    ends = sched.timesteps(1)
    t_max = float(ends[0]) if t_max is None else t_max
    t_min = float(ends[-1]) if t_min is None else t_min
    lam = torch.linspace(float(sched.half_log_snr(t_max)), float(sched.half_log_snr(t_min)), n_times + 1,
                         dtype=torch.float64)[1:]
    times = sched.time_from_half_log_snr(lam)
    times[-1] = t_min
    return sched.check_grid(times)


@dataclass
class TeacherTrajectories:
    """What a DSNO student regresses: noise, conditioning, the teacher's data predictions at T times.

    Attributes:
        noise: (N, C, H, W) x_T; cond: (N,) labels or None; targets: (N, T, C, H, W) the teacher's x0
        predictions at `times`; times: (T,) float64 schedule times; model_times: (T,) float64 model times;
        weights: (T,) float64 loss weights ``clamp(sqrt(SNR), 1, 1e4)``.
    """

    noise: Tensor
    cond: Tensor | None
    targets: Tensor
    times: Tensor
    model_times: Tensor
    weights: Tensor

    def tensors(self) -> dict[str, Tensor]:
        out = dict(noise=self.noise, targets=self.targets, times=self.times, model_times=self.model_times,
                   weights=self.weights)
        if self.cond is not None:
            out["cond"] = self.cond
        return out


def teacher_trajectories(model: Callable, sched: NoiseSchedule, times: Tensor, noise: Tensor,
                         cond: Tensor | None = None, prediction: str = "eps", solver: str = "dpmpp",
                         order: int | None = None, steps_per_time: int = 5, batch_size: int = 500,
                         progress: bool = True) -> TeacherTrajectories:
    """Runs the teacher from each noise and records its data prediction at each of `times`.

    The teacher's grid runs from the schedule's ``t_max`` through every trajectory time, `steps_per_time`
    log-SNR-uniform steps between consecutive ones, as one multistep run; at each trajectory time one more
    model evaluation gives the data prediction ``x0-hat(x_t, t)``.
    """
    times = sched.check_grid(times)
    t_max = sched.timesteps(1)[:1]
    lam = sched.half_log_snr(torch.cat([t_max, times]))
    pieces = [torch.linspace(float(lam[i]), float(lam[i + 1]), steps_per_time + 1, dtype=torch.float64)[1:]
              for i in range(len(times))]
    grid = sched.time_from_half_log_snr(torch.cat(pieces))
    grid[steps_per_time - 1::steps_per_time] = times  # exactly on the trajectory times
    grid = sched.check_grid(torch.cat([t_max, grid]))
    grid_at = [steps_per_time * (i + 1) for i in range(len(times))]
    _, points = sampling_grid(sched, len(grid) - 1, timesteps=grid)
    plan = build_plan(points, solver if solver != "ddim" else "dpmpp", resolve_order(solver, order, False), prediction)
    model_grid = sched.model_time(grid)
    t_eval = model_grid[plan.eval_index]
    targets = []
    chunks = range(0, len(noise), batch_size)
    for start in tqdm(chunks, desc="teacher trajectories", disable=None if progress else True):
        x_T = noise[start:start + batch_size]
        c = None if cond is None else cond[start:start + batch_size]
        record = {"grid": []}
        with torch.no_grad():
            run_plan(model, x_T, plan, t_eval, cond=c, record=record)
            preds = []
            for i, at in enumerate(grid_at):
                x = record["grid"][at]
                t = model_grid[at].expand(len(x)).to(x.dtype)
                out = model(x, t) if c is None else model(x, t, c)
                x0, _ = to_data_and_noise(out, x, points[at].alpha, points[at].sigma, prediction)
                preds.append(x0)
        targets.append(torch.stack(preds, 1))
    snr_root = sched.alpha(times) / sched.sigma(times)
    return TeacherTrajectories(noise, cond, torch.cat(targets), times, sched.model_time(times),
                               snr_root.clamp(1.0, 1e4))


def dsno_loss(student: DSNO, noise: Tensor, targets: Tensor, weights: Tensor, cond: Tensor | None = None) -> Tensor:
    """sum_i w_i * mean((student_i - target_i)^2) / sum_i w_i over the T trajectory points."""
    err = (student(noise, cond) - targets).pow(2).flatten(2).mean((0, 2))
    w = weights.to(err)
    return (w * err).sum() / w.sum()


def _save_checkpoint(path: pathlib.Path, student: DSNO, opt: torch.optim.Optimizer, generator: torch.Generator,
                     iteration: int, config: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in student.state_dict().items()}
    for i, p in enumerate(student.parameters()):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    tensors["rng"] = generator.get_state()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"iteration": str(iteration), "config": json.dumps(config)})
    tmp.replace(path)


def _load_checkpoint(path: pathlib.Path, student: DSNO, opt: torch.optim.Optimizer, generator: torch.Generator,
                     config: dict) -> int:
    from .zoo import _load_state

    tensors, meta = _load_state(path)
    if json.loads(meta.get("config", "{}")) != config:
        raise ValueError(f"checkpoint {path} was written by a distillation with another configuration "
                         f"({meta.get('config')}); delete it or pass resume=False")
    student.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(student.parameters()):
        state = {key.split(".", 2)[2]: v for key, v in tensors.items() if key.startswith(f"opt.{i}.")}
        if state:
            opt.state[p] = state
    generator.set_state(tensors["rng"])
    return int(meta["iteration"])


def distill(teacher_model: nn.Module, sched: NoiseSchedule, times: int | Sequence[float] | Tensor = 4,
            n_trajectories: int = 10000, iters: int = 3000, *, modes: int = 2, prediction: str = "eps",
            num_classes: int | None = None, shape: Sequence[int] | None = None, solver: str = "dpmpp",
            order: int | None = None, steps_per_time: int = 5, batch_size: int = 64, lr: float = 5e-4,
            seed: int = 0, checkpoint: str | pathlib.Path | None = None, checkpoint_every: int = 250,
            resume: bool = True, data: TeacherTrajectories | None = None, progress: bool = True) -> DSNO:
    """Distils a teacher diffusion model into a one-evaluation DSNO student (the teacher's copy + temporal blocks).

    Args:
        teacher_model: ``model(x, t[, cond])`` predicting `prediction`; the student starts from a copy of it.
        sched: the teacher's schedule.
        times: the number T of trajectory points (log-SNR uniform, see :func:`trajectory_times`) or the
            schedule times themselves (decreasing; the last one is the sample's).
        n_trajectories: teacher trajectories generated (with `solver`, `steps_per_time` steps between
            consecutive trajectory times; DPM-Solver++(2M) by default).
        iters: optimiser steps (Adam, learning rate `lr` decayed to 0 along a cosine, batches of `batch_size`
            trajectories, gradient norm clipped at 1).
        num_classes: for a class-conditional teacher, labels are drawn uniformly from 0..num_classes-1.
        shape: the shape of one sample; default: the teacher's ``sample_shape`` attribute (the zoo's UNet has
            one) or, for a diffusers model, ``(in_channels, sample_size, sample_size)`` from its config.
        checkpoint: a .safetensors path written every `checkpoint_every` steps and at the end (the student,
            the optimiser state, the data order's RNG); with `resume`, a run continues from it. The teacher
            trajectories are kept next to it (``<checkpoint>.teacher.safetensors``) and reused.
        data: precomputed teacher trajectories (skips generating them).

    Returns:
        The trained student in eval mode; ``student.sample(noise, cond)`` is one network evaluation.
    """
    if iters < 0 or n_trajectories < 1 or batch_size < 1:
        raise ValueError("iters must be >= 0 and n_trajectories, batch_size >= 1")
    times = trajectory_times(sched, times) if isinstance(times, int) else sched.check_grid(times)
    shape = _sample_shape(teacher_model) if shape is None else tuple(shape)
    data_config = dict(times=times.tolist(), n_trajectories=n_trajectories, prediction=prediction,
                       num_classes=num_classes, shape=list(shape), solver=solver, order=order,
                       steps_per_time=steps_per_time, seed=seed)
    config = dict(data_config, iters=iters, modes=modes, batch_size=batch_size, lr=lr)
    path = None if checkpoint is None else pathlib.Path(checkpoint)
    data_path = None if path is None else path.with_name(path.name + ".teacher.safetensors")
    if data is None and data_path is not None and resume and data_path.is_file():
        data = _load_teacher(data_path, data_config)
    if data is None:
        g = torch.Generator().manual_seed(_TRAJECTORY_SEED + seed)   # not the benchmarks' seed-0 noise
        noise = torch.randn(n_trajectories, *shape, generator=g)
        cond = None if num_classes is None else torch.randint(0, num_classes, (n_trajectories,), generator=g)
        data = teacher_trajectories(teacher_model, sched, times, noise, cond, prediction, solver, order,
                                    steps_per_time, progress=progress)
        if data_path is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in data.tensors().items()}, str(data_path),
                      metadata={"config": json.dumps(data_config)})

    student = DSNO(copy.deepcopy(teacher_model), data.model_times, modes).train()
    student.requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    start = 0
    if path is not None and resume and path.is_file():
        start = _load_checkpoint(path, student, opt, generator, config)
    bar = tqdm(range(start, iters), desc="distilling", disable=None if progress else True,
               initial=start, total=iters)
    for it in bar:
        for group in opt.param_groups:   # cosine decay to zero, a function of the step alone (resumable)
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * it / iters))
        idx = torch.randint(0, len(data.noise), (batch_size,), generator=generator)
        cond = None if data.cond is None else data.cond[idx]
        loss = dsno_loss(student, data.noise[idx], data.targets[idx], data.weights, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if (it + 1) % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}")
        if path is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == iters):
            _save_checkpoint(path, student, opt, generator, it + 1, config)
    return student.eval()


def _sample_shape(model) -> tuple[int, ...]:
    if hasattr(model, "sample_shape"):
        return tuple(model.sample_shape)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels") and hasattr(config, "sample_size"):
        size = config.sample_size
        return (config.in_channels, *((size, size) if isinstance(size, int) else size))
    raise ValueError(f"cannot tell the sample shape of a {type(model).__name__}; pass shape=(C, H, W)")


def _load_teacher(path: pathlib.Path, config: dict) -> TeacherTrajectories:
    from .zoo import _load_state

    tensors, meta = _load_state(path)
    if json.loads(meta.get("config", "{}")) != config:
        raise ValueError(f"{path} holds teacher trajectories of another configuration; delete it or resume=False")
    return TeacherTrajectories(tensors["noise"], tensors.get("cond"), tensors["targets"], tensors["times"],
                               tensors["model_times"], tensors["weights"])
