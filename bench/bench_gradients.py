"""Gradients through sampling: accuracy on the Gaussian oracle, memory and time on a small UNet, torchdiffeq.

Usage: python bench/bench_gradients.py [--quick] [--json PATH] [--only accuracy,memory,floor,baselines]

Sections:

- accuracy (docs/math.md section 5.4): Gaussian data N(0.7, 0.3^2) per dimension, VP linear schedule, t in [1e-3, 1],
  uniform-logSNR grid, L = sum(x_0). The PF-ODE map is affine with slope k(t_min)/k(t_max),
  k(t) = sqrt(alpha_t^2 s^2 + sigma_t^2), so the exact dL/dx_T is that slope in every dimension. The error
  |dL/dx_T - exact| of AdjointDEIS (eps and x0 forms, orders 1 and 2M) and of the exact discrete adjoint
  of DPM-Solver++(2M) is printed next to the reference values of docs/math.md section 5.4.
- memory (small diffusers UNet2DModel, class embedding "identity" as a differentiable conditioning z):
  dL/d(x_T, z, theta) through DPM-Solver++(2M) with grad="autograd", "discrete", "adjoint" (x0 form,
  order 2) and per-step ``torch.utils.checkpoint`` around each model call in a plain sampling loop.
  Memory is measured two ways: the peak of live tensor bytes from torch's CPU allocator (profiler memory
  events, exact) and the rise of the peak resident set (VmHWM) during one gradient in a fresh process per
  case (what the OS sees). Time per gradient is the best of interleaved rounds in one process, one thread
  by default (the machine is shared; see --threads), as process CPU time (insensitive to other processes
  on the machine) and as wall time.
- floor (the same UNet): grad="discrete" against "autograd" next to the least any exact gradient that keeps no
  activations can cost. Autograd runs N forward passes with grad (F each) and N backward passes (B); "discrete"
  runs N - 1 forward passes without grad (F_ng) and the last with grad (its graph kept for the reverse pass), then
  N - 1 re-runs with grad and N backward passes, so its floor is ``((N - 1) (F_ng + F) + F + N B) / (N (F + B))``,
  about ``1 + F / (F + B)`` for large N. F_ng, F and F + B are the mean of FLOOR_REPEATS model calls in a row (a
  single call's fastest time is not what a gradient's many calls average to: at 2 threads single calls spread 1.4x
  here), timed in the same interleaved rounds as the two gradients (process CPU time, and wall time beside it).
- baselines: torchdiffeq ``odeint_adjoint`` (dopri5) on the Gaussian PF-ODE in t, 4096 dimensions, next
  to our discrete adjoint.
"""

import argparse
import datetime
import json
import math
import multiprocessing
import os
import pathlib
import platform
import random
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import adjointdeis  # noqa: E402
from adjointdeis.benchmarks import tensor_peak_bytes  # noqa: E402
from adjointdeis.planning import plan_sampling, run_plan  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402
from memory import peak_rss_rise  # bench/memory.py

SECTIONS = ("accuracy", "memory", "floor", "baselines")

MU, S = 0.7, 0.3
T_MIN, T_MAX = 1e-3, 1.0
ACCURACY_STEPS = (5, 10, 20, 40, 80)
QUICK_ACCURACY_STEPS = (5, 10, 20)
ACCURACY_METHODS = {
    "eps-1": dict(grad="adjoint", adjoint_form="eps", adjoint_order=1),
    "eps-2M": dict(grad="adjoint", adjoint_form="eps", adjoint_order=2),
    "x0-1": dict(grad="adjoint", adjoint_form="x0", adjoint_order=1),
    "x0-2M": dict(grad="adjoint", adjoint_form="x0", adjoint_order=2),
    "discrete": dict(grad="discrete", lower_order_final=False),
    "discrete-lof": dict(grad="discrete", lower_order_final=True),
}
ADJOINT_COLUMNS = ("eps-1", "eps-2M", "x0-1", "x0-2M")
REFERENCE_TABLE = {  # docs/math.md section 5.4: the reference errors of dL/dx_T; None where it gives none.
    5: {"eps-1": 7.6e3, "eps-2M": 3.2e4, "x0-1": 0.26, "x0-2M": 0.24, "discrete": 0.024},
    10: {"eps-1": 0.55, "eps-2M": 4.9e2, "x0-1": 0.22, "x0-2M": 0.19, "discrete": 0.0086},
    20: {"eps-1": 0.30, "eps-2M": 1.6, "x0-1": 0.18, "x0-2M": 0.11, "discrete": 0.0039},
    40: {"eps-1": 0.25, "eps-2M": 0.19, "x0-1": 0.12, "x0-2M": 0.045, "discrete": 0.0010},
    80: {"eps-1": 0.16, "eps-2M": 0.038, "x0-1": 0.074, "x0-2M": 0.014, "discrete": None},
}
ACCURACY_TOLERANCE = 0.10
GAUSSIAN_DIM = 4096

