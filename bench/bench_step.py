"""Times one DPM-Solver++(2M) step: the fused op against eager torch, torch.compile and diffusers.

Usage: python bench/bench_step.py [--device cpu|cuda] [--quick] [--json PATH]

The step (docs/math.md section 4) for an eps-prediction model, with m1 the previous step's x0:

    m0 = p x + q out               p = 1/alpha_s, q = -sigma_s/alpha_s, a = sigma_t/sigma_s,
    x_next = a x + b0 m0 + b1 m1   b0 = -alpha_t expm1(-h) (1 + 1/(2r)), b1 = alpha_t expm1(-h)/(2r)

Each case (dtype x latent size) is checked against diffusers' DPMSolverMultistepScheduler.step
and the reference twin before it is timed. Bytes moved by one step are 5 tensors (reads of x,
out, m1; writes of x_next, m0); the copy bandwidth is ``dst.copy_(src)`` on a 256 MiB buffer
(2 x 256 MiB moved), measured in the same run.
"""

import argparse
import datetime
import itertools
import json
import math
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adjointdeis import ops, reference  # noqa: E402
from adjointdeis.benchmarks import eager_step  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402
from timing import interleaved_min_ms  # noqa: E402

SIZES = [(1, 4, 64, 64), (4, 4, 64, 64), (16, 4, 64, 64), (4, 4, 128, 128), (16, 4, 128, 128), (16, 16, 128, 128)]
QUICK_SIZES = SIZES[:2]
LARGE_NUMEL = 2**20  # the copy-bandwidth target's sizes (16x16x128x128: 80 MiB moved, beyond a 32 MiB L3)
NUM_INFERENCE_STEPS = 20
STEP_INDEX = 10
COPY_BYTES = 256 * 2**20
TENSORS_MOVED = 5
TARGETS = {"diffusers_speedup": 5.0, "compile_speedup": 1.0, "copy_fraction": {"cpu": 0.85, "cuda": 0.8}}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def make_scheduler(device):
    """A 2nd-order DPM-Solver++ scheduler (SD betas, eps prediction) with 20 timesteps, or None
    when diffusers is not installed."""
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        return None
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        solver_order=2, prediction_type="epsilon", algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True)
    sched.set_timesteps(NUM_INFERENCE_STEPS, device=device)
    return sched


def sd_sigmas():
    """The sigmas (float32, then zero) diffusers' scheduler above uses: scaled-linear betas,
    20 "linspace"-spaced timesteps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    timesteps = torch.linspace(0, 999, NUM_INFERENCE_STEPS + 1, dtype=torch.float64).round().long()
    timesteps = timesteps.flip(0)[:-1]
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return torch.cat([sigmas[timesteps], torch.zeros(1)])


def step_coefficients(sigmas, i):
    """[a, b0, b1, b2, c, p, q] in float64 of the 2M step i -> i+1 (eps prediction) on the VP grid
    with VE noise levels ``sigmas`` (alpha = 1/sqrt(1 + sigma^2))."""

    def alpha_sigma(k):
        alpha = 1.0 / math.sqrt(sigmas[k].item() ** 2 + 1.0)
        return alpha, sigmas[k].item() * alpha

    (alpha_s1, sigma_s1), (alpha_s, sigma_s), (alpha_t, sigma_t) = map(alpha_sigma, (i - 1, i, i + 1))
    lam_s1, lam_s, lam_t = (math.log(a) - math.log(s) for a, s in
                            ((alpha_s1, sigma_s1), (alpha_s, sigma_s), (alpha_t, sigma_t)))
    h = lam_t - lam_s
    r = (lam_s - lam_s1) / h
    em = math.expm1(-h)
    return [sigma_t / sigma_s, -alpha_t * em * (1 + 0.5 / r), alpha_t * em * 0.5 / r, 0.0, 0.0,
            1.0 / alpha_s, -sigma_s / alpha_s]


def relative_error(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def diffusers_reference(sched, out, x, m1):
    """One scheduler step at STEP_INDEX with history [m1]; asserts it took the second-order path."""
    calls = []
    second_order = sched.multistep_dpm_solver_second_order_update

    def counted(*args, **kwargs):
        calls.append(1)
        return second_order(*args, **kwargs)

    sched.multistep_dpm_solver_second_order_update = counted
    try:
        sched.model_outputs = [None, m1]
        sched.lower_order_nums = 1
        sched._step_index = STEP_INDEX
        prev = sched.step(out, sched.timesteps[STEP_INDEX], x).prev_sample
    finally:
        del sched.multistep_dpm_solver_second_order_update
    if len(calls) != 1:
        raise RuntimeError("diffusers did not take the DPM-Solver++(2M) path")
    return prev


def latent_passes(fn, numel):
    """Latent-sized tensors one call of `fn` reads and writes, op by op (views move no data): the bytes a step
    moves at memory speed, in units of the latent."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Count(TorchDispatchMode):
        passes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if not func.is_view:
                Count.passes += sum(isinstance(t, torch.Tensor) and t.numel() == numel
                                    for t in tree_leaves((args, kwargs, result)))
            return result

    with Count():
        fn()
    return Count.passes


