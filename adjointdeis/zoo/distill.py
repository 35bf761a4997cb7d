"""Distils the shipped digits model into the one-evaluation DSNO student ``digits-dsno``.

    python -m adjointdeis.zoo.distill --out adjointdeis/zoo/weights [--iters 3000] [--trajectories 10000]
        [--checkpoint PATH] [--threads 1]

Teacher: the shipped ``digits`` model with DPM-Solver++(2M), 5 log-SNR steps between consecutive trajectory
times (20 in all); student: DSNO with T=4 trajectory times, K=2 modes (the paper's CIFAR-10 setting). Resumes
from --checkpoint when it exists.
"""

import argparse
import json
import pathlib

import torch

from ..dsno.distillation import distill
from . import load

TIMES, MODES = 4, 2


def main(argv=None) -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for digits-dsno.safetensors")
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--trajectories", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=pathlib.Path, help="checkpoint file (resumed from when it exists)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.trajectories < 1:
        parser.error("--iters and --trajectories must be positive")
    torch.set_num_threads(max(1, args.threads))
    teacher = load("digits")
    teacher.model.requires_grad_(False)
    try:
        student = distill(teacher.model, teacher.schedule, TIMES, args.trajectories, args.iters, modes=MODES,
                          prediction=teacher.prediction, num_classes=teacher.num_classes,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint=args.checkpoint)
    except ValueError as error:   # a setting distill refuses, named (before any teacher trajectory)
        parser.error(" ".join(str(error).splitlines()))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": "digits", "modes": str(MODES), "times": json.dumps(student.times.tolist()),
            "iters": str(args.iters), "trajectories": str(args.trajectories), "seed": str(args.seed)}
    path = args.out / "digits-dsno.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(path), metadata=meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
