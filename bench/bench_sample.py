"""Times whole ``adjointdeis.sample`` loops with a free model: the sampler's own cost per step.

Usage: python bench/bench_sample.py [--steps 10 25 50] [--min-run-time 2] [--threads 1] [--json PATH]

The model returns a precomputed output, so what is timed is everything ``sample`` spends outside the
network: planning the grid and its coefficient table (once per call) and one fused step per model
evaluation. Baseline: diffusers' ``DPMSolverMultistepScheduler`` loop (``set_timesteps`` + ``step``) on the
same latents, when diffusers is installed. The case is :func:`adjointdeis.benchmarks.bench_overhead`, the
one the ``adjointdeis bench`` command runs.
"""

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adjointdeis.benchmarks import OVERHEAD_SHAPE, bench_overhead  # noqa: E402
from machine import cpu_name  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
