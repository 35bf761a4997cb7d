"""adjointdeis command line: the shipped digits model sampled, guided and measured.

  adjointdeis demo [--out DIR] [--quick]     sample grids, FD-digits table, a guided morph, PNGs
  adjointdeis sample --solver dpmpp --order 2 --steps 10 --class 3 --n 64 --out grid.png
  adjointdeis sample --model digits-flow --solver heun --steps 5   (a flow-matching model; also digits-flow-reflow)
  adjointdeis sample --solver dsno           one network evaluation of the distilled DSNO student (digits-dsno)
  adjointdeis guide --from-index I --to-index J --iters 50 --grad discrete --out morph.png
  adjointdeis bench [--quick] [--json out.json] [--plot out.png]
  adjointdeis accuracy [--steps 5 10 20 50]  solver errors on an exactly solvable Gaussian model
  adjointdeis diagnose --model digits [--times 50 200 500 800] [--probes 32]   is the learned field a score?
  adjointdeis info                           versions and what was compiled
"""

import argparse
import json
import os
import pathlib
import sys
import time
import warnings

import torch

from . import __version__, ops, validation
from ._extension import build_info, cpu_name
from .schedules import SPACINGS
from .solvers import SOLVERS, resolve_order, sde_solvers
from .zoo import MODELS

THREADS_HELP = ("torch CPU threads (default 1: the networks are tiny, and more threads only help large batches "
                "on an otherwise idle machine)")