MEMORY_STEPS = (5, 10, 20, 50)
QUICK_MEMORY_STEPS = (2, 5)
MEMORY_METHODS = ("autograd", "checkpoint", "discrete", "adjoint")
UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            class_embed_type="identity", norm_num_groups=32)
BATCH = 4
COND_DIM = 4 * UNET["block_out_channels"][0]  # UNet2DModel's time-embedding width
FLOOR_REPEATS = 5  # model calls in a row per timing of F_ng, F and F + B
FLOOR_ROUNDS = {False: 8, True: 2}  # interleaved rounds (with --quick): with 5, discrete/floor spread 0.93-1.11
TARGETS = {"growth": 0.10, "time_vs_autograd": 1.5, "time_vs_checkpoint": 1.1, "discrete_vs_autograd": 1.38}

DIFFEQ_TOLERANCES = (1e-3, 1e-5)
QUICK_DIFFEQ_TOLERANCES = (1e-3,)
DIFFEQ_OURS_STEPS = (10, 20, 40, 80)


class GaussianEps(nn.Module):
    """The exact noise prediction eps*(x, t) for data ~ N(mu, s^2) per dimension (docs/math.md section 6).

    x: (batch, dim), t: (batch,) -> (batch, dim).
    """

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule = schedule
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.s = torch.as_tensor(s, dtype=torch.float64)

    def forward(self, x, t):
        t = t.detach().to(torch.float64).cpu().view(-1, *([1] * (x.dim() - 1)))
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        return (sigma * (x - alpha * self.mu) / (alpha**2 * self.s**2 + sigma**2)).to(x.dtype)

    def slope(self, t_from, t_to):
        """d x_{t_to} / d x_{t_from} of the exact PF-ODE flow map, a float."""
        def k(t):
            t = torch.tensor(t, dtype=torch.float64)
            return torch.sqrt(self.schedule.alpha(t) ** 2 * self.s**2 + self.schedule.sigma(t) ** 2)

        return (k(t_to) / k(t_from)).item()


def gaussian_problem():
    sched = adjointdeis.VPSchedule.linear(t_min=T_MIN, t_max=T_MAX)
    model = GaussianEps(sched, MU, S)
    return sched, model, model.slope(T_MAX, T_MIN)


def gradient_error(model, sched, steps, exact, dim, **kwargs):
    """max |dL/dx_T - exact| over the dimensions, L = sum(x_0), float64; inf when the adjoint blew up."""
    x_T = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x_0 = adjointdeis.sample(model, x_T, sched, steps=steps, solver="dpmpp", order=2, spacing="logsnr",
                             parameters=[], **kwargs)
    try:
        x_0.sum().backward()
    except FloatingPointError:
        return math.inf, None
    return (x_T.grad - exact).abs().max().item(), x_T.grad


def run_accuracy(quick):
    sched, model, exact = gaussian_problem()
    steps = QUICK_ACCURACY_STEPS if quick else ACCURACY_STEPS
    rows = []
    for n in steps:
        errors = {name: gradient_error(model, sched, n, exact, GAUSSIAN_DIM, **kw)[0]
                  for name, kw in ACCURACY_METHODS.items()}
        _, grad_discrete = gradient_error(model, sched, n, exact, GAUSSIAN_DIM, grad="discrete")
        _, grad_autograd = gradient_error(model, sched, n, exact, GAUSSIAN_DIM, grad="autograd")
        discrete_vs_autograd = (grad_discrete - grad_autograd).abs().max().item()
        rows.append({"steps": n, "error": errors, "math": REFERENCE_TABLE[n], "discrete_vs_autograd": discrete_vs_autograd})
    return {"exact": exact, "dim": GAUSSIAN_DIM, "rows": rows}


def ratio(ours, theirs):
    if theirs is None:
        return None
    return ours / theirs


