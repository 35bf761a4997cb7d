"""Times a whole ``adjointdeis.sample`` call eager, captured in one CUDA graph, and under
``torch.compile(mode="reduce-overhead")``, against diffusers' ``DPMSolverMultistepScheduler`` loop.

Usage: python bench/bench_cuda_graph.py [--device cuda] [--steps 20] [--batch 2] [--size 64] [--reps 20]
       python bench/bench_cuda_graph.py --dry-run     # CPU, tiny sizes: checks the script, times nothing real

The model is a small convolutional network (two 3x3 convolutions, 4 -> 64 -> 4 channels), so that at small
batches the run is bound by kernel launches, the case CUDA graphs exist for. Every case runs DPM-Solver++(2M)
on the same latents; the table gives milliseconds per whole sampling call (median of `--reps`), the ratio to
diffusers' loop, and each case's largest difference from our eager sample (diffusers: from ours, float32).
A case that cannot run prints why (for instance torch.compile on a torch older than the package supports).
"""

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import adjointdeis as ad  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402


class ConvEps(torch.nn.Module):
    """eps(x, t): two 3x3 convolutions with a time shift, 4 -> 64 -> 4 channels."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Conv2d(4, 64, 3, padding=1)
        self.out = torch.nn.Conv2d(64, 4, 3, padding=1)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.inp(x) + t.view(-1, 1, 1, 1).to(x.dtype) * 1e-3)
        return self.out(h)


def timed(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of fn() over `reps` calls, after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def diffusers_scheduler():
    """diffusers' DPMSolverMultistepScheduler, 2M, Stable Diffusion's betas, ending at zero noise."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, solver_order=2, final_sigmas_type="zero")


def diffusers_loop(model, x_T, steps):
    """The loop a diffusers pipeline runs: set_timesteps, then one step per timestep."""
    scheduler = diffusers_scheduler()

    def run():
        scheduler.set_timesteps(steps, device=x_T.device)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
        return x
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="CPU, 8x8 latents, 3 repetitions")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.size, args.reps, args.steps = "cpu", 8, 3, 5
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_cuda_graph: no CUDA device (use --dry-run to check the script on a CPU)")
    torch.manual_seed(0)
    model = ConvEps().to(device).eval()
    static = torch.randn(args.batch, 4, args.size, args.size, device=device)
    try:
        scheduler = diffusers_scheduler()
    except ImportError as error:
        scheduler, missing = None, error
    sched, timesteps = ad.VPSchedule.linear(), None
    if scheduler is not None:  # diffusers' schedule and N timesteps (the end implied): one grid for every case
        from adjointdeis.diffusers import schedule_from_config

        sched = schedule_from_config(scheduler.config)
        scheduler.set_timesteps(args.steps)
        timesteps = tuple(scheduler.timesteps.tolist())  # numbers, which torch.compile reads as constants

    def ours():
        return ad.sample(model, static, sched, steps=args.steps, timesteps=timesteps, order=2, check_finite=False)

    rows = []
    with torch.no_grad():
        reference = ours()
        if scheduler is None:
            rows.append(("diffusers DPMSolverMultistep loop", None, f"not run: {missing}"))
        else:
            loop = diffusers_loop(model, static, args.steps)
            rows.append(("diffusers DPMSolverMultistep loop", timed(loop, args.reps, device),
                         (loop() - reference).abs().max().item()))
        rows.append(("ad.sample, eager", timed(ours, args.reps, device), 0.0))
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                ours()  # warm-up: the plan's coefficient tables reach the device before the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = ours()
            graph.replay()
            rows.append(("ad.sample, one CUDA graph (replay)", timed(graph.replay, args.reps, device),
                         (captured - reference).abs().max().item()))
        else:
            rows.append(("ad.sample, one CUDA graph (replay)", None, "not run: CUDA graphs need a GPU"))
        try:
            compiled = torch.compile(ours, mode="reduce-overhead", fullgraph=True)
            got = compiled().clone()
            rows.append(('ad.sample, torch.compile("reduce-overhead")', timed(compiled, args.reps, device),
                         (got - reference).abs().max().item()))
        except Exception as error:  # report, not fail: older torch versions cannot trace the whole call
            rows.append(('ad.sample, torch.compile("reduce-overhead")', None,
                         f"not run: {type(error).__name__}: {str(error).splitlines()[0][:80]}"))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# {name}, torch {torch.__version__}, DPM-Solver++(2M) {args.steps} steps, latents "
          f"{args.batch}x4x{args.size}x{args.size} float32, ConvEps model")
    base = rows[0][1]
    print(f"{'case':<46}{'ms/call':>10}{'vs diffusers':>14}  max |diff| from ours")
    for case, ms, diff in rows:
        ms_text = "" if ms is None else f"{ms:.3f}"
        ratio = "" if ms is None or base is None else f"{base / ms:.2f}x"
        diff_text = diff if isinstance(diff, str) else f"{diff:.2e}"
        print(f"{case:<46}{ms_text:>10}{ratio:>14}  {diff_text}")


if __name__ == "__main__":
    main()