class CommandError(Exception):
    """A bad argument found after parsing; printed as the command's usage error."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def seed_int(text: str) -> int:
    """An integer torch.Generator.manual_seed takes: in [0, 2**64 - 1] (or a negative one of 64 bits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64 - 1], got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number (argparse's ``float`` also takes "nan" and "inf")."""
    try:
        return validation.real(float(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None


def output_folder(path: pathlib.Path, echo=print) -> pathlib.Path:
    """Returns `path` as a folder, creating it (and saying so) if missing.

    Raises:
        CommandError if it exists and is not a folder, or cannot be created.
    """
    if path.exists() and not path.is_dir():
        raise CommandError(f"--out {path} exists and is not a folder")
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as error:
            raise CommandError(f"cannot create the output folder {path}: {error.strerror}") from None
        echo(f"created folder {path}")
    return path


def output_file(path: pathlib.Path, suffix: str, option: str = "--out", echo=print) -> pathlib.Path:
    """Checks an output file name (its suffix, not a folder) and creates its folder if missing."""
    if path.suffix.lower() != suffix:
        raise CommandError(f"{option} {path} must be a {suffix} file name")
    if path.is_dir():
        raise CommandError(f"{option} {path} is a folder; give a file name ending in {suffix}")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise CommandError(f"{option} {path}: {parent} exists and is not a folder")
    if not parent.exists():
        output_folder(parent, echo)
    return path


def info(_args) -> None:
    """Prints versions, the torch _C was built against, the compiled CUDA kernels and the CPU."""
    built = build_info()
    cuda = ops.cuda_version()
    print(f"adjointdeis {__version__}")
    print(f"torch {torch.__version__} (CUDA runtime {torch.version.cuda}); _C: LibTorch stable ABI for torch >= "
          f"{built.get('torch_target', '?')}, built with torch {built.get('built_with_torch', '?')}")
    if cuda >= 0:
        print(f"CUDA kernels: compiled with CUDA {cuda // 1000}.{cuda % 1000 // 10} "
              f"for compute capabilities {ops.cuda_arch_list()}")
    else:
        print("CUDA kernels: not compiled (CUDA tensors use the pure-PyTorch reference)")
    print(f"CUDA device visible: {torch.cuda.is_available()}")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores")


def accuracy(args) -> None:
    """Sampling accuracy against the exact solution of a Gaussian model, per solver and NFE."""
    from .demo import gaussian_accuracy_table

    print(gaussian_accuracy_table(steps=args.steps))


def diagnose_command(args) -> None:
    """Conservativity diagnostics of a shipped model next to an exact Gaussian score, per time."""
    from .demo import zoo_table
    from .diagnostics import format_table
    from .zoo.data import HELD_OUT

    if args.probes < 2:
        raise CommandError(f"--probes must be >= 2, got {args.probes}")
    if args.points < 3:
        raise CommandError(f"--points must be >= 3, got {args.points}")
    if not args.radius > 0:
        raise CommandError(f"--radius must be > 0, got {args.radius}")
    if args.n > HELD_OUT:
        raise CommandError(f"--n must be at most {HELD_OUT}, the number of held-out digits, got {args.n}")
    times = args.times or ([0.05, 0.2, 0.5, 0.8] if args.model.startswith("digits-flow") else [50, 200, 500, 800])
    start = time.perf_counter()
    with warnings.catch_warnings():   # torch's forward-mode AD setup scripts its decompositions with torch.jit
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
        rows = zoo_table(args.model, times, n=args.n, probes=args.probes, points=args.points, radius=args.radius,
                         seed=args.seed)
    print(format_table(rows))
    seconds = time.perf_counter() - start
    print(f"{args.n} held-out digits noised at each t, {args.probes} probes, circles of radius {args.radius:g} "
          f"through {args.points} points; estimate ± standard error over the digits; {seconds:.1f} s")


def demo(args) -> None:
    from .demo import run_demo

    out = output_folder(args.out)
    run_demo(out, quick=args.quick, seed=args.seed, progress=True)


def sample_command(args) -> None:
    from . import zoo
    from .demo import class_noise, load_kit, sample_digits
    from .images import save_grid
    from .metrics import class_accuracy

    dsno = args.solver == "dsno" or args.model == "digits-dsno"   # the one-evaluation student
    if dsno:
        if args.model not in ("digits", "digits-dsno"):
            raise CommandError(f"--solver dsno samples the student distilled from digits, not from {args.model}")
        if args.solver not in (None, "dsno"):
            raise CommandError(f"--model digits-dsno samples with the DSNO student (--solver dsno), not --solver "
                               f"{args.solver}")
        for option, value in (("--order", args.order), ("--guidance", args.guidance), ("--sde", args.sde or None),
                              ("--steps", args.steps), ("--spacing", args.spacing)):
            if value is not None:
                raise CommandError(f"{option} does not apply to --solver dsno (one evaluation of the distilled "
                                   "student)")
    else:
        args.solver = args.solver or "dpmpp"
        args.steps = args.steps or 10
        try:
            order = resolve_order(args.solver, args.order, args.sde)
        except ValueError as error:
            raise CommandError(str(error)) from None
        if args.guidance is not None and args.guidance < 0:
            raise CommandError(f"--guidance must be >= 0, got {args.guidance}")
    if args.digit is not None and not 0 <= args.digit <= 9:
        raise CommandError(f"--class must be a digit 0-9, got {args.digit}")
    out = output_file(args.out, ".png")
    kit = load_kit("digits" if dsno else args.model)
    x_T, labels = class_noise(kit, args.n, args.seed, args.digit)
    start = time.perf_counter()
    if dsno:
        student = zoo.load("digits-dsno").model
        images = torch.cat([student.sample(x_T[i:i + 250], labels[i:i + 250]) for i in range(0, args.n, 250)])
        how = f"with DSNO (digits-dsno, T={student.n_times}), 1 network evaluation"
    else:
        spacing = args.spacing or kit.spacing
        images = sample_digits(kit, x_T, labels, args.solver, order, args.steps, guidance=args.guidance,
                               seed=args.seed, sde=args.sde, spacing=spacing, progress=True)
        evaluations = SOLVERS[args.solver].evaluations(args.steps)
        guidance = "" if args.guidance is None else f", guidance {args.guidance:g}"
        how = (f"from {args.model}, {args.solver}-{order}{' SDE' if args.sde else ''}, {args.steps} steps = "
               f"{evaluations} model evaluations ({spacing} grid){guidance}")
    seconds = time.perf_counter() - start
    save_grid(out, images, 10 if args.digit is None else max(1, int(round(args.n ** 0.5))))
    what = "digits 0-9 in columns" if args.digit is None else f"digit {args.digit}"
    print(f"{args.n} samples ({what}) {how}: {seconds:.1f} s; "
          f"the classifier recognises {class_accuracy(kit.classifier, images, labels):.0%}")
    print(f"wrote {out}")


def guide_command(args) -> None:
    from .demo import load_kit, morph, morph_rows, verification_threshold
    from .images import grid_pixels, save_line_plot, write_png
    from .zoo.data import HELD_OUT

    for option, index in (("--from-index", args.from_index), ("--to-index", args.to_index)):
        if not 0 <= index < HELD_OUT:
            raise CommandError(f"{option} {index} is out of range: there are {HELD_OUT} held-out digits, "
                               f"0-{HELD_OUT - 1}")
    if not args.lr > 0:
        raise CommandError(f"--lr must be > 0, got {args.lr}")
    if args.grad != "adjoint":
        for option, value, default in (("--adjoint-steps", args.adjoint_steps, None),
                                       ("--adjoint-order", args.adjoint_order, 1),
                                       ("--adjoint-form", args.adjoint_form, "eps")):
            if value != default:
                raise CommandError(f"{option} applies to --grad adjoint")
    out = output_file(args.out, ".png")
    kit = load_kit()
    threshold, _ = verification_threshold(kit)
    result = morph(kit, [(args.from_index, args.to_index)], steps=args.steps, iters=args.iters, lr=args.lr,
                   grad=args.grad, adjoint_order=args.adjoint_order, adjoint_steps=args.adjoint_steps,
                   adjoint_form=args.adjoint_form, threshold=threshold, snapshot_every=max(1, args.iters // 4),
                   progress=True)
    write_png(out, grid_pixels(morph_rows(kit, result), scale=6))
    curve = save_line_plot(out.with_name(out.stem + "-loss.png"), {"loss": result.losses},
                           title=f"morph loss (grad={args.grad})", xlabel="iteration", ylabel="identity loss")
    a, b = int(kit.test_y[args.from_index]), int(kit.test_y[args.to_index])
    within = "both within" if result.accepted[0] else "not both within"
    print(f"morph {a} (#{args.from_index}) -> {b} (#{args.to_index}), grad={args.grad}, {args.iters} iterations "
          f"in {result.seconds:.1f} s: loss {result.losses[0]:.3f} -> {float(result.final_losses[0]):.3f}")
    print(f"feature distances to the endpoints {float(result.distance_a[0]):.3f} / {float(result.distance_b[0]):.3f}: "
          f"{within} the same-digit threshold {threshold:.3f}")
    print(f"{out.name}: endpoint A | the morph at iterations {', '.join(map(str, sorted(result.snapshots)))} "
          f"and after the last | endpoint B")
    print(f"wrote {out} and {curve}")


def bench_command(args) -> None:
    from .benchmarks import format_table, plot, run_all
    from .images import have_matplotlib

    json_path = None if args.json is None else output_file(args.json, ".json", "--json")
    plot_path = None if args.plot is None else output_file(args.plot, ".png", "--plot")
    if plot_path is not None and not have_matplotlib():
        raise CommandError("--plot needs matplotlib: pip install 'adjointdeis[plot]'")
    result = run_all(args.quick, progress=lambda name: print(f"running the {name} benchmark...", file=sys.stderr))
    print(format_table(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")
    if plot_path is not None:
        plot(result, plot_path)
        print(f"wrote {plot_path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adjointdeis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"adjointdeis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name, run, help_text, description=None):
        sub = commands.add_parser(name, help=help_text, description=description or help_text)
        sub.set_defaults(run=run)
        return sub

    command("info", info, "versions and what was compiled")

    p = command("demo", demo, "the main job on the shipped digits model",
                "Samples class-conditional digit grids with DDIM, DEIS-3 and DPM-Solver++(2M) at 5, 10 and 20 steps, "
                "prints FD-digits (a Fréchet distance in the shipped classifier's features, not FID) and accuracy, "
                "morphs pairs of held-out digits by optimising x_T and the class embedding through the sampler, "
                "and writes PNGs (samples-*.png, morph.png, morph-loss.png) into --out, whose path it prints last.")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("adjointdeis-demo"),
                   help="output folder, created if missing (default: ./adjointdeis-demo)")
    p.add_argument("--quick", action="store_true", help="fewer samples, steps and iterations (a smoke test)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)

    p = command("sample", sample_command, "sample a grid of digits from a shipped model",
                "Samples digits from a shipped class-conditional model (the diffusion model, the flow-matching "
                "model before and after ReFlow, or the one-evaluation DSNO student) with one of the fused solvers "
                "and writes them as a PNG grid (dark ink on white).")
    p.add_argument("--model", choices=MODELS, default="digits",
                   help="digits (eps, VP), digits-flow (rectified flow), digits-flow-reflow, or digits-dsno "
                        "(implies --solver dsno) (default digits)")
    p.add_argument("--solver", choices=(*SOLVERS, "dsno"),
                   help="a fused solver, or dsno: one evaluation of the DSNO student distilled from digits "
                        "(default dpmpp)")
    orders = "; ".join(f"{name} {'/'.join(map(str, entry.orders))}" for name, entry in SOLVERS.items())
    p.add_argument("--order", type=int, help=f"solver order ({orders}); default: the solver's")
    p.add_argument("--steps", type=positive_int,
                   help="sampling steps = model evaluations (2 steps - 1 for heun) (default 10)")
    p.add_argument("--class", dest="digit", type=int, metavar="DIGIT",
                   help="the digit 0-9 to sample (default: the digits 0-9 in turn, one per column)")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("grid.png"), help="PNG file (default grid.png)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of x_T and of the SDE noise")
    p.add_argument("--sde", action="store_true", help=f"stochastic sampling: {sde_solvers()}")
    p.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale (default: none)")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="time grid (default: the model's: logsnr for digits, uniform in t for the flow models)")
    p.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)

    p = command("guide", guide_command, "morph two held-out digits by optimising x_T and z through the sampler",
                "Optimises the initial noise x_T and the class embedding z with Adam so that the sample's classifier "
                "features are equally close to those of two held-out digits (the AdjointDEIS face-morphing identity "
                "loss at digit scale), differentiating through DPM-Solver++(2M). Writes the morph's progress as a PNG "
                "row and its loss curve next to it (<out>-loss.png).")
    p.add_argument("--from-index", type=int, default=0, help="held-out digit to start from (0-296, default 0)")
    p.add_argument("--to-index", type=int, default=1, help="held-out digit to morph towards (0-296, default 1)")
    p.add_argument("--iters", type=positive_int, default=50, help="optimiser iterations (default 50)")
    p.add_argument("--grad", choices=("discrete", "adjoint"), default="discrete",
                   help="exact discrete adjoint, or AdjointDEIS (continuous adjoint) (default discrete)")
    p.add_argument("--adjoint-order", type=int, choices=(1, 2), default=1, help="AdjointDEIS order (1 or 2M)")
    p.add_argument("--adjoint-steps", type=positive_int, help="AdjointDEIS steps (default: the sampling grid)")
    p.add_argument("--adjoint-form", choices=("eps", "x0"), default="eps",
                   help="AdjointDEIS in the paper's noise-prediction form (default) or the data-prediction form, "
                        "which keeps the gradient's direction on coarse adjoint grids")
    p.add_argument("--steps", type=positive_int, default=10, help="sampling steps (default 10)")
    p.add_argument("--lr", type=finite_float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("morph.png"), help="PNG file (default morph.png)")
    p.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)

    p = command("bench", bench_command, "kernel, sampler-overhead and gradient benchmarks in one table",
                "Runs the package's benchmark cases (adjointdeis.benchmarks; the repository's bench/ scripts, not in "
                "the wheel, are their full versions): the fused 2M step against "
                "eager torch, sample()'s per-step overhead against diffusers' scheduler loop, and gradient time and "
                "peak memory on the digits model (discrete and AdjointDEIS against autograd). Prints one table.")
    p.add_argument("--quick", action="store_true", help="fewer cases, shorter timing")
    p.add_argument("--json", type=pathlib.Path, help="also write the rows and run facts as JSON")
    p.add_argument("--plot", type=pathlib.Path, help="also draw the ratios as a PNG (needs matplotlib: the plot extra)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")

    p = command("accuracy", accuracy, "solver accuracy on an exactly solvable Gaussian model",
                "Max error of every solver against the closed-form probability-flow ODE solution of Gaussian data, "
                "per step count.")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[5, 10, 20, 50],
                   help="step counts to compare (default: 5 10 20 50)")
    p.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)

    p = command("diagnose", diagnose_command, "is the learned field a score? (Jacobian asymmetry, loop circulation)",
                "Estimates, on held-out digits noised at each time, the relative asymmetry ||J - J^T||_F / ||J||_F of "
                "the Jacobian of the model's score field s = -eps/sigma and its normalised circulation around random "
                "planar circles, next to the exact score of a Gaussian fitted to the training digits (zero up to "
                "rounding). A true score gives zero for both.")
    p.add_argument("--model", choices=[m for m in MODELS if m != "digits-dsno"], default="digits",
                   help="shipped model (default digits)")
    p.add_argument("--times", type=finite_float, nargs="+",
                   help="model times: training steps for digits (default 50 200 500 800), flow times in (0, 1) for "
                        "the flow models (default 0.05 0.2 0.5 0.8)")
    p.add_argument("--probes", type=positive_int, default=32, help="random probes per digit (default 32)")
    p.add_argument("--points", type=positive_int, default=32, help="points per circle (default 32)")
    p.add_argument("--radius", type=finite_float, default=1.0, help="circle radius in pixel units of [-1, 1] (default 1)")
    p.add_argument("--n", type=positive_int, default=64, help="held-out digits, at most 297 (default 64)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help=THREADS_HELP)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        args.run(args)
    except (CommandError, ValueError, TypeError) as error:   # a user error: the library names the argument
        parser.exit(2, f"adjointdeis {args.command}: error: {' '.join(str(error).splitlines())}\n")
    except (FileNotFoundError, ImportError, FloatingPointError) as error:   # FloatingPointError: a non-finite sample
        parser.exit(1, f"adjointdeis {args.command}: error: {error}\n")
    return 0