def print_accuracy(result):
    print(f"\n## Accuracy of dL/dx_T on the Gaussian oracle (docs/math.md section 5.4): exact {result['exact']:.6f}, "
          f"{result['dim']} dims, float64, L = sum(x_0)")
    print("ours / reference (ratio); 'discrete' is lower_order_final=False, 'discrete-lof' the default True")
    names = list(ACCURACY_METHODS)
    print(f"{'N':>3} " + " ".join(f"{name:>24}" for name in names) + f" {'|discrete-autograd|':>20}")
    for row in result["rows"]:
        cells = []
        for name in names:
            ours = row["error"][name]
            theirs = row["math"].get("discrete" if name == "discrete-lof" else name)
            r = ratio(ours, theirs)
            cell = f"{ours:.3g} / {'-' if theirs is None else f'{theirs:.2g}'}"
            cell += "" if r is None else f" ({r:.2f})"
            cells.append(f"{cell:>24}")
        print(f"{row['steps']:>3} " + " ".join(cells) + f" {row['discrete_vs_autograd']:>20.1e}")


def accuracy_targets(result):
    """(description, met, detail) for the adjoint columns and the discrete column against the reference."""
    checks = []
    groups = ((ADJOINT_COLUMNS, "AdjointDEIS columns"), (("discrete",), "discrete (lower_order_final=False)"),
              (("discrete-lof",), "discrete (lower_order_final=True, default)"))
    for columns, label in groups:
        worst = None
        for row in result["rows"]:
            for name in columns:
                theirs = row["math"].get("discrete" if name == "discrete-lof" else name)
                if theirs is None:
                    continue
                dev = abs(row["error"][name] / theirs - 1)
                if worst is None or dev > worst[0]:
                    worst = (dev, name, row["steps"])
        met = worst[0] <= ACCURACY_TOLERANCE
        checks.append((f"{label} within {100 * ACCURACY_TOLERANCE:.0f}% of docs/math.md 5.4 per entry", met,
                       f"worst {100 * worst[0]:.1f}% at {worst[1]} N={worst[2]}"))
    return checks


class UNetEps(nn.Module):
    """A small diffusers UNet2DModel as an eps model ``(x, t, z) -> eps``.

    x: (batch, 3, 16, 16); t: (batch,) schedule time in [0, 1], given to the UNet as 1000 t;
    z: (batch, COND_DIM) a conditioning vector added to the time embedding (class_embed_type "identity").
    """

    def __init__(self):
        super().__init__()
        from diffusers.models.unets.unet_2d import UNet2DModel

        self.unet = UNet2DModel(**UNET)

    def forward(self, x, t, z):
        return self.unet(x, t * 1000, class_labels=z).sample


def unet_problem(seed=0):
    """(model, x_T, z, target, sched): the UNet, its inputs and a fixed loss weight, all float32."""
    torch.manual_seed(seed)
    model = UNetEps()
    g = torch.Generator().manual_seed(seed)
    size = (BATCH, UNET["in_channels"], UNET["sample_size"], UNET["sample_size"])
    x_T = torch.randn(size, generator=g).requires_grad_(True)
    z = torch.randn(BATCH, COND_DIM, generator=g).requires_grad_(True)
    target = torch.randn(size, generator=g)
    return model, x_T, z, target, adjointdeis.VPSchedule.linear(t_min=T_MIN, t_max=T_MAX)


def checkpointed_sample(model, x_T, sched, steps, z):
    """DPM-Solver++(2M) as the plain run loop of fused steps, each model call under torch.utils.checkpoint.

    The same grid and coefficients as ``adjointdeis.sample(..., solver="dpmpp", order=2)``.
    x_T: (batch, *shape), z: (batch, COND_DIM) -> (batch, *shape).
    """
    plan = plan_sampling(sched, steps, "logsnr", None, False, "dpmpp", 2, "eps")

    def checkpointed(x, t, cond):
        return torch.utils.checkpoint.checkpoint(model, x, t, cond, use_reentrant=False)

    return run_plan(checkpointed, x_T, plan, cond=z, check_finite=False)


def unet_gradient(method, model, x_T, z, target, sched, steps):
    """One forward + backward: fills x_T.grad, z.grad and the UNet's parameter gradients."""
    if method == "checkpoint":
        x_0 = checkpointed_sample(model, x_T, sched, steps, z)
    else:
        kwargs = dict(adjoint_form="x0", adjoint_order=2) if method == "adjoint" else {}
        x_0 = adjointdeis.sample(model, x_T, sched, steps=steps, solver="dpmpp", order=2, cond=z, grad=method,
                                 **kwargs)
    (x_0 * target).sum().backward()


