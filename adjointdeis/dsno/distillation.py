"""DSNO distillation (an application of the DSNO model): teacher trajectories, the loss, the training loop.

    student = distill(teacher, sched, times=4, n_trajectories=10000, iters=3000, num_classes=10)
    trajectory = student(noise, cond)          # (B, T, C, H, W); trajectory[:, -1] is the sample

The teacher runs DPM-Solver++(2M) through the T trajectory times; the student, a :class:`~adjointdeis.dsno.DSNO`
around a copy of the teacher, regresses the teacher's data predictions at those times with the weight
``clamp(sqrt(SNR_t), 1, 1e4)`` (docs/math.md section 7.3). Checkpoints hold the student, the optimiser and the
data order's RNG, so an interrupted run resumes bit for bit.
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

from .. import validation
from ..planning import StepInfo, plan_sampling, run_plan
from ..predictions import to_data_and_noise
from ..schedules import NoiseSchedule
from ..zoo import read_weights
from ..zoo.training import seeded
from .model import DSNO, trajectory_times

# Offset of the teacher trajectories' noise seed, so that their noise is not the benchmarks' seed-0 noise. Added
# modulo 2**32: torch's CPU generator keeps only a seed's low 32 bits (an offset of 2**32 drew the same noise).
_TRAJECTORY_SEED = 0x7EAC4E25

__all__ = ["TeacherTrajectories", "distill", "dsno_loss", "teacher_trajectories"]


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
    validation.count(steps_per_time, "steps_per_time")
    validation.count(batch_size, "batch_size")
    times = sched.check_grid(times)
    t_max = sched.timesteps(1)[:1]
    lam = sched.half_log_snr(torch.cat([t_max, times]))
    pieces = [torch.linspace(float(lam[i]), float(lam[i + 1]), steps_per_time + 1, dtype=torch.float64)[1:]
              for i in range(len(times))]
    grid = sched.time_from_half_log_snr(torch.cat(pieces))
    grid[steps_per_time - 1::steps_per_time] = times  # exactly on the trajectory times
    grid = sched.check_grid(torch.cat([t_max, grid]))
    grid_at = [steps_per_time * (i + 1) for i in range(len(times))]
    plan = plan_sampling(sched, len(grid) - 1, "logsnr", tuple(grid.tolist()), False, solver, order, prediction)
    model_grid = torch.tensor(plan.model_times, dtype=torch.float64)
    targets = []
    chunks = range(0, len(noise), batch_size)
    for start in tqdm(chunks, desc="teacher trajectories", disable=None if progress else True):
        x_T = noise[start:start + batch_size]
        c = None if cond is None else cond[start:start + batch_size]
        states = []

        def record(info: StepInfo) -> None:
            if info.starts_step:
                states.append(info.x)

        with torch.no_grad():
            states.append(run_plan(model, x_T, plan, cond=c, callback=record))   # the grid states, then the last
            preds = []
            for at in grid_at:
                x = states[at]
                t = model_grid[at].expand(len(x)).to(x.device, x.dtype)
                out = model(x, t) if c is None else model(x, t, c)
                x0, _ = to_data_and_noise(out, x, plan.points[at].alpha, plan.points[at].sigma, prediction)
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


def _checkpoint_config(path: pathlib.Path, config: dict, meta: dict | None = None) -> None:
    """Raises ValueError unless the checkpoint at `path` is a safetensors file written with `config`."""
    if meta is None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as error:
            raise ValueError(f"checkpoint {path} is not a safetensors checkpoint ({error}); delete it or pass "
                             "resume=False") from None
    if json.loads(meta.get("config", "{}")) != config:
        raise ValueError(f"checkpoint {path} was written by a distillation with another configuration "
                         f"({meta.get('config')}); delete it or pass resume=False")


def _load_checkpoint(path: pathlib.Path, student: DSNO, opt: torch.optim.Optimizer, generator: torch.Generator,
                     config: dict) -> int:
    tensors, meta = read_weights(path)
    _checkpoint_config(path, config, meta)
    student.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(student.parameters()):
        state = {key.split(".", 2)[2]: v for key, v in tensors.items() if key.startswith(f"opt.{i}.")}
        state = {key: v if key == "step" else v.to(p.device) for key, v in state.items()}  # Adam's step: CPU
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
            Distillation runs on the device of its parameters (the noise is drawn on the CPU, for any device).
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
        checkpoint: a .safetensors path (in an existing folder) written every `checkpoint_every` steps and at the
            end (the student, the optimiser state, the data order's RNG); with `resume`, a run continues from it. The
            teacher trajectories are kept next to it (``<checkpoint>.teacher.safetensors``) and reused.
        data: precomputed teacher trajectories (skips generating them).
        seed: seeds the teacher trajectories' noise and labels, the student's temporal blocks and the data order
            (the caller's global generator is left as it was).

    Returns:
        The trained student in eval mode; ``student.sample(noise, cond)`` is one network evaluation.

    Raises:
        ValueError naming the argument, before any teacher trajectory is generated.
    """
    validation.integer(iters, "iters", 0)
    for name, value in (("n_trajectories", n_trajectories), ("batch_size", batch_size),
                        ("steps_per_time", steps_per_time), ("checkpoint_every", checkpoint_every)):
        validation.count(value, name)
    validation.real(lr, "lr", 0.0)
    validation.integer(seed, "seed")
    resume = validation.flag(resume, "resume")
    if num_classes is not None:
        validation.count(num_classes, "num_classes")
    times = trajectory_times(sched, times) if isinstance(times, int) else sched.check_grid(times)
    validation.integer(modes, "modes", 1, len(times) // 2 + 1)
    shape = _sample_shape(teacher_model) if shape is None else tuple(shape)
    data_config = dict(times=times.tolist(), n_trajectories=n_trajectories, prediction=prediction,
                       num_classes=num_classes, shape=list(shape), solver=solver, order=order,
                       steps_per_time=steps_per_time, seed=seed)
    config = dict(data_config, iters=iters, modes=modes, batch_size=batch_size, lr=lr)
    path = None if checkpoint is None else pathlib.Path(checkpoint)
    data_path = None if path is None else path.with_name(path.name + ".teacher.safetensors")
    if path is not None:
        if path.is_dir() or not path.parent.is_dir():
            raise ValueError(f"checkpoint must be a file name in an existing folder; got checkpoint={str(path)!r}")
        if resume and path.is_file():
            _checkpoint_config(path, config)   # a foreign or unreadable file fails now, not after the teacher runs
    if data is None and data_path is not None and resume and data_path.is_file():
        data = _load_teacher(data_path, data_config)
    device = next(teacher_model.parameters(), torch.empty(0)).device  # drawn on the CPU, run where the teacher is
    if data is None:
        g = torch.Generator().manual_seed((_TRAJECTORY_SEED + seed) % 2**32)   # not the benchmarks' seed-0 noise
        noise = torch.randn(n_trajectories, *shape, generator=g).to(device)
        cond = None if num_classes is None else torch.randint(0, num_classes, (n_trajectories,), generator=g)
        cond = None if cond is None else cond.to(device)
        data = teacher_trajectories(teacher_model, sched, times, noise, cond, prediction, solver, order,
                                    steps_per_time, progress=progress)
        if data_path is not None:
            from safetensors.torch import save_file
            save_file({k: v.cpu().contiguous() for k, v in data.tensors().items()}, str(data_path),
                      metadata={"config": json.dumps(data_config)})

    with seeded(seed):
        student = DSNO(copy.deepcopy(teacher_model), data.model_times, modes).to(device).train()
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
        cond = None if data.cond is None else data.cond[idx.to(data.cond.device)].to(device)
        idx = idx.to(data.noise.device)
        loss = dsno_loss(student, data.noise[idx].to(device), data.targets[idx].to(device), data.weights, cond)
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
    tensors, meta = read_weights(path)
    if json.loads(meta.get("config", "{}")) != config:
        raise ValueError(f"{path} holds teacher trajectories of another configuration; delete it or resume=False")
    return TeacherTrajectories(tensors["noise"], tensors.get("cond"), tensors["targets"], tensors["times"],
                               tensors["model_times"], tensors["weights"])
