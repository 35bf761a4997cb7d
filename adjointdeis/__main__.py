"""Command line: ``adjointdeis info`` (build facts) and ``adjointdeis demo`` (the samplers at work)."""

import argparse
import sys

import torch

from . import __version__, ops
from ._extension import build_info


def info(_args) -> None:
    """Prints versions, the torch _C was built against, and the compiled CUDA kernels."""
    built = build_info()
    cuda = ops.cuda_version()
    print(f"adjointdeis {__version__}")
    print(f"torch {torch.__version__} (CUDA runtime {torch.version.cuda}); _C built against torch {built.get('torch', '?')}")
    if cuda >= 0:
        print(f"CUDA kernels: compiled with CUDA {cuda // 1000}.{cuda % 1000 // 10} "
              f"for compute capabilities {ops.cuda_arch_list()}")
    else:
        print("CUDA kernels: not compiled (CUDA tensors use the pure-PyTorch reference)")
    print(f"CUDA device visible: {torch.cuda.is_available()}")


def demo(args) -> None:
    """Sampling accuracy against the exact solution of a Gaussian model, per solver and NFE."""
    from .demo import gaussian_accuracy_table

    print(gaussian_accuracy_table(steps=args.steps))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="adjointdeis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and what was compiled").set_defaults(run=info)
    demo_parser = commands.add_parser("demo", help="solver accuracy on an exactly solvable model")
    demo_parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50],
                             help="step counts to compare (default: 5 10 20 50)")
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    if getattr(args, "steps", None) is not None and min(args.steps) < 1:
        parser.error("--steps must be positive")
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
