"""One round of ReFlow (Liu et al., "Flow Straight and Fast", 2022) for the zoo's flow models (an application).

    pairs = reflow_pairs(entry, n_pairs=10000, solver="heun", steps=25)   # (noise, sample, labels)
    straighter = reflow(entry, n_pairs=10000, iters=3000)                 # a new ZooModel

The flow model's own sampler couples each noise x_T with the sample it produces; fine-tuning a copy
on the straight lines ``x_t = (1 - t) x_0 + t x_T`` between the coupled pairs (target ``x_T - x_0``)
straightens its trajectories, so few-step samplers lose less.
"""

import copy

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import validation
from ..sampling import sample
from . import ZooModel
from .training import FLOW_TIME_SCALE, train_diffusion


def _check_flow(entry: ZooModel) -> None:
    if entry.prediction != "flow":
        raise ValueError(f"reflow needs a flow-matching model (prediction 'flow'), got prediction {entry.prediction!r}")


def reflow_pairs(entry: ZooModel, n_pairs: int = 10000, solver: str = "heun", steps: int = 25, seed: int = 0,
                 batch_size: int = 500, progress: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(x_T, x_0, labels): standard normal noise, the model's class-conditional sample from it, and the
    labels (cycling 0..num_classes-1), all on the CPU, reproducible from `seed`.

    Args:
        entry: a flow model from the zoo (or :func:`reflow`).
        n_pairs: number of pairs.
        solver, steps: the sampler that couples them (on the entry's schedule, grid spacing and
            ``denoise_to_zero``).

    Raises:
        ValueError for a non-flow entry, n_pairs < 1 or batch_size < 1.
    """
    _check_flow(entry)
    validation.count(n_pairs, "n_pairs")
    validation.count(batch_size, "batch_size")
    device = next(entry.model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n_pairs, *entry.shape, generator=g)
    labels = torch.arange(n_pairs) % entry.num_classes
    chunks = []
    for i in tqdm(range(0, n_pairs, batch_size), desc="reflow pairs", disable=None if progress else True):
        with torch.no_grad():
            chunks.append(sample(entry.model, x_T[i:i + batch_size].to(device), entry.schedule, steps=steps,
                                 solver=solver, prediction="flow", spacing=entry.spacing,
                                 denoise_to_zero=entry.denoise_to_zero,
                                 cond=labels[i:i + batch_size].to(device)).cpu())
    return x_T, torch.cat(chunks), labels


def reflow(entry: ZooModel, n_pairs: int = 10000, iters: int = 3000, solver: str = "heun", steps: int = 25,
           seed: int = 0, lr: float = 5e-4, progress: bool = True) -> ZooModel:
    """One ReFlow round: couples noise and samples with our sampler, then fine-tunes a copy of the model
    on straight interpolations between the pairs (the rectified-flow loss with the paired noise).

    Args:
        entry: a flow model from the zoo (prediction "flow"); left untouched.
        n_pairs: number of (noise, sample) pairs (see :func:`reflow_pairs`).
        iters: fine-tuning iterations (batch 128, AdamW with warm-up and cosine decay, EMA of the weights).
        solver, steps: the sampler that generates the pairs.
        seed: seeds the pairs and the fine-tuning.
        lr: peak learning rate of the fine-tuning.
        progress: tqdm progress bars.

    Returns:
        A new ZooModel (same schedule, prediction, grid spacing and ``denoise_to_zero``) in eval mode, on
        the entry's device.

    Raises:
        ValueError for a non-flow entry, n_pairs < 1 or iters < 1.
    """
    _check_flow(entry)
    validation.count(iters, "iters")
    x_T, x_0, labels = reflow_pairs(entry, n_pairs, solver, steps, seed, progress=progress)
    device = next(entry.model.parameters()).device
    start = copy.deepcopy(entry.model).cpu()
    tuned = train_diffusion((x_0, x_T), labels, iters, seed, progress=progress, kind="flow", init=start, lr=lr,
                            ema_rate=min(1.0, max(1e-3, 10.0 / iters)), log_every=0,
                            time_scale=getattr(entry.model, "time_scale", FLOW_TIME_SCALE))
    model = copy.deepcopy(start)
    model.load_state_dict(tuned.state_dict())
    return ZooModel(model.eval().to(device), entry.schedule, entry.prediction, entry.shape, entry.num_classes,
                    entry.spacing, entry.denoise_to_zero)
