"""``adjointdeis bench``: the benchmark cases that run from the installed package (an application).

The full benchmarks are scripts in the source repository (``bench/``, not in the wheel); they take their
shared pieces from here (:func:`eager_step`, :func:`tensor_peak_bytes`, :func:`bench_overhead` for
``bench/bench_sample.py``, :func:`cpu_name` for every table's machine), so each case has one implementation.
This module runs one case family of each
of the kernel, sampler-overhead and gradient benchmarks on the CPU, as one table of rows
``(section, case, metric, ours, baseline, baseline_name, ratio)``, ratio = baseline / ours:

- kernel: one DPM-Solver++(2M) step, the fused ``ops.multistep_step`` against the same update written
  as eager torch ops (float32, latents of 4 x 64 x 64);
- overhead: a whole ``sample`` call with a free model (it returns a precomputed tensor), per step, against
  diffusers' ``DPMSolverMultistepScheduler`` loop (``set_timesteps`` + ``step``), if diffusers is installed;
- gradients: dL/d(x_T, z) through 10 (and 20) DPM-Solver++(2M) steps of the shipped digits model, batch 16:
  time and peak live tensor memory of grad="discrete" and grad="adjoint" (AdjointDEIS-2M) against plain autograd.
"""

import contextlib
import datetime
import os
import platform
import sys

import torch
from torch.utils import benchmark

from . import __version__, ops
from ._extension import cpu_name
from .sampling import sample
from .schedules import VPSchedule

KERNEL_SIZES = [(4, 4, 64, 64), (16, 4, 64, 64)]
OVERHEAD_STEPS = [10, 25, 50]
GRADIENT_STEPS = [10, 20]
GRADIENT_BATCH = 16
OVERHEAD_SHAPE = (1, 4, 32, 32)
COLUMNS = ("section", "case", "metric", "ours", "baseline", "baseline_name", "ratio")


def _row(section, case, metric, ours, baseline, baseline_name):
    ratio = baseline / ours if baseline is not None and ours > 0 else None
    return dict(section=section, case=case, metric=metric, ours=ours, baseline=baseline,
                baseline_name=baseline_name, ratio=ratio)


def _seconds(fn, min_run_time: float) -> float:
    """Median seconds per call of fn (torch.utils.benchmark, after one warm-up call)."""
    fn()
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def eager_step(x, out, m1, a, b0, b1, p, q):
    """The DPM-Solver++(2M) update as a user writes it in torch: x, out, m1 (*shape) -> (x_next, m0)."""
    m0 = p * x + q * out
    return a * x + b0 * m0 + b1 * m1, m0


def bench_kernel(quick: bool = False) -> list[dict]:
    """One fused 2M step against eager torch: microseconds per step (float32)."""
    rows = []
    coeffs = torch.tensor([0.9, 0.05, -0.02, 0.0, 0.0, 1.1, -0.3], dtype=torch.float64)
    a, b0, b1, _, _, p, q = coeffs.tolist()
    for size in KERNEL_SIZES[:1] if quick else KERNEL_SIZES:
        g = torch.Generator().manual_seed(0)
        x, out, m1 = (torch.randn(size, generator=g) for _ in range(3))
        ours = _seconds(lambda: ops.multistep_step(x, out, [m1], coeffs, None), 0.2 if quick else 1.0)
        eager = _seconds(lambda: eager_step(x, out, m1, a, b0, b1, p, q), 0.2 if quick else 1.0)
        rows.append(_row("kernel", f"2M step {'x'.join(map(str, size))} float32", "us", ours * 1e6, eager * 1e6,
                         "eager torch"))
    return rows


def _diffusers_loop(steps, x, out):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++")

    def loop():
        scheduler.set_timesteps(steps)
        y = x
        for t in scheduler.timesteps:
            y = scheduler.step(out, t, y).prev_sample
        return y
    return loop