def zero_grads(model, *tensors):
    model.zero_grad(set_to_none=True)
    for t in tensors:
        t.grad = None


def rss_case(method, steps, threads):
    """Peak RSS rise (bytes) of one gradient; meant to run in a fresh process (see RSS_METHOD)."""
    torch.set_num_threads(threads)
    model, x_T, z, target, sched = unet_problem()
    unet_gradient(method, model, x_T, z, target, sched, 2)  # warm-up: lazy init of kernels and threads
    zero_grads(model, x_T, z)
    return peak_rss_rise(lambda: unet_gradient(method, model, x_T, z, target, sched, steps))[1]


def tensor_peak(method, model, x_T, z, target, sched, steps):
    """Peak bytes of live tensors from torch's CPU allocator during one gradient (see TENSOR_METHOD).

    Sums the profiler's allocation (+) and free (-) events in time order; the parameter gradients,
    allocated during the backward pass, are included.
    """
    zero_grads(model, x_T, z)
    return tensor_peak_bytes(lambda: unet_gradient(method, model, x_T, z, target, sched, steps))


TENSOR_METHOD = ("tensor peak: the highest sum of live tensor bytes from torch's CPU allocator during one "
                 "gradient (forward + backward), from the profiler's memory events (exact, in-process)")
RSS_METHOD = ("RSS peak: VmHWM - VmRSS around one gradient, lowest of 2 fresh processes per case (1 with --quick), "
              "each forked from a server that has only imported the modules, after a 2-step warm-up gradient, gc, "
              "malloc_trim and a VmHWM reset (/proc/self/clear_refs 5): what the OS sees, including malloc "
              "fragmentation and library scratch buffers")


def states_stored(method, steps):
    """Tensors the size of x_T that the method keeps from the forward pass."""
    return {"autograd": 0, "checkpoint": steps, "discrete": steps, "adjoint": steps + 1}[method]


def run_memory(quick, threads):
    steps_list = QUICK_MEMORY_STEPS if quick else MEMORY_STEPS
    cases = [(method, steps) for steps in steps_list for method in MEMORY_METHODS]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "adjointdeis", "diffusers.models.unets.unet_2d", __name__])
    rss_runs = {case: [] for case in cases}
    for _ in range(1 if quick else 2):
        for case in cases:
            with context.Pool(1, maxtasksperchild=1) as pool:
                rss_runs[case].append(pool.apply(rss_case, (*case, threads)))
            print(f"  RSS {case[0]} N={case[1]}: {rss_runs[case][-1] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    rss = {case: min(runs) for case, runs in rss_runs.items()}

    model, x_T, z, target, sched = unet_problem()
    state_bytes = x_T.numel() * x_T.element_size()
    for method in MEMORY_METHODS:  # warm-up
        unet_gradient(method, model, x_T, z, target, sched, 2)
    tensors = {case: tensor_peak(case[0], model, x_T, z, target, sched, case[1]) for case in cases}
    model.requires_grad_(False)
    frozen = {m: tensor_peak(m, model, x_T, z, target, sched, steps_list[-1]) for m in MEMORY_METHODS}
    model.requires_grad_(True)

    rounds = 1 if quick else 3
    seconds, cpu_seconds = {}, {}
    for _ in range(rounds):
        for case in cases:
            zero_grads(model, x_T, z)
            start, cpu_start = time.perf_counter(), time.process_time()
            unet_gradient(case[0], model, x_T, z, target, sched, case[1])
            cpu_seconds[case] = min(cpu_seconds.get(case, math.inf), time.process_time() - cpu_start)
            seconds[case] = min(seconds.get(case, math.inf), time.perf_counter() - start)
        print("  timed one round", file=sys.stderr, flush=True)

    def gradients(method, steps):
        zero_grads(model, x_T, z)
        unet_gradient(method, model, x_T, z, target, sched, steps)
        return [x_T.grad.clone(), z.grad.clone(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])]

    def rel(a, b):
        return max(((u - v).norm() / v.norm()).item() for u, v in zip(a, b))

    agreement = {}
    for steps in (steps_list[0], steps_list[-1]):
        reference = gradients("autograd", steps)
        methods = MEMORY_METHODS[1:] if steps == steps_list[0] else ("adjoint",)
        agreement.update({f"{m} N={steps}": rel(gradients(m, steps), reference) for m in methods})

    rows = []
    for method, steps in cases:
        stored = states_stored(method, steps) * state_bytes
        rows.append({"method": method, "steps": steps, "tensor_peak": tensors[(method, steps)],
                     "rss_peak": rss[(method, steps)], "rss_runs": rss_runs[(method, steps)], "states_bytes": stored, "time": seconds[(method, steps)],
                     "cpu_time": cpu_seconds[(method, steps)]})
    return {"rows": rows, "state_bytes": state_bytes, "rounds": rounds, "agreement": agreement,
            "frozen_tensor_peak": frozen,
            "parameters": sum(p.numel() for p in model.parameters()),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "methods": [TENSOR_METHOD, RSS_METHOD]}


