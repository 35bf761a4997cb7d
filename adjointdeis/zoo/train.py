"""Trains the zoo's digits models (reproducible from a seed; a few minutes on 2 CPU cores).

    python -m adjointdeis.zoo.train --out adjointdeis/zoo/weights [--iters 5000] [--seed 0] [--threads 1]
    python -m adjointdeis.zoo.train --kind flow --out adjointdeis/zoo/weights [--iters 5000]
    python -m adjointdeis.zoo.train --kind reflow --out adjointdeis/zoo/weights [--iters 3000] [--pairs 10000]

``--kind diffusion`` (the default) writes ``digits.safetensors`` (the class-conditional eps-prediction
UNet on the diffusers-default DDPM schedule) and ``digits-classifier.safetensors`` (the classifier the
metrics use). ``--kind flow`` writes ``digits-flow.safetensors``: the same UNet trained with the
rectified-flow loss (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, t uniform in [0, 1]); the
network sees ``1000 t`` as its time input (:data:`FLOW_TIME_SCALE`, as diffusers' flow models), and
``ad.zoo.load`` wraps it so that it is called with the schedule time t itself. ``--kind reflow``
runs one round of :func:`adjointdeis.zoo.reflow.reflow` on ``digits-flow.safetensors`` in ``--out`` (pairs
from ``--solver``/``--steps``) and writes ``digits-flow-reflow.safetensors``.
"""

import argparse
import json
import pathlib

import torch

from ..solvers import SOLVERS
from . import flow_entry, read_weights
from .data import load_digits_split
from .networks import FlowDigitsUNet
from .reflow import reflow
from .training import BETAS, FLOW_TIME_SCALE, NUM_TRAIN_TIMESTEPS, train_classifier, train_diffusion

# How the flow models are sampled (safetensors metadata read by ad.zoo.load): FlowSchedule(shift, t_min,
# t_max), so t_max = 1 - 1/1000 (docs/math.md section 1) and every solver and grid spacing applies; the grid
# spacing; and that the last step lands on zero noise (see ZooModel).
FLOW_META = {"schedule": "flow", "shift": "1.0", "t_min": "0.001", "t_max": "0.999", "spacing": "uniform",
             "denoise_to_zero": "true", "time_scale": str(FLOW_TIME_SCALE), "prediction": "flow"}


def main(argv=None) -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for the .safetensors files")
    parser.add_argument("--kind", choices=("diffusion", "flow", "reflow"), default="diffusion",
                        help="diffusion: digits + classifier; flow: digits-flow (rectified flow); "
                             "reflow: digits-flow-reflow from --out's digits-flow")
    parser.add_argument("--iters", type=int, default=None,
                        help="training iterations (default 5000; 3000 fine-tuning iterations for reflow)")
    parser.add_argument("--pairs", type=int, default=10000, help="reflow: number of (noise, sample) pairs")
    parser.add_argument("--solver", choices=SOLVERS, default="heun", help="reflow: the solver that makes the pairs")
    parser.add_argument("--steps", type=int, default=25, help="reflow: its steps")
    parser.add_argument("--classifier-iters", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 is fastest for this small model on a shared machine)")
    args = parser.parse_args(argv)
    if args.iters is None:
        args.iters = 3000 if args.kind == "reflow" else 5000
    if args.iters < 1 or args.classifier_iters < 1 or args.pairs < 1 or args.steps < 1:
        parser.error("--iters, --classifier-iters, --pairs and --steps must be positive")
    if not -2**63 <= args.seed < 2**64:
        parser.error(f"--seed must be an integer in [0, 2**64 - 1], got {args.seed}")
    if args.kind == "reflow" and not (args.out / "digits-flow.safetensors").is_file():
        parser.error(f"--kind reflow fine-tunes {args.out / 'digits-flow.safetensors'}, which does not exist "
                     "(make it with --kind flow first)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))
    if args.kind == "reflow":
        state, meta = read_weights(args.out / "digits-flow.safetensors")
        base = FlowDigitsUNet(float(meta["time_scale"]))
        base.load_state_dict(state)
        entry = reflow(flow_entry(base.eval(), meta), n_pairs=args.pairs, iters=args.iters, solver=args.solver,
                       steps=args.steps, seed=args.seed)
        meta = {**FLOW_META, "iters": str(args.iters), "seed": str(args.seed), "reflow_pairs": str(args.pairs),
                "reflow_solver": f"{args.solver}-{args.steps}"}
        save_file(entry.model.state_dict(), str(args.out / "digits-flow-reflow.safetensors"), metadata=meta)
        print(f"wrote {args.out / 'digits-flow-reflow.safetensors'}")
        return
    train_x, train_y, _, _ = load_digits_split()
    if args.kind == "flow":
        model = train_diffusion(train_x, train_y, args.iters, args.seed, kind="flow")
        meta = {**FLOW_META, "iters": str(args.iters), "seed": str(args.seed)}
        save_file(model.state_dict(), str(args.out / "digits-flow.safetensors"), metadata=meta)
        print(f"wrote {args.out / 'digits-flow.safetensors'}")
        return
    classifier = train_classifier(train_x, train_y, args.classifier_iters, args.seed)
    save_file(classifier.state_dict(), str(args.out / "digits-classifier.safetensors"))
    model = train_diffusion(train_x, train_y, args.iters, args.seed)
    meta = {"iters": str(args.iters), "seed": str(args.seed), "betas": json.dumps(BETAS),
            "num_train_timesteps": str(NUM_TRAIN_TIMESTEPS), "prediction": "eps"}
    save_file(model.state_dict(), str(args.out / "digits.safetensors"), metadata=meta)
    print(f"wrote {args.out / 'digits.safetensors'} and {args.out / 'digits-classifier.safetensors'}")


if __name__ == "__main__":
    main()
