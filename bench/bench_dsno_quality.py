"""One-evaluation sampling with the distilled DSNO student against the multistep solvers on the same noise.

Usage: python bench/bench_dsno_quality.py [--samples 1000] [--threads 1] [--json PATH]

FD-digits (see bench_quality.py: a Fréchet distance in the shipped classifier's features, not FID) and class
accuracy of n class-conditional samples (labels i mod 10, the same x_T in every cell, the same x_T as
bench_quality.py): DSNO (``digits-dsno``) at 1 NFE; DDIM and DPM-Solver++(2M) at NFE 1, 2, 3, 5, 10 on diffusers'
trailing grid landing on zero noise (exactly bench_quality.py's cells); and the teacher: the shipped digits
model with DPM-Solver++(2M) along the distillation grid (20 steps), whose data predictions DSNO regressed.
"""

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench_quality import SOLVERS, our_sample  # noqa: E402

from adjointdeis import dsno, zoo  # noqa: E402
from adjointdeis.dsno.distillation import teacher_trajectories  # noqa: E402
from adjointdeis.demo import fd_digits, load_kit  # noqa: E402
from adjointdeis.metrics import class_accuracy  # noqa: E402

NFES = (1, 2, 3, 5, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kit = load_kit()
    n = args.samples
    x_T = torch.randn(n, *kit.shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % kit.num_classes
    rows = {}

    def record(name, nfe, images, seconds):
        rows[name, nfe] = dict(fd=fd_digits(kit, images), accuracy=class_accuracy(kit.classifier, images, labels),
                               seconds=seconds)

    student = zoo.load("digits-dsno").model
    start = time.perf_counter()
    images = torch.cat([student.sample(x_T[i:i + 250], labels[i:i + 250]) for i in range(0, n, 250)])
    record("DSNO", 1, images, time.perf_counter() - start)
    for name in ("DDIM", "DPM++2M"):
        options, factory, to_zero = SOLVERS[name]
        for nfe in NFES:
            start = time.perf_counter()
            images = our_sample(kit, factory(), nfe, x_T, labels, 1, options, to_zero)
            record(name, nfe, images, time.perf_counter() - start)
    start = time.perf_counter()
    teacher = teacher_trajectories(kit.model, kit.schedule, dsno.trajectory_times(kit.schedule, student.n_times),
                                   x_T, labels, progress=False)
    record("teacher", 20, teacher.targets[:, -1], time.perf_counter() - start)

    print(f"FD-digits / classifier accuracy, {n} class-conditional samples per cell (lower FD is better; not FID)")
    print(f"{'sampler':<28}" + "".join(f"{f'NFE={k}':>15}" for k in NFES))
    for name, label in (("DDIM", "DDIM"), ("DPM++2M", "DPM-Solver++(2M)")):
        print(f"{label:<28}" + "".join(f"{rows[name, k]['fd']:>9.2f} {rows[name, k]['accuracy']:>4.0%}"
                                       for k in NFES))
    d = rows["DSNO", 1]
    print(f"{'DSNO (digits-dsno)':<28}{d['fd']:>9.2f} {d['accuracy']:>4.0%}   (one network evaluation, "
          f"{d['seconds']:.2f} s for {n})")
    t = rows["teacher", 20]
    print(f"teacher (DPM-Solver++(2M), 20 steps on the distillation grid): FD-digits {t['fd']:.2f}, "
          f"accuracy {t['accuracy']:.0%}")
    if args.json:
        args.json.write_text(json.dumps({f"{k[0]}@{k[1]}": v for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