def run_floor(quick, threads):
    """grad="discrete" and "autograd" per gradient, and the single model calls their floor is made of."""
    steps_list = QUICK_MEMORY_STEPS if quick else MEMORY_STEPS
    model, x_T, z, target, sched = unet_problem()
    x, t = x_T.detach(), torch.full((BATCH,), 0.5)

    def without_grad():
        with torch.no_grad():
            model(x, t, z)

    def forward_backward():
        model(x, t, z).backward(target)

    def repeated(fn):  # the mean of FLOOR_REPEATS calls in a row, as a gradient makes them
        def calls_in_a_row():
            for _ in range(FLOOR_REPEATS):
                fn()
        return calls_in_a_row

    calls = {"F_ng": repeated(without_grad), "F": repeated(lambda: model(x, t, z)), "F+B": repeated(forward_backward)}
    gradients = {(method, n): (lambda m=method, n=n: unet_gradient(m, model, x_T, z, target, sched, n))
                 for n in steps_list for method in ("autograd", "discrete")}
    for fn in [*calls.values(), *gradients.values()]:  # warm-up
        fn()
    best, wall = {}, {}
    order, shuffle = [*calls.items(), *gradients.items()], random.Random(0).shuffle
    for _ in range(FLOOR_ROUNDS[quick]):
        shuffle(order)  # in a new order each round: no case always runs after the same one, or early in a round
        for name, fn in order:
            zero_grads(model, x_T, z)
            start, wall_start = time.process_time(), time.perf_counter()
            fn()
            calls_made = FLOOR_REPEATS if name in calls else 1
            best[name] = min(best.get(name, math.inf), (time.process_time() - start) / calls_made)
            wall[name] = min(wall.get(name, math.inf), (time.perf_counter() - wall_start) / calls_made)

    def floor(times, n):
        f_ng, f, b = times["F_ng"], times["F"], times["F+B"] - times["F"]
        return ((n - 1) * (f_ng + f) + f + n * b) / (n * (f + b))

    rows = [{"steps": n, "autograd": best[("autograd", n)], "discrete": best[("discrete", n)], "floor": floor(best, n),
             "wall_autograd": wall[("autograd", n)], "wall_discrete": wall[("discrete", n)],
             "wall_floor": floor(wall, n)} for n in steps_list]
    return {"F_ng": best["F_ng"], "F": best["F"], "B": best["F+B"] - best["F"], "rounds": FLOOR_ROUNDS[quick],
            "rows": rows}


def print_floor(result):
    print(f"\n## grad='discrete' against autograd and its floor (process CPU time, best of {result['rounds']} "
          f"interleaved rounds; one model call, the mean of {FLOOR_REPEATS} in a row: "
          f"F_ng {result['F_ng'] * 1e3:.1f} ms without grad, "
          f"F {result['F'] * 1e3:.1f} ms with grad, B {result['B'] * 1e3:.1f} ms backward)")
    print("wall: the same rounds' wall time")
    print(f"{'N':>4}{'autograd s':>12}{'discrete s':>12}{'discrete/autograd':>19}{'floor':>8}{'discrete/floor':>16}"
          f"{'wall: discrete/autograd':>25}{'floor':>8}")
    for r in result["rows"]:
        ratio, wall_ratio = r["discrete"] / r["autograd"], r["wall_discrete"] / r["wall_autograd"]
        print(f"{r['steps']:>4}{r['autograd']:>12.3f}{r['discrete']:>12.3f}{ratio:>19.3f}{r['floor']:>8.3f}"
              f"{ratio / r['floor']:>16.3f}{wall_ratio:>25.3f}{r['wall_floor']:>8.3f}")