class Bench:
    """Times functions on one device with a fixed thread count: the fastest call of each, the functions of a case
    called in turn (one call each per round, in a new order each round; bench/timing.py). This VM's speed drifts
    over seconds, so blocks of one statement each saw a different machine: with the median of such blocks, the
    same code measured 0.87-1.12x of torch.compile at the memory-bound sizes from one run to the next."""

    def __init__(self, device, threads, min_run_time):
        self.device, self.threads, self.min_run_time = device, threads, min_run_time

    def fastest(self, fns: dict) -> dict:
        """Seconds of the fastest call of each function, timed in turn for min_run_time seconds each."""
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)

        def synced(fn):
            def run():
                fn()
                sync()
            return run

        torch.set_num_threads(self.threads)
        ms, _ = interleaved_min_ms({name: synced(fn) for name, fn in fns.items()}, self.min_run_time * len(fns))
        return {name: t / 1e3 for name, t in ms.items()}

    def copy_bandwidth(self):
        """GB/s of dst.copy_(src) over a 256 MiB float32 buffer (2 x 256 MiB moved per call), fastest call."""
        src = torch.ones(COPY_BYTES // 4, device=self.device)
        dst = torch.zeros_like(src)
        return 2 * COPY_BYTES / self.fastest({"copy": lambda: dst.copy_(src)})["copy"] / 1e9


def run_case(bench, sched, coeff_row, dtype, size, use_compile):
    """Checks, then times, one (dtype, size) case; returns its row (times in ms, speedups as ratios)."""
    device = bench.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x, out, m1 = (torch.randn(size, generator=gen).to(device, dtype) for _ in range(3))
    coeffs = torch.tensor(coeff_row, dtype=torch.float64, device=device)
    a, b0, b1, _, _, p, q = coeff_row
    scalars = dict(a=a, b0=b0, b1=b1, p=p, q=q)
    compiled = None
    if use_compile:
        torch._dynamo.reset()
        compiled = torch.compile(eager_step, dynamic=False)

    x_next, m0 = ops.multistep_step(x, out, [m1], coeffs)
    ref_next, ref_m0 = reference.multistep_step(x, out, [m1], coeffs)
    errors = {"reference": max(relative_error(x_next, ref_next), relative_error(m0, ref_m0)),
              "eager": relative_error(x_next, eager_step(x, out, m1, **scalars)[0])}
    if sched is not None:
        errors["diffusers"] = relative_error(x_next, diffusers_reference(sched, out, x, m1))
    if compiled is not None:
        try:
            for _ in range(3):
                compiled_next = compiled(x, out, m1, **scalars)[0]
            errors["compile"] = relative_error(x_next, compiled_next)
        except Exception as error:  # e.g. no C++ compiler or Triton: report and skip the column
            print(f"torch.compile failed, its column is skipped: {type(error).__name__}: {error}",
                  file=sys.stderr)
            compiled = None

    def ours():
        return ops.multistep_step(x, out, [m1], coeffs)

    fns = {"ours": ours, "eager": lambda: eager_step(x, out, m1, **scalars)}
    if compiled is not None:
        fns["compile"] = lambda: compiled(x, out, m1, **scalars)
    seconds = bench.fastest(fns)
    speedup = {name: t / seconds["ours"] for name, t in seconds.items() if name != "ours"}
    passes = {"ours": latent_passes(ours, x.numel())}
    if passes["ours"] != TENSORS_MOVED:
        raise RuntimeError(f"the fused step moved {passes['ours']} latent-sized tensors, not {TENSORS_MOVED}")
    if sched is not None:
        # In an interleaving of its own with ours: diffusers' step allocates and frees a dozen temporaries a call,
        # which makes glibc trim its heap and moves where the next call's outputs land; timed with the others, that
        # moved torch.compile's ratio by up to 0.15x from one process to the next at the same sizes.
        timestep = sched.timesteps[STEP_INDEX]

        def diffusers_step():
            sched._step_index = STEP_INDEX
            sched.step(out, timestep, x)
        against_diffusers = bench.fastest({"ours": ours, "diffusers": diffusers_step})
        seconds["diffusers"] = against_diffusers["diffusers"]
        speedup["diffusers"] = against_diffusers["diffusers"] / against_diffusers["ours"]
        if sched.lower_order_nums < 1 or sched.model_outputs[0] is None:
            raise RuntimeError("diffusers scheduler lost its 2M history while being timed")
        passes["diffusers"] = latent_passes(diffusers_step, x.numel())

    numel = math.prod(size)
    bytes_moved = TENSORS_MOVED * numel * x.element_size()
    tolerance = TOLERANCE[dtype]
    return {
        "dtype": str(dtype).removeprefix("torch."), "size": "x".join(map(str, size)), "numel": numel,
        "bytes_moved": bytes_moved,
        "ms": {name: t * 1e3 for name, t in seconds.items()},
        "gbps": bytes_moved / seconds["ours"] / 1e9,
        "speedup": speedup,
        "latent_passes": passes,
        "rel_error": errors,
        "ok": errors["reference"] <= tolerance and errors.get("diffusers", 0.0) <= tolerance,
    }



def fmt_x(value):
    return "-" if value is None else f"{value:.2f}x"


def print_table(rows, meta):
    print(f"\nDPM-Solver++(2M) step, {meta['device']}: {meta['device_name']}, {meta['threads']} threads, "
          f"torch {meta['torch']}, diffusers {meta['diffusers']}; copy {meta['copy_gbps']:.1f} GB/s; "
          f"load avg {meta['load_before']:.2f} -> {meta['load_after']:.2f}")
    if machine_busy(meta):
        print(f"WARNING: the 1-min load average reached {max(meta['load_before'], meta['load_after']):.1f} "
              f"on {meta['cores']} cores: other processes competed for the CPUs, so times are noisy")
    print(f"{'dtype':8} {'size':13} {'ours ms':>9} {'GB/s':>7} {'%copy':>6} {'vs eager':>9} "
          f"{'vs compile':>10} {'vs diffusers':>12} {'err diffusers':>13}")
    for r in rows:
        err = r["rel_error"].get("diffusers")
        print(f"{r['dtype']:8} {r['size']:13} {r['ms']['ours']:9.4f} {r['gbps']:7.1f} "
              f"{100 * r['copy_fraction']:5.0f}% {fmt_x(r['speedup'].get('eager')):>9} "
              f"{fmt_x(r['speedup'].get('compile')):>10} {fmt_x(r['speedup'].get('diffusers')):>12} "
              f"{'-' if err is None else f'{err:.1e}':>13}{'' if r['ok'] else '  MISMATCH'}")


def machine_busy(meta):
    """Whether other work likely shared the CPUs (load beyond this run's own threads)."""
    return meta["device"] == "cpu" and max(meta["load_before"], meta["load_after"]) > meta["cores"] + 0.5


def print_targets(rows, device):
    """One line per target: met or not, with the worst case."""
    copy_target = TARGETS["copy_fraction"][device]
    checks = [
        (f">= {TARGETS['diffusers_speedup']:g}x faster than diffusers on every size", "diffusers",
         rows, TARGETS["diffusers_speedup"]),
        (">= torch.compile's speed on every size", "compile", rows, TARGETS["compile_speedup"]),
        (f">= {100 * copy_target:.0f}% of copy bandwidth on sizes >= {LARGE_NUMEL} elements", None,
         [r for r in rows if r["numel"] >= LARGE_NUMEL], copy_target),
    ]
    print("\nTargets:")
    for name, key, selected, threshold in checks:
        if key is None:
            values = [(r["copy_fraction"], r) for r in selected]
        else:
            values = [(r["speedup"][key], r) for r in selected if key in r["speedup"]]
        if not values:
            print(f"  {name}: not measured")
            continue
        worst, row = min(values, key=lambda v: v[0])
        shown = f"{100 * worst:.0f}%" if key is None else f"{worst:.2f}x"
        bound = ""
        if key == "diffusers" and worst < threshold:
            theirs, ours = row["latent_passes"]["diffusers"], row["latent_passes"]["ours"]
            bound = (f"; diffusers' step reads and writes {theirs} latent-sized tensors, ours {ours}: where memory "
                     f"bounds both, about {theirs / ours:.1f}x at most")
        print(f"  {name}: {'met' if worst >= threshold else 'NOT met'} "
              f"(worst {shown} at {row['dtype']} {row['size']}{bound})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="2 small sizes, short timing (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and run metadata as JSON")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                        help="default: float32 on cpu; float32 and bfloat16 on cuda")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--min-run-time", type=float,
                        help="seconds of timing per function and case, in turn with the others "
                             "(default 1; 0.05 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the usable cores)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_step.py: --device cuda but torch.cuda.is_available() is False")
    if args.device == "cuda" and ops.cuda_version() < 0:
        sys.exit("bench_step.py: adjointdeis._C has no CUDA kernels "
                 "(it would time the reference fallback)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cores
    torch.set_num_threads(threads)
    dtypes = args.dtypes or (["float32"] if args.device == "cpu" else ["float32", "bfloat16"])
    sizes = QUICK_SIZES if args.quick else SIZES
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)

    sched = make_scheduler(args.device)
    if sched is None:
        print("diffusers is not installed: its column is skipped", file=sys.stderr)
        sigmas = sd_sigmas()
    else:
        sigmas = sched.sigmas
    coeff_row = step_coefficients(sigmas.double(), STEP_INDEX)
    bench = Bench(args.device, threads, min_run_time)
    load_before = os.getloadavg()[0]
    copy_gbps = bench.copy_bandwidth()
    rows = []
    for dtype_name, size in itertools.product(dtypes, sizes):
        row = run_case(bench, sched, coeff_row, getattr(torch, dtype_name), size, not args.no_compile)
        row["copy_fraction"] = row["gbps"] / copy_gbps
        rows.append(row)
        print(f"  {row['dtype']} {row['size']}: " + ", ".join(
            f"{name} {ms:.4f} ms" for name, ms in row["ms"].items()), file=sys.stderr, flush=True)

    meta = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "threads": threads, "torch": torch.__version__,
        "diffusers": None if sched is None else sys.modules["diffusers"].__version__,
        "cuda_kernels": ops.cuda_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps, "min_run_time": min_run_time,
        "step_index": STEP_INDEX, "num_inference_steps": NUM_INFERENCE_STEPS, "coeffs": coeff_row,
        "cores": cores, "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    print_table(rows, meta)
    print_targets(rows, args.device)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if not all(r["ok"] for r in rows):
        sys.exit("bench_step.py: the fused step disagrees with diffusers or the reference (see err)")


if __name__ == "__main__":
    main()