def bench_overhead(quick: bool = False, steps_list=OVERHEAD_STEPS, min_run_time: float | None = None) -> list[dict]:
    """Whole sampling loops with a free model: microseconds per step, ours against diffusers' scheduler loop.

    Args:
        quick: the first two step counts, shorter timing.
        steps_list: the step counts N.
        min_run_time: seconds per measurement (default 1, or 0.2 when quick).
    """
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
    sched = VPSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(OVERHEAD_SHAPE, generator=g), 0.1 * torch.randn(OVERHEAD_SHAPE, generator=g)

    def model(y, t):
        return out

    rows = []
    run_time = min_run_time or (0.2 if quick else 1.0)
    for steps in steps_list[:2] if quick else steps_list:
        ours = _seconds(lambda: sample(model, x, sched, steps=steps, spacing="linspace", denoise_to_zero=True),
                        run_time) / steps
        theirs = _seconds(_diffusers_loop(steps, x, out), run_time) / steps if have_diffusers else None
        rows.append(_row("overhead", f"sample() N={steps}, {'x'.join(map(str, OVERHEAD_SHAPE))}", "us/step",
                         ours * 1e6, None if theirs is None else theirs * 1e6,
                         "diffusers DPMSolverMultistep" if have_diffusers else "(diffusers not installed)"))
    return rows


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (the profiler's native start/stop log lines)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tensor_peak_bytes(fn) -> int:
    """Peak bytes of live CPU tensors during fn(), from the profiler's allocation and free events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def gradient_case(model, sched, x_T, z, steps, grad, **kwargs):
    """A function computing dL/d(x_T, z), L = sum(x_0^2), through `steps` DPM-Solver++(2M) steps."""
    def run():
        x = x_T.detach().requires_grad_(True)
        c = z.detach().requires_grad_(True)
        loss = sample(model, x, sched, steps=steps, cond=c, grad=grad, parameters=[], **kwargs).square().sum()
        return torch.autograd.grad(loss, [x, c])
    return run


def bench_gradients(quick: bool = False) -> list[dict]:
    """Gradient time (ms) and peak tensor memory (MiB) on the digits model; [] if its weights are missing."""
    from . import zoo

    try:
        entry = zoo.load("digits")
    except FileNotFoundError:
        return []
    model = entry.model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(GRADIENT_BATCH, *entry.shape, generator=g)
    z = model.class_embedding(torch.arange(GRADIENT_BATCH) % entry.num_classes)
    modes = {"discrete": dict(grad="discrete"), "adjoint-2M": dict(grad="adjoint", adjoint_order=2)}
    rows = []
    for steps in GRADIENT_STEPS[:1] if quick else GRADIENT_STEPS:
        baseline = gradient_case(model, entry.schedule, x_T, z, steps, "autograd")
        base_time = _seconds(baseline, 0.3 if quick else 1.0)
        base_peak = tensor_peak_bytes(baseline)
        for name, kwargs in modes.items():
            run = gradient_case(model, entry.schedule, x_T, z, steps, **kwargs)
            rows.append(_row("gradients", f"grad={name} N={steps} batch {GRADIENT_BATCH}", "ms",
                             _seconds(run, 0.3 if quick else 1.0) * 1e3, base_time * 1e3, "autograd"))
            rows.append(_row("gradients", f"grad={name} N={steps} batch {GRADIENT_BATCH}", "peak MiB",
                             tensor_peak_bytes(run) / 2**20, base_peak / 2**20, "autograd"))
    return rows


def run_all(quick: bool = False, progress=None) -> dict:
    """All sections; returns {"meta": {...}, "rows": [...]}. `progress(name)` is called before each section."""
    rows = []
    for name, section in (("kernel", bench_kernel), ("overhead", bench_overhead), ("gradients", bench_gradients)):
        if progress is not None:
            progress(name)
        rows += section(quick)
    meta = dict(adjointdeis=__version__, torch=torch.__version__, machine=platform.machine(),
                cpu=cpu_name(), threads=torch.get_num_threads(),
                cpus=os.cpu_count(), quick=quick, date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    return {"meta": meta, "rows": rows}


def format_table(result: dict) -> str:
    """The rows as one text table."""
    rows = result["rows"]
    lines = [f"{'section':<10}{'case':<34}{'metric':>9}{'ours':>11}{'baseline':>11}  {'ratio':>7}  baseline"]
    for r in rows:
        baseline = "" if r["baseline"] is None else f"{r['baseline']:.1f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"{r['section']:<10}{r['case']:<34}{r['metric']:>9}{r['ours']:>11.1f}{baseline:>11}  {ratio:>7}  "
                     f"{r['baseline_name']}")
    meta = result["meta"]
    lines.append(f"ratio = baseline / ours (above 1: ours faster or smaller); torch {meta['torch']}, "
                 f"{meta['threads']} thread(s), {meta['cpu']}")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """A bar chart of every row's ratio (baseline / ours), one bar per row (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in result["rows"] if r["ratio"] is not None]
    labels = [f"{r['section']}: {r['case']} ({r['metric']})" for r in rows]
    colours = {"kernel": "tab:blue", "overhead": "tab:orange", "gradients": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2), dpi=100)
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=[colours.get(r["section"], "grey") for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("baseline / ours (log scale; right of 1: ours faster or smaller)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