def floor_targets(result):
    worst = max((r["discrete"] / r["autograd"], r["steps"], r["floor"]) for r in result["rows"])
    highest = max(result["rows"], key=lambda r: r["floor"])  # the least any gradient without kept activations costs
    return [(f"discrete: CPU time per gradient <= {TARGETS['discrete_vs_autograd']}x autograd",
             worst[0] <= TARGETS["discrete_vs_autograd"],
             f"worst {worst[0]:.3f}x at N={worst[1]}, where the floor is {worst[2]:.3f}x"
             + (f"; the floor reaches {highest['floor']:.3f}x at N={highest['steps']}, above the target"
                if highest["floor"] > TARGETS["discrete_vs_autograd"] else ""))]


def _mib(value):
    return f"{value / 2**20:.1f}"


def print_memory(result, threads):
    rows = result["rows"]
    steps_list = sorted({r["steps"] for r in rows})
    by = {(r["method"], r["steps"]): r for r in rows}
    size = f"{BATCH}x{UNET['in_channels']}x{UNET['sample_size']}x{UNET['sample_size']}"
    print(f"\n## Memory and time per gradient: UNet2DModel {UNET['block_out_channels']}, "
          f"{result['parameters'] / 1e6:.2f}M params ({_mib(result['param_bytes'])} MiB), x {size} float32 "
          f"(state {result['state_bytes'] / 1024:.0f} KiB), z {BATCH}x{COND_DIM}; dL/d(x_T, z, theta) through "
          "DPM-Solver++(2M), logSNR grid; adjoint = AdjointDEIS x0 form, 2M; checkpoint = plain loop of "
          "ops.multistep_step with torch.utils.checkpoint around each model call")
    for line in result["methods"]:
        print(f"- {line}")
    for key, title in (("tensor_peak", "tensor peak MiB"), ("rss_peak", "RSS peak MiB")):
        print(f"{title} (beyond the stored states)")
        print(f"{'N':>3} " + " ".join(f"{m:>14}" for m in MEMORY_METHODS))
        for n in steps_list:
            cells = []
            for m in MEMORY_METHODS:
                r = by[(m, n)]
                cell = _mib(r[key]) + ("" if m == "autograd" else f" ({_mib(r[key] - r['states_bytes'])})")
                cells.append(f"{cell:>14}")
            print(f"{n:>3} " + " ".join(cells))
        if key == "tensor_peak":
            n = steps_list[-1]
            cells = [_mib(result["frozen_tensor_peak"][m]) for m in MEMORY_METHODS]
            print(f"{n:>3} " + " ".join(f"{c:>14}" for c in cells) + "   <- theta frozen: dL/d(x_T, z) only")
    for key, title in (("cpu_time", "process CPU seconds"), ("time", "wall seconds")):
        print(f"{title} per gradient (ratio to autograd): best of {result['rounds']} interleaved round(s), "
              f"{threads} thread(s)")
        print(f"{'N':>3} " + " ".join(f"{m:>14}" for m in MEMORY_METHODS))
        for n in steps_list:
            base = by[("autograd", n)][key]
            times = [by[(m, n)][key] for m in MEMORY_METHODS]
            print(f"{n:>3} " + " ".join(f"{f'{t:.2f} ({t / base:.2f}x)':>14}" for t in times))
    agreement = ", ".join(f"{m} {v:.1e}" for m, v in result["agreement"].items())
    print(f"gradient vs autograd (max over x_T, z, theta of the relative L2 difference): {agreement}; "
          "AdjointDEIS approximates the continuous adjoint, not the gradient of the computed sample")


