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
runs one round of :func:`adjointdeis.zoo.reflow` on ``digits-flow.safetensors`` in ``--out`` (pairs
from ``--solver``/``--steps``) and writes ``digits-flow-reflow.safetensors``.
"""

import argparse
import json
import math
import pathlib

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..solvers import SOLVERS
from .data import load_digits_split
from .networks import DigitClassifier, DigitsUNet

NUM_TRAIN_TIMESTEPS = 1000
BETAS = (1e-4, 0.02)  # diffusers' default linear DDPM betas
UNCOND_PROBABILITY = 0.1
FLOW_TIME_SCALE = 1000.0  # the flow UNet's time input is FLOW_TIME_SCALE * t
# How the flow models are sampled (safetensors metadata read by ad.zoo.load): FlowSchedule(shift, t_min,
# t_max), so t_max = 1 - 1/1000 (MATH 1) and every solver and grid spacing applies; the grid spacing; and
# that the last step lands on zero noise (see ZooModel).
FLOW_META = {"schedule": "flow", "shift": "1.0", "t_min": "0.001", "t_max": "0.999", "spacing": "uniform",
             "denoise_to_zero": "true", "time_scale": str(FLOW_TIME_SCALE), "prediction": "flow"}


def ddpm_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(*BETAS, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def train_classifier(images, labels, iters: int, seed: int, progress: bool = True) -> DigitClassifier:
    """Cross-entropy on the training split, with small random shifts as augmentation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(iters), desc="classifier", disable=None if progress else True):
        idx = torch.randint(0, len(images), (128,), generator=g)
        x = images[idx]
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def train_diffusion(images, labels, iters: int, seed: int, progress: bool = True, log_every: int = 500,
                    kind: str = "diffusion", init: DigitsUNet | None = None, lr: float = 2e-3,
                    ema_rate: float = 1e-3) -> DigitsUNet:
    """The eps-prediction DDPM loss (``kind="diffusion"``) or the rectified-flow loss (``kind="flow"``),
    with label dropout (for classifier-free guidance) and an EMA.

    For ``kind="flow"`` `images` may also be a pair ``(x0, eps)`` of coupled tensors (ReFlow): the
    noise of each training example is then its paired noise instead of a fresh draw.

    Args:
        init: start from a copy of this network instead of a fresh one (fine-tuning).
        lr: peak learning rate (warm-up then cosine decay).
        ema_rate: the EMA's step towards the weights per iteration (after the first tenth, where it copies them).
    """
    if kind not in ("diffusion", "flow"):
        raise ValueError(f"kind must be 'diffusion' or 'flow', got {kind!r}")
    pairs = isinstance(images, (tuple, list))
    if pairs and kind != "flow":
        raise ValueError("coupled (x0, eps) pairs are only for kind='flow'")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsUNet()
    if init is not None:
        net.load_state_dict(init.state_dict())
    ema = DigitsUNet()
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, iters // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters)))
    ac = ddpm_alphas_cumprod().float()
    count = len(images[0]) if pairs else len(images)
    for step in tqdm(range(iters), desc=kind, disable=None if progress else True):
        idx = torch.randint(0, count, (128,), generator=g)
        x0 = images[0][idx] if pairs else images[idx]
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=g) < UNCOND_PROBABILITY] = net.num_classes
        if kind == "diffusion":
            t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x0),), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            a = ac[t].sqrt()[:, None, None, None]
            x_t = a * x0 + (1 - a * a).sqrt() * eps
            loss = F.mse_loss(net(x_t, t.float(), y), eps)
        else:
            loss = flow_loss(net, x0, images[1][idx] if pairs else torch.randn(x0.shape, generator=g), y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, ema_rate if step > iters // 10 else 1.0)
        if log_every and (step + 1) % log_every == 0:
            print(f"{kind} iter {step + 1}/{iters}: loss {loss.item():.4f}", flush=True)
    return ema.eval()


def flow_loss(net: DigitsUNet, x0, eps, y, generator: torch.Generator | None = None):
    """The rectified-flow loss ``|net(x_t, 1000 t, y) - (eps - x0)|^2`` at ``x_t = (1 - t) x0 + t eps``,
    t uniform in [0, 1] (drawn from `generator`)."""
    t = torch.rand(len(x0), generator=generator)
    tt = t[:, None, None, None]
    x_t = (1 - tt) * x0 + tt * eps
    return F.mse_loss(net(x_t, FLOW_TIME_SCALE * t, y), eps - x0)


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
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))
    if args.kind == "reflow":
        from . import _load_state, flow_entry, reflow
        from .networks import FlowDigitsUNet

        state, meta = _load_state(args.out / "digits-flow.safetensors")
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
