"""Sample quality of the flow-matching digits models before and after ReFlow: FD-digits against NFE.

Usage: python bench/bench_flow_quality.py [--quick] [--samples N] [--json PATH] [--png PATH] [--threads T]

For ``digits-flow`` (rectified flow trained by ``python -m adjointdeis.zoo.train --kind flow``) and
``digits-flow-reflow`` (one ReFlow round on it, ``--kind reflow``): n class-conditional samples (labels
i mod 10, no guidance) per cell from the same x_T, with ``adjointdeis.sample`` on the models' own
schedule and grid (FlowSchedule from t = 0.999, uniform in t, the last step landing on zero noise as
diffusers' flow schedulers do: ``ZooModel.denoise_to_zero``), for Euler (our "ddim", exactly
the flow Euler step), Heun (flow variables, last step Euler: N steps = 2N - 1 NFE; the column's cell is
the largest N with 2N - 1 <= NFE), DPM-Solver++(2M) and (3M). Each cell gives FD-digits (the Fréchet
distance between the shipped classifier's features of the samples and of the 297 held-out digits; not
FID, comparable only at the same n) and the classifier's accuracy on the requested labels. Reference
rows: Heun with 50 steps (99 NFE), and n real training digits. ``--png`` writes the digits 0-9 from the
same noise, one row per (model, Euler with 1 and 2 steps, Heun with 5 steps).
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

from adjointdeis.benchmarks import cpu_name  # noqa: E402

import adjointdeis  # noqa: E402
from adjointdeis.demo import class_noise, fd_digits, load_kit, sample_digits  # noqa: E402
from adjointdeis.metrics import class_accuracy  # noqa: E402
from adjointdeis.zoo.data import load_digits_split  # noqa: E402

MODELS = ("digits-flow", "digits-flow-reflow")
NFES = (1, 2, 3, 5, 10, 20)
QUICK_NFES = (1, 3, 10)
SOLVERS = {"Euler": ("ddim", 1), "Heun": ("heun", 2), "DPM++2M": ("dpmpp", 2), "DPM++3M": ("dpmpp", 3)}
REFERENCE_HEUN_STEPS = 50


def steps_for(solver, nfe):
    """Sampling steps for an NFE budget: Heun takes 2N - 1 evaluations for N steps."""
    return max(1, (nfe + 1) // 2) if solver == "heun" else nfe


def run_model(name, n, nfes, seed=0):
    kit = load_kit(name)
    x_T, labels = class_noise(kit, n, seed)
    cells = {}
    for label, (solver, order) in tqdm(list(SOLVERS.items()), desc=name, disable=None, leave=False):
        for nfe in nfes:
            steps = steps_for(solver, nfe)
            start = time.perf_counter()
            images = sample_digits(kit, x_T, labels, solver, order, steps)
            cells[label, nfe] = dict(steps=steps, nfe=2 * steps - 1 if solver == "heun" else steps,
                                     fd=fd_digits(kit, images), accuracy=class_accuracy(kit.classifier, images, labels),
                                     seconds=time.perf_counter() - start)
    images = sample_digits(kit, x_T, labels, "heun", 2, REFERENCE_HEUN_STEPS)
    reference = dict(steps=REFERENCE_HEUN_STEPS, nfe=2 * REFERENCE_HEUN_STEPS - 1, fd=fd_digits(kit, images),
                     accuracy=class_accuracy(kit.classifier, images, labels))
    return dict(cells=cells, reference=reference), kit


def save_rows(path):
    """Digits 0-9 from the same noise: per model, Euler at 1 and 2 steps and Heun at 5 steps (9 NFE)."""
    from adjointdeis.images import grid_pixels, write_png

    rows = []
    for name in MODELS:
        kit = load_kit(name)
        x_T, labels = class_noise(kit, 10, seed=1)
        for solver, order, steps in (("ddim", 1, 1), ("ddim", 1, 2), ("heun", 2, 5)):
            rows.append(list(sample_digits(kit, x_T, labels, solver, order, steps)))
    write_png(path, grid_pixels(rows))
    print(f"wrote {path}: rows {', '.join(f'{m} {r}' for m in MODELS for r in ('Euler 1', 'Euler 2', 'Heun 5'))}")


def print_table(name, result, nfes, n):
    print(f"\n{name}: FD-digits / classifier accuracy against NFE ({n} class-conditional samples per cell; "
          f"lower FD is better; not FID)")
    print(f"{'solver':<9}" + "".join(f"{f'NFE={k}':>15}" for k in nfes))
    for label in SOLVERS:
        row = f"{label:<9}"
        for k in nfes:
            c = result["cells"][label, k]
            mark = "" if c["nfe"] == k else f"({c['nfe']})"
            row += f"{mark:>4}{c['fd']:>6.2f} {c['accuracy']:>4.0%}"
        print(row)
    r = result["reference"]
    print(f"reference: Heun {r['steps']} steps ({r['nfe']} NFE): FD-digits {r['fd']:.2f}, accuracy {r['accuracy']:.0%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NFE 1, 3, 10 and 200 samples")
    parser.add_argument("--samples", type=int, help="samples per cell (default 1000; --quick 200)")
    parser.add_argument("--json", metavar="PATH", help="write the results and run facts as JSON")
    parser.add_argument("--png", metavar="PATH", help="also write a PNG of digits per model and solver")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.samples or (200 if args.quick else 1000)
    nfes = QUICK_NFES if args.quick else NFES
    started = time.perf_counter()
    out = dict(meta=dict(adjointdeis=adjointdeis.__version__, torch=torch.__version__, threads=args.threads,
                         machine=platform.machine(), cpu=cpu_name(), samples=n, nfes=list(nfes),
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat()))
    kit = None
    for name in MODELS:
        result, kit = run_model(name, n, nfes)
        print_table(name, result, nfes, n)
        out[name] = {**result, "cells": {f"{label} NFE={k}": v for (label, k), v in result["cells"].items()}}
    train_x, _, _, _ = load_digits_split()
    real = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:n]]
    out["real_digits"] = dict(n=len(real), fd=fd_digits(kit, real))
    print(f"\n{len(real)} real training digits: FD-digits {out['real_digits']['fd']:.2f}")
    if args.png:
        save_rows(args.png)
    out["meta"]["seconds"] = time.perf_counter() - started
    print(f"total {out['meta']['seconds']:.0f} s on {cpu_name()}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