def memory_targets(result):
    rows = result["rows"]
    by = {(r["method"], r["steps"]): r for r in rows}
    steps_list = sorted({r["steps"] for r in rows})
    lo, hi = steps_list[0], steps_list[-1]
    checks = []
    for key, label in (("tensor_peak", "tensor"), ("rss_peak", "RSS")):
        for method in ("discrete", "adjoint"):
            a, b = (by[(method, n)][key] - by[(method, n)]["states_bytes"] for n in (lo, hi))
            growth = b / a - 1
            checks.append((f"{method}: {label} peak beyond the stored states grows < {100 * TARGETS['growth']:.0f}% "
                           f"from N={lo} to N={hi}", growth < TARGETS["growth"],
                           f"{_mib(a)} -> {_mib(b)} MiB, {100 * growth:+.1f}%"))
        a, b = by[("autograd", lo)][key], by[("autograd", hi)][key]
        checks.append((f"autograd: {label} peak grows about linearly (x{hi / lo:g} steps)", b / a > 0.5 * hi / lo,
                       f"{_mib(a)} -> {_mib(b)} MiB, x{b / a:.1f}"))
        mem = max((by[("discrete", n)][key] / by[("checkpoint", n)][key], n) for n in steps_list)
        checks.append((f"discrete: {label} peak below per-step checkpointing at every N", mem[0] < 1.0,
                       f"worst discrete/checkpoint {mem[0]:.2f} at N={mem[1]}"))
    for key, label in (("cpu_time", "CPU time"), ("time", "wall time")):
        for method in ("discrete", "adjoint"):
            worst = max((by[(method, n)][key] / by[("autograd", n)][key], n) for n in steps_list)
            checks.append((f"{method}: {label} per gradient <= {TARGETS['time_vs_autograd']}x autograd",
                           worst[0] <= TARGETS["time_vs_autograd"], f"worst {worst[0]:.2f}x at N={worst[1]}"))
        tim = max((by[("discrete", n)][key] / by[("checkpoint", n)][key], n) for n in steps_list)
        checks.append((f"discrete: {label} within {100 * (TARGETS['time_vs_checkpoint'] - 1):.0f}% of "
                       "checkpointing (or faster)", tim[0] <= TARGETS["time_vs_checkpoint"],
                       f"worst discrete/checkpoint {tim[0]:.2f}x at N={tim[1]}"))
    return checks


class GaussianPFODE(nn.Module):
    """The VP PF-ODE in t for the Gaussian oracle, counting calls. x: (1, dim).

    dx/dt = f(t) x - g(t)^2/2 score(x, t) with f = d log alpha/dt = -beta/2, g^2 = beta = b0 + (b1 - b0) t,
    score = -(x - alpha mu)/(alpha^2 s^2 + 1 - alpha^2), written without sigma so that the field stays
    defined a little below t = 0, where dopri5 evaluates when its last step overshoots t_min.
    """

    def __init__(self, sched):
        super().__init__()
        self.b0, self.b1 = sched.beta_min, sched.beta_max
        self.calls = 0

    def forward(self, t, x):
        self.calls += 1
        t = t.to(torch.float64)
        alpha = torch.exp(-0.25 * (self.b1 - self.b0) * t**2 - 0.5 * self.b0 * t)
        beta = self.b0 + (self.b1 - self.b0) * t
        score = -(x - alpha * MU) / (alpha**2 * S**2 + 1 - alpha**2)
        return -0.5 * beta * x - 0.5 * beta * score


