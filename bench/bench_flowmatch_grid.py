"""A better solver on FlowMatchEuler's own grid: FD-digits of digits-flow against NFE, Euler vs DPM-Solver++ vs DEIS.

Usage: python bench/bench_flowmatch_grid.py [--quick] [--samples N] [--json PATH] [--threads T]

The scheduler a FLUX/SD3 user gets from the one-line swap, ``FusedMultistepScheduler.from_config(<a
FlowMatchEulerDiscreteScheduler config>)``, with ``solver=`` overridden: Euler (the FlowMatchEuler sampler itself),
DPM-Solver++(2M) and (3M), DEIS-2 and DEIS-3, all on FlowMatchEuler's grid and float timesteps (from t = 1;
diffusers' lowered final orders). It drives ``digits-flow`` (rectified flow, t uniform in [0, 1]) in a pipeline's
loop (``model(x, timestep / 1000, label)``; ``scheduler.step``), for shift 1 (diffusers' default) and shift 3
(SD3's), n class-conditional samples per cell from the same noise. Each cell gives FD-digits (the Fréchet
distance between the shipped classifier's features of the samples and of the 297 held-out digits; not FID) and
the classifier's accuracy on the requested labels.
"""

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

import adjointdeis  # noqa: E402
from adjointdeis.demo import class_noise, fd_digits, load_kit  # noqa: E402
from adjointdeis.diffusers import FusedMultistepScheduler  # noqa: E402
from adjointdeis.metrics import class_accuracy  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402

NFES = (3, 5, 10, 20)
QUICK_NFES = (3, 10)
SHIFTS = (1.0, 3.0)
SOLVERS = {"Euler": ("ddim", 1), "DPM++2M": ("dpmpp", 2), "DPM++3M": ("dpmpp", 3), "DEIS-2": ("deis", 2),
           "DEIS-3": ("deis", 3)}


def pipeline_loop(kit, scheduler, x_T, labels, steps, batch_size=250):
    """FluxPipeline's loop around the digits model: set_timesteps, then model and step per timestep."""
    chunks = []
    for i in range(0, len(x_T), batch_size):
        x, cond = x_T[i:i + batch_size], labels[i:i + batch_size]
        scheduler.set_timesteps(steps)
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = kit.model(x, (t / 1000).expand(len(x)), cond)
                x = scheduler.step(out, t, x, return_dict=False)[0]
        chunks.append(x)
    return torch.cat(chunks)


def run(n, nfes, seed=0):
    kit = load_kit("digits-flow")
    x_T, labels = class_noise(kit, n, seed)
    cells = {}
    todo = [(shift, label, nfe) for shift in SHIFTS for label in SOLVERS for nfe in nfes]
    for shift, label, nfe in tqdm(todo, desc="cells", disable=None, leave=False):
        solver, order = SOLVERS[label]
        config = FlowMatchEulerDiscreteScheduler(shift=shift).config
        scheduler = FusedMultistepScheduler.from_config(config, solver=solver, solver_order=order)
        start = time.perf_counter()
        images = pipeline_loop(kit, scheduler, x_T, labels, nfe)
        cells[shift, label, nfe] = dict(fd=fd_digits(kit, images), accuracy=class_accuracy(kit.classifier, images,
                                                                                            labels),
                                        seconds=time.perf_counter() - start)
    return cells


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NFE 3 and 10, 200 samples")
    parser.add_argument("--samples", type=int, help="samples per cell (default 1000; --quick 200)")
    parser.add_argument("--json", metavar="PATH", help="write the results and run facts as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.samples or (200 if args.quick else 1000)
    nfes = QUICK_NFES if args.quick else NFES
    started = time.perf_counter()
    cells = run(n, nfes)
    print(f"digits-flow on FlowMatchEulerDiscreteScheduler's grid: FD-digits / classifier accuracy against NFE "
          f"({n} class-conditional samples per cell; lower FD is better; not FID)")
    print(f"{'shift':<6}{'solver':<9}" + "".join(f"{f'NFE={k}':>14}" for k in nfes))
    for shift in SHIFTS:
        for label in SOLVERS:
            print(f"{shift:<6g}{label:<9}" + "".join(f"{cells[shift, label, k]['fd']:>9.2f} "
                                                     f"{cells[shift, label, k]['accuracy']:>4.0%}" for k in nfes))
    seconds = time.perf_counter() - started
    print(f"total {seconds:.0f} s on {cpu_name()}, {args.threads} thread(s)")
    if args.json:
        out = dict(meta=dict(adjointdeis=adjointdeis.__version__, torch=torch.__version__, threads=args.threads,
                             cpu=cpu_name(), machine=platform.machine(), samples=n, nfes=list(nfes), seconds=seconds,
                             date=datetime.datetime.now(datetime.timezone.utc).isoformat()),
                   cells={f"shift={s} {label} NFE={k}": v for (s, label, k), v in cells.items()})
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
