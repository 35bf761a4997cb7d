"""Is the learned field a score? Both conservativity diagnostics (docs/math.md section 9) for the shipped digits model
next to the exact score of a Gaussian fitted to the training digits, at several times.

Usage: python bench/bench_diagnostics.py [--times 50 200 500 800] [--n 64] [--probes 32] [--points 32]
                                         [--radii 0.25 1 4] [--threads 1]

Points: the first n held-out digits noised at each t (one fixed noise draw), conditioned on their labels.
Asymmetry: ||J - J^T||_F / ||J||_F of the Jacobian of s = -eps/sigma_t, from `probes` Gaussian probes per
digit (one JVP and one VJP each). Circulation: mean |∮ s.dl| / ∮ |s.dl| over one random planar circle
per digit, `points` points, at each radius. Every entry is the mean over the digits ± its standard error.
"""

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adjointdeis.demo import zoo_table  # noqa: E402
from adjointdeis.diagnostics import format_table, loop_circulation  # noqa: E402
from adjointdeis.benchmarks import cpu_name  # noqa: E402


def radius_table(times, n, points, radii, seed=0) -> str:
    """Loop circulation of the digits model against the circle radius (it grows about linearly for small circles)."""
    from adjointdeis import zoo
    from adjointdeis.zoo.data import load_digits_split

    entry = zoo.load("digits")
    entry.model.requires_grad_(False)
    _, _, test_x, test_y = load_digits_split()
    x0, labels = test_x[:n], test_y[:n]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    lines = ["| t | " + " | ".join(f"r = {r:g}" for r in radii) + " |", "|---|" + "---|" * len(radii)]
    for t in times:
        tt = torch.tensor(float(t), dtype=torch.float64)
        x = float(entry.schedule.alpha(tt)) * x0 + float(entry.schedule.sigma(tt)) * eps
        cells = [str(loop_circulation(entry.model, x, t, radius=r, points=points, schedule=entry.schedule,
                                      cond=labels, generator=torch.Generator().manual_seed(seed + 2)))
                 for r in radii]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=float, nargs="+", default=[50, 200, 500, 800])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--points", type=int, default=32)
    parser.add_argument("--radius", type=float, default=1.0, help="radius of the main table's circles")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s)")
    start = time.perf_counter()
    rows = zoo_table("digits", args.times, n=args.n, probes=args.probes, points=args.points, radius=args.radius)
    print(format_table(rows))
    print(f"\n{args.n} held-out digits per t, {args.probes} probes, radius {args.radius:g}, {args.points} points: "
          f"{time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    print("\nLoop circulation of the digits model against the radius:\n")
    print(radius_table(args.times, args.n, args.points, args.radii))
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