def run_baselines(quick):
    sched, model, exact = gaussian_problem()
    result = {"exact": exact, "dim": GAUSSIAN_DIM, "torchdiffeq": None, "rows": []}
    x_start = torch.randn(1, GAUSSIAN_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact_norm = exact * math.sqrt(GAUSSIAN_DIM)
    try:
        import torchdiffeq
    except ImportError:
        result["torchdiffeq"] = "not installed (pip install torchdiffeq)"
        torchdiffeq = None
    if torchdiffeq is not None:
        result["torchdiffeq"] = torchdiffeq.__version__
        for tol in QUICK_DIFFEQ_TOLERANCES if quick else DIFFEQ_TOLERANCES:
            func = GaussianPFODE(sched)
            x_T = x_start.clone().requires_grad_(True)
            row = {"method": f"dopri5 rtol=atol={tol:g}", "tol": tol}
            start = time.perf_counter()
            try:
                xs = torchdiffeq.odeint_adjoint(func, x_T, torch.tensor([T_MAX, T_MIN], dtype=torch.float64),
                                                method="dopri5", rtol=tol, atol=tol, adjoint_params=())
                row["nfe_forward"] = func.calls
                func.calls = 0
                xs[-1].sum().backward()
                row["nfe_backward"] = func.calls
                row["seconds"] = time.perf_counter() - start
                row["rel_error"] = ((x_T.grad - exact).norm() / exact_norm).item()
            except (AssertionError, RuntimeError) as e:
                row["seconds"] = time.perf_counter() - start
                row["failed"] = f"{type(e).__name__}: {e}"
            result["rows"].append(row)
    for steps in DIFFEQ_OURS_STEPS:
        x_T = x_start.clone().requires_grad_(True)
        start = time.perf_counter()
        x_0 = adjointdeis.sample(model, x_T, sched, steps=steps, solver="dpmpp", order=2, grad="discrete",
                                 parameters=[])
        x_0.sum().backward()
        seconds = time.perf_counter() - start
        result["rows"].append({"method": f"adjointdeis discrete, DPM-Solver++(2M) N={steps}", "nfe_forward": steps,
                               "nfe_backward": steps, "seconds": seconds,
                               "rel_error": ((x_T.grad - exact).norm() / exact_norm).item()})
    return result


def print_baselines(result):
    print(f"\n## torchdiffeq odeint_adjoint vs the discrete adjoint: Gaussian PF-ODE, {result['dim']} dims, "
          f"float64, dL/dx_T of L = sum(x_0); torchdiffeq {result['torchdiffeq']}")
    print("rel. grad error = |g - exact| / |exact|. Ours is the exact gradient of the N-step sample, so its error is "
          "the sampler's discretisation error. dopri5 steps past t_min and interpolates, so the field is written "
          "without sigma_t (NaN below t = 0); computed through sigma_t, dopri5 stops with 'underflow in dt'")
    print(f"{'method':48} {'NFE fwd':>8} {'NFE bwd':>8} {'seconds':>8} {'rel. grad error':>16}")
    for row in result["rows"]:
        if "failed" in row:
            print(f"{row['method']:48} failed after {row['seconds']:.2f} s: {row['failed']}")
            continue
        print(f"{row['method']:48} {row['nfe_forward']:>8} {row['nfe_backward']:>8} {row['seconds']:>8.3f} "
              f"{row['rel_error']:>16.2e}")



def source_version():
    """The repository's commit, with "+changes" when adjointdeis/ or csrc/ differ from it ("unknown" outside git)."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "adjointdeis", "csrc"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def print_targets(checks):
    print("\n## Targets")
    for name, met, detail in checks:
        print(f"  {name}: {'met' if met else 'NOT met'} ({detail})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and cases (smoke test, < 1 minute)")
    parser.add_argument("--json", metavar="PATH", help="write the results and run metadata as JSON")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, OpenMP threads that wait for a "
                             "descheduled peer made 2-thread timings 5-10x slower and erratic)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads
    torch.set_num_threads(threads)

    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    meta = {"device": cpu_name(), "cores": cores, "threads": threads, "torch": torch.__version__,
            "diffusers": diffusers_version, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
            "load_before": os.getloadavg()[0], "source": source_version()}
    start = time.perf_counter()
    results, checks = {}, []
    if "accuracy" in sections:
        results["accuracy"] = run_accuracy(args.quick)
        checks += accuracy_targets(results["accuracy"])
    for section, run, targets in (("memory", run_memory, memory_targets), ("floor", run_floor, floor_targets)):
        if section not in sections:
            continue
        if diffusers_version is None:  # both run a diffusers UNet
            print(f"diffusers is not installed: the {section} section is skipped", file=sys.stderr)
            continue
        results[section] = run(args.quick, threads)
        checks += targets(results[section])
    if "baselines" in sections:
        results["baselines"] = run_baselines(args.quick)
    meta["load_after"] = os.getloadavg()[0]
    meta["seconds"] = time.perf_counter() - start

    print(f"# bench_gradients.py{' --quick' if args.quick else ''} (adjointdeis {meta['source']}): "
          f"{meta['device']}, {cores} cores, "
          f"{threads} threads, torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}; "
          f"load avg {meta['load_before']:.2f} -> {meta['load_after']:.2f}; ran {meta['seconds']:.0f} s")
    if max(meta["load_before"], meta["load_after"]) > cores + 0.5:
        print(f"WARNING: the 1-min load average exceeded {cores} cores: other processes shared the CPUs, "
              "so times are noisy")
    if "accuracy" in results:
        print_accuracy(results["accuracy"])
    if "memory" in results:
        print_memory(results["memory"], threads)
    if "floor" in results:
        print_floor(results["floor"])
    if "baselines" in results:
        print_baselines(results["baselines"])
    print_targets(checks)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "results": results,
                                                       "targets": [list(c) for c in checks]}, indent=2,
                                                      default=str))


if __name__ == "__main__":
    main()
