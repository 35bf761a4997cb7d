"""The zoo's training loops: the digits classifier, the DDPM eps loss and the rectified-flow loss (an application).

Used by :mod:`adjointdeis.zoo.train` (the command that makes the shipped weights) and
:mod:`adjointdeis.zoo.reflow`; reproducible from a seed.
"""

import contextlib
import math

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import validation
from .networks import DigitClassifier, DigitsUNet

NUM_TRAIN_TIMESTEPS = 1000
BETAS = (1e-4, 0.02)  # diffusers' default linear DDPM betas
UNCOND_PROBABILITY = 0.1
FLOW_TIME_SCALE = 1000.0  # the flow UNet's time input is FLOW_TIME_SCALE * t


@contextlib.contextmanager
def seeded(seed: int):
    """Inside: the global CPU generator seeded with `seed` (what module initialisers draw from). After: the
    caller's generator state back, so training never moves the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def ddpm_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(*BETAS, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def train_classifier(images, labels, iters: int, seed: int, progress: bool = True) -> DigitClassifier:
    """Cross-entropy on the training split, with small random shifts as augmentation."""
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
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
                    ema_rate: float = 1e-3, time_scale: float = FLOW_TIME_SCALE) -> DigitsUNet:
    """The eps-prediction DDPM loss (``kind="diffusion"``) or the rectified-flow loss (``kind="flow"``),
    with label dropout (for classifier-free guidance) and an EMA.

    For ``kind="flow"`` `images` may also be a pair ``(x0, eps)`` of coupled tensors (ReFlow): the
    noise of each training example is then its paired noise instead of a fresh draw.

    Args:
        init: start from a copy of this network instead of a fresh one (fine-tuning).
        lr: peak learning rate (warm-up then cosine decay).
        ema_rate: the EMA's step towards the weights per iteration, in (0, 1] (after the first tenth, where it
            copies them; 1: the last weights).
        time_scale: for ``kind="flow"``, the UNet's time input is ``time_scale * t`` (that of the
            :class:`FlowDigitsUNet` the weights are for).
    """
    if kind not in ("diffusion", "flow"):
        raise ValueError(f"kind must be 'diffusion' or 'flow', got {kind!r}")
    validation.real(ema_rate, "ema_rate", 0.0, 1.0, low_open=True)
    pairs = isinstance(images, (tuple, list))
    if pairs and kind != "flow":
        raise ValueError("coupled (x0, eps) pairs are only for kind='flow'")
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
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
            loss = flow_loss(net, x0, images[1][idx] if pairs else torch.randn(x0.shape, generator=g), y, g,
                             time_scale)
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


def flow_loss(net: DigitsUNet, x0, eps, y, generator: torch.Generator | None = None,
              time_scale: float = FLOW_TIME_SCALE):
    """The rectified-flow loss ``|net(x_t, time_scale t, y) - (eps - x0)|^2`` at ``x_t = (1 - t) x0 + t eps``,
    t uniform in [0, 1] (drawn from `generator`)."""
    t = torch.rand(len(x0), generator=generator)
    tt = t[:, None, None, None]
    x_t = (1 - tt) * x0 + tt * eps
    return F.mse_loss(net(x_t, time_scale * t, y), eps - x0)
