"""Times FusedMultistepScheduler against diffusers' multistep schedulers: step time and loop overhead.

Usage: python bench/bench_scheduler.py [--device cpu|cuda] [--quick] [--json PATH]

For N = 10, 25, 50 steps on the latents of a tiny UNet2DModel (batch 1, 4 x 32 x 32):

- loop overhead: everything a pipeline's denoising loop spends outside its network, timed with the
  network replaced by a precomputed output: ``set_timesteps(N)`` then N x (``scale_model_input`` +
  ``step``);
- step: (loop overhead - set_timesteps) / N;
- set_timesteps: ours memoises its grid (computed by the config's diffusers scheduler) and its coefficient table
  (repeated calls with the same N, as a pipeline makes, are cheap), so it is also timed "cold", with both memos
  cleared before every call;
- full loop: the same loop with the tiny UNet, to show the overhead's share of a real loop (not
  with --quick).

Pairs: ours as DPM-Solver++(2M) against DPMSolverMultistepScheduler and UniPCMultistepScheduler
(UniPC is another algorithm: a same-cost baseline), ours as DEIS-2 against DEISMultistepScheduler;
each scheduler comes from the same config (``from_config``). Before timing, each pair's samples are
checked to agree to 1e-5 (UniPC excepted). Times are the best of many single runs interleaved
across all statements (see :class:`Bench`).
"""

import argparse
import datetime
import json
import os
import pathlib
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler, UNet2DModel,  # noqa: E402
                       UniPCMultistepScheduler)

from adjointdeis import ops  # noqa: E402
from adjointdeis.diffusers import FusedMultistepScheduler  # noqa: E402
from adjointdeis.diffusers.config import clear_grid_cache  # noqa: E402
from adjointdeis.diffusers.scheduler import _step_table  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402

STEPS = (10, 25, 50)
LATENT_SHAPE = (1, 4, 32, 32)
TARGET_OVERHEAD_RATIO = 5.0
TOLERANCE = 1e-5
# (name, diffusers class, our config overrides, name of our scheduler it is compared with)
BASELINES = [
    ("DPMSolverMultistep", DPMSolverMultistepScheduler, "fused dpmpp-2M"),
    ("DEISMultistep", DEISMultistepScheduler, "fused deis-2"),
    ("UniPCMultistep", UniPCMultistepScheduler, "fused dpmpp-2M"),
]
OURS = {"fused dpmpp-2M": dict(solver="dpmpp"), "fused deis-2": dict(solver="deis")}


def tiny_unet(device):
    """A small random UNet2DModel (no attention) for 4 x 32 x 32 latents, in eval mode."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return unet.to(device).eval()


def make_schedulers():
    """name -> scheduler, all from the default SD-style config (scaled-linear betas, eps prediction)."""
    config = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         solver_order=2).config
    schedulers = {name: FusedMultistepScheduler.from_config(config, **kw) for name, kw in OURS.items()}
    for name, cls, _ in BASELINES:
        schedulers[name] = cls.from_config(config)
    return schedulers


def overhead_loop(scheduler, steps, x, out, device):
    """The pipeline loop with the model replaced by the precomputed `out`."""
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        x = scheduler.step(out, t, scheduler.scale_model_input(x, t)).prev_sample
    return x


def model_loop(scheduler, unet, steps, x, device):
    """The pipeline loop with the tiny UNet."""
    scheduler.set_timesteps(steps, device=device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(unet(model_input, t).sample, t, x).prev_sample
    return x


def cold_set_timesteps(scheduler, steps, device):
    _step_table.cache_clear()
    clear_grid_cache()
    scheduler.set_timesteps(steps, device=device)


def check_agreement(schedulers, unet, x, device):
    """Relative error of each baseline's sample against ours after 10 UNet steps (UniPC: not compared)."""
    samples = {name: model_loop(s, unet, 10, x, device).double() for name, s in schedulers.items()}
    errors = {}
    for name, _, ours in BASELINES:
        if name == "UniPCMultistep":
            continue
        errors[name] = ((samples[ours] - samples[name]).norm() / samples[name].norm()).item()
    return errors


