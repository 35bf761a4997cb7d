"""Times whole ``adjointdeis.sample`` loops with a free model: the sampler's own cost per step.

Usage: python bench/bench_sample.py [--steps 10 25 50] [--min-run-time 2] [--threads 1] [--json PATH]
       python bench/bench_sample.py --breakdown [--threads 2]   # one call against N x the kernel, by part

The model returns a precomputed output, so what is timed is everything ``sample`` spends outside the
network: planning the grid and its coefficient table (once per call) and one fused step per model
evaluation. Baseline: diffusers' ``DPMSolverMultistepScheduler`` loop (``set_timesteps`` + ``step``) on the
same latents, when diffusers is installed. The case is :func:`adjointdeis.benchmarks.bench_overhead`, the
one the ``adjointdeis bench`` command runs.

``--breakdown``: a 20-step DPM-Solver++(2M) ``sample`` call on 16x4x128x128 float32 latents with a free model,
against 20 times one fused step on one hot set of five tensors (written into the same two buffers: no allocation),
and the parts a call adds: planning (cached after the first call with the same schedule and settings; cold, a new
schedule each time), the finiteness check, and the loop itself. The check runs in the last step's kernel on each
block while it is in cache ("loop, checked" against "loop"); "finite check, a pass" is what a separate pass over the
sample would cost (all_finite on a hot sample; the sample just written is colder than that). Every time is the minimum over many calls (this
VM's times wander by 2x between runs of the same code; the minimum is what the code costs when nothing else
interferes), the parts called in turn, one call each per round in a new order, so that each sees the same
machine. "chain" is the N kernels of the loop called back to back (each step writes fresh outputs and reads the
last ones) with no other Python; "chain (out=)" writes into two sets of buffers in turn, "chain (in place)"
overwrites x and m1 with x_next and m0 after the first step, as run_plan does: loop - chain (in place) is the
loop's own cost, chain - N x kernel the memory system's (in place touches three tensors, not five). The two
chains that allocate run in a group of their own, with their own N x kernel: freeing fresh outputs lets glibc
trim its heap, and whatever runs next faults its memory in again.

The page faults are glibc's doing: a freed buffer above its mmap threshold goes back to the kernel, and the next
call's first touches fault it in again. With glibc told to keep its pages (or another allocator preloaded) the
loop's own cost is what remains; the header shows such settings:

    MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=1073741824 python bench/bench_sample.py --breakdown --threads 2
"""

import argparse
import itertools
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import adjointdeis as ad  # noqa: E402
from adjointdeis import ops  # noqa: E402
from adjointdeis.benchmarks import OVERHEAD_SHAPE, bench_overhead  # noqa: E402
from adjointdeis.planning import all_finite, device_tables, plan_sampling, run_plan  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402
from timing import interleaved_min_ms  # noqa: E402

GLIBC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")
BREAKDOWN_SHAPE = (16, 4, 128, 128)
BREAKDOWN_STEPS = 20