class Bench:
    """Times statements with torch.utils.benchmark as the best of many single runs, interleaved.

    On a shared machine a run can lose a whole scheduler time slice to another process; the minimum
    over runs interleaved across all statements discards those, and hits every column alike.
    """

    def __init__(self, device, threads, repeats):
        self.device, self.threads, self.repeats = device, threads, repeats

    def time_all(self, cases):
        """cases: list of (key, stmt, env, label, sub_label, description, repeats) -> {key: best Measurement}."""
        timers = {key: benchmark.Timer(stmt=stmt, globals=env, num_threads=self.threads, label=label,
                                       sub_label=sub_label, description=description)
                  for key, stmt, env, label, sub_label, description, _ in cases}
        for timer in timers.values():
            timer.timeit(1)
        best = {}
        for round_index in range(max(case[-1] for case in cases)):
            for key, *_, repeats in cases:
                if round_index >= repeats:
                    continue
                measurement = timers[key].timeit(1)
                if key not in best or measurement.median < best[key].median:
                    best[key] = measurement
        return best



def build_cases(schedulers, unet, x, out, device, steps_list, full_loop_steps, repeats):
    full_repeats = max(3, repeats // 10)
    cases = []
    for steps in steps_list:
        description = f"N={steps}"
        for name, scheduler in schedulers.items():
            env = dict(overhead_loop=overhead_loop, model_loop=model_loop, cold_set_timesteps=cold_set_timesteps,
                       s=scheduler, unet=unet, x=x, out=out, n=steps, device=device)
            cases.append(((name, steps, "loop"), "overhead_loop(s, n, x, out, device)", env,
                          "loop overhead (model replaced by a precomputed output)", name, description, repeats))
            cases.append(((name, steps, "set"), "s.set_timesteps(n, device=device)", env,
                          "set_timesteps (repeated N)", name, description, repeats))
            if name in OURS:
                cases.append(((name, steps, "cold"), "cold_set_timesteps(s, n, device)", env,
                              "set_timesteps (cold: memo cleared)", name, description, repeats))
            if steps in full_loop_steps:
                cases.append(((name, steps, "full"), "model_loop(s, unet, n, x, device)", env,
                              "full loop with the tiny UNet", name, description, full_repeats))
    return cases


def summarise(best, schedulers, steps_list, full_loop_steps):
    """Rows per (scheduler, N): times in ms / us and the baselines' overhead ratios against ours."""
    rows = []
    for steps in steps_list:
        for name in schedulers:
            loop = best[(name, steps, "loop")].median
            set_time = best[(name, steps, "set")].median
            row = {"scheduler": name, "steps": steps, "loop_ms": loop * 1e3, "set_timesteps_ms": set_time * 1e3,
                   "step_us": (loop - set_time) / steps * 1e6}
            if (name, steps, "cold") in best:
                row["cold_set_timesteps_ms"] = best[(name, steps, "cold")].median * 1e3
            if steps in full_loop_steps:
                full = best[(name, steps, "full")].median
                row["full_loop_ms"] = full * 1e3
                row["overhead_share"] = loop / full
            rows.append(row)
    by_key = {(r["scheduler"], r["steps"]): r for r in rows}
    for name, _, ours in BASELINES:
        for steps in steps_list:
            theirs, mine = by_key[(name, steps)], by_key[(ours, steps)]
            theirs["vs"] = ours
            theirs["overhead_ratio"] = theirs["loop_ms"] / mine["loop_ms"]
            theirs["step_ratio"] = theirs["step_us"] / mine["step_us"]
            theirs["cold_overhead_ratio"] = theirs["loop_ms"] / (
                mine["loop_ms"] - mine["set_timesteps_ms"] + mine["cold_set_timesteps_ms"])
    return rows


def print_summary(rows, meta, errors):
    print(f"\nScheduler overhead, {meta['device']}: {meta['device_name']}, {meta['threads']} threads, torch "
          f"{meta['torch']}, diffusers {meta['diffusers']}, latents {meta['latent_shape']}; load avg "
          f"{meta['load_before']:.2f} -> {meta['load_after']:.2f}")
    if meta["device"] == "cpu" and max(meta["load_before"], meta["load_after"]) > meta["cores"] + 0.5:
        print(f"WARNING: the 1-min load average exceeded the {meta['cores']} cores: other processes competed "
              "for the CPUs, so times are noisy")
    print("agreement with ours before timing: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    header = (f"{'scheduler':20} {'N':>3} {'set ms':>8} {'cold ms':>8} {'step us':>9} {'loop ms':>9} "
              f"{'full ms':>9} {'ovh %':>6} {'vs':>16} {'ovh x':>7} {'cold x':>7} {'step x':>7}")
    print(header)
    for r in rows:
        cold = f"{r['cold_set_timesteps_ms']:8.3f}" if "cold_set_timesteps_ms" in r else f"{'':8}"
        full = f"{r['full_loop_ms']:9.2f}" if "full_loop_ms" in r else f"{'-':>9}"
        share = f"{100 * r['overhead_share']:5.1f}%" if "overhead_share" in r else f"{'-':>6}"
        ratios = (f"{r['vs']:>16} {r['overhead_ratio']:6.2f}x {r['cold_overhead_ratio']:6.2f}x "
                  f"{r['step_ratio']:6.2f}x") if "vs" in r else ""
        print(f"{r['scheduler']:20} {r['steps']:3d} {r['set_timesteps_ms']:8.3f} {cold} {r['step_us']:9.1f} "
              f"{r['loop_ms']:9.3f} {full} {share} {ratios}")
    compared = [r for r in rows if "vs" in r]
    worst = min(compared, key=lambda r: r["overhead_ratio"])
    worst_cold = min(compared, key=lambda r: r["cold_overhead_ratio"])
    met = "met" if worst["overhead_ratio"] >= TARGET_OVERHEAD_RATIO else "NOT met"
    print(f"\nTarget: loop overhead >= {TARGET_OVERHEAD_RATIO:g}x lower than each diffusers scheduler at every N: "
          f"{met} (worst {worst['overhead_ratio']:.2f}x, {worst['scheduler']} N={worst['steps']}; with a cold "
          f"set_timesteps every loop: worst {worst_cold['cold_overhead_ratio']:.2f}x, "
          f"{worst_cold['scheduler']} N={worst_cold['steps']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="5 runs per statement, no timed UNet loops (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and run metadata as JSON")
    parser.add_argument("--repeats", type=int,
                        help="interleaved single runs per statement, best kept (default 30; 5 with --quick); "
                             "the UNet loops get a tenth of them, at least 3")
    parser.add_argument("--threads", type=int, help="torch threads (default: the usable cores)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_scheduler.py: --device cuda but torch.cuda.is_available() is False")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cores
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    full_loop_steps = () if args.quick else STEPS
    bench = Bench(args.device, threads, args.repeats or (5 if args.quick else 30))

    unet = tiny_unet(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(LATENT_SHAPE, generator=generator).to(device)
    out = torch.randn(LATENT_SHAPE, generator=generator).to(device)
    schedulers = make_schedulers()
    errors = check_agreement(schedulers, unet, x, device)
    load_before = os.getloadavg()[0]
    best = bench.time_all(build_cases(schedulers, unet, x, out, device, STEPS, full_loop_steps, bench.repeats))
    rows = summarise(best, schedulers, STEPS, full_loop_steps)
    meta = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "threads": threads, "cores": cores, "torch": torch.__version__,
        "diffusers": sys.modules["diffusers"].__version__, "cuda_kernels": ops.cuda_version(),
        "latent_shape": "x".join(map(str, LATENT_SHAPE)), "repeats": bench.repeats,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    benchmark.Compare(list(best.values())).print()
    print_summary(rows, meta, errors)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "agreement": errors}, indent=2))
    if any(error > TOLERANCE for error in errors.values()):
        sys.exit("bench_scheduler.py: a scheduler pair disagrees (see agreement)")


if __name__ == "__main__":
    main()