def breakdown(seconds: float) -> dict:
    """Milliseconds of one sample call and of its parts (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(BREAKDOWN_SHAPE, generator=g), 0.1 * torch.randn(BREAKDOWN_SHAPE, generator=g)
    sched, steps = ad.VPSchedule.linear(), BREAKDOWN_STEPS
    args = (steps, "logsnr", None, False, "dpmpp", 2, "eps")
    plan = plan_sampling(sched, *args)
    coeffs, _ = device_tables(plan, x.device, torch.float32)
    m1 = ops.multistep_step(x, out, [], coeffs[0])[1]
    row = coeffs[steps // 2]
    fresh = itertools.count(1)  # a new schedule per cold planning call, so the memo never answers

    def model(y, t):
        return out

    kernel_outputs = torch.empty_like(x), torch.empty_like(x)
    step_out = ops.multistep_step_out_unchecked  # the op the loop calls (no Python checks or version bumps)

    def n_kernels():  # one step N times on the same hot set of five tensors (no allocation, no page fault)
        for _ in range(steps):
            step_out(x, out, [m1], row, None, kernel_outputs[0], kernel_outputs[1], None)

    def chain():  # the loop's kernels on the loop's rotating buffers, without the loop's Python
        y, history = x, []
        for r in range(steps):
            y, m0 = ops.multistep_step(y, out, history, coeffs[r])
            history = [m0]
        return y

    def chain_out():  # the same kernels writing into two sets of buffers in turn (what run_plan does on CPU)
        buffers = [(torch.empty_like(x), torch.empty_like(x)) for _ in range(2)]
        y, history = x, []
        for r in range(steps):
            y_next, m0 = buffers[r % 2]
            step_out(y, out, history, coeffs[r], None, y_next, m0, None)
            y, history = y_next, [m0]
        return y

    def chain_in_place():  # the same kernels stepping in place after the first (what run_plan does on CPU now)
        y, m0 = torch.empty_like(x), torch.empty_like(x)
        step_out(x, out, [], coeffs[0], None, y, m0, None)
        for r in range(1, steps):
            step_out(y, out, [m0], coeffs[r], None, y, m0, None)
        return y

    parts = {
        "N x kernel": n_kernels,
        "chain (in place)": chain_in_place,
        "loop": lambda: torch.no_grad()(run_plan)(model, x, plan, check_finite=False),  # as sample() runs it
        "loop, checked": lambda: torch.no_grad()(run_plan)(model, x, plan),  # the check in the last kernel
        "finite check, a pass": lambda: all_finite(x),  # what a pass after the loop costs (on a hot x)
        "plan (cached)": lambda: plan_sampling(sched, *args),
        "plan (cold)": lambda: plan_sampling(ad.VPSchedule.linear(beta_max=20.0 + 1e-6 * next(fresh)), *args),
        "sample": lambda: ad.sample(model, x, sched, steps=steps, order=2),
    }
    times, faults = interleaved_min_ms(parts, seconds)
    # The chains that allocate, apart: freeing their fresh outputs lets glibc trim its heap, and the parts after
    # them would fault their memory in again. Each against its own N x kernel, timed in turn with it.
    allocating, allocating_faults = interleaved_min_ms({"N x kernel": n_kernels, "chain": chain,
                                                        "chain (out=)": chain_out}, seconds / 2)
    for name in ("chain", "chain (out=)"):
        times[name] = allocating[name] * times["N x kernel"] / allocating["N x kernel"]
        faults[name] = allocating_faults[name]
    return {"shape": BREAKDOWN_SHAPE, "steps": steps, "ms": times, "page_faults": faults,
            "n_kernel": times["N x kernel"]}


def allocator_settings() -> str:
    """glibc's allocator settings from the environment, as the header shows them (empty when none is set)."""
    settings = [f"{name}={os.environ[name]}" for name in GLIBC_SETTINGS if name in os.environ]
    return f"; glibc {', '.join(settings)}" if settings else ""


def print_breakdown(result: dict) -> None:
    ms, n_kernel = result["ms"], result["n_kernel"]
    print(f"# {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'x'.join(map(str, result['shape']))} float32, DPM-Solver++(2M), {result['steps']} steps, free model"
          f"{allocator_settings()}")
    faults = result["page_faults"]
    print(f"{'part':<34}{'ms':>9}{'/ N x kernel':>14}{'page faults':>13}")
    print(f"{'N x kernel (two hot buffers)':<34}{n_kernel:>9.3f}{1:>14.3f}{faults['N x kernel']:>13.0f}")
    for name in ("chain", "chain (out=)", "chain (in place)", "loop", "loop, checked", "finite check, a pass",
                 "plan (cached)", "plan (cold)", "sample"):
        print(f"{name:<34}{ms[name]:>9.3f}{ms[name] / n_kernel:>14.3f}{faults[name]:>13.0f}")
    print(f"sample() / (N x kernel): {ms['sample'] / n_kernel:.3f} (target <= 1.05)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--breakdown", action="store_true", help="one 20-step call against 20 x the kernel")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.breakdown:
        result = breakdown(5 * args.min_run_time)
        print_breakdown(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    rows = bench_overhead(steps_list=args.steps, min_run_time=args.min_run_time)
    print(f"# {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), latents "
          f"{'x'.join(map(str, OVERHEAD_SHAPE))}")
    print(f"{'case':<34}{'ours us/step':>14}{'baseline us/step':>18}{'ratio':>8}  baseline")
    for row in rows:
        baseline = "" if row["baseline"] is None else f"{row['baseline']:.1f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(f"{row['case']:<34}{row['ours']:>14.1f}{baseline:>18}{ratio:>8}  {row['baseline_name']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
