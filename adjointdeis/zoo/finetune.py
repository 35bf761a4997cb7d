"""Reward fine-tuning of the shipped digits model through its sampler (DRaFT-style; an application).

LoRA adapters (peft) on the digits UNet are trained so that its class-conditional samples of one class score
higher under the shipped classifier: the reward is the classifier's log-probability of that class, back-propagated
through every step of a DPM-Solver++(2M) run with ``grad="discrete"`` (the exact gradient of the computed sample,
memory flat in the number of steps) or ``grad="autograd"`` (plain backprop through the loop, the baseline).

    entry, classifier = zoo.load("digits"), zoo.load_classifier()
    result = finetune_class_reward(entry, classifier, label=8, grad="discrete", iters=40)
    result.rewards, result.evaluations[-1].reward, result.model   # result.model: the LoRA-wrapped copy
"""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import validation
from ..sampling import sample
from . import ZooModel
from .training import seeded

LORA_TARGETS = ("inp", "conv1", "conv2", "emb")   # the input conv, the ResBlocks' convs and embedding projections


@dataclass
class FinetuneSettings:
    """What a reward fine-tuning run does.

    Attributes:
        label: the class whose samples are rewarded.
        grad: "discrete" or "autograd" (how the reward's gradient reaches the adapters).
        iters: Adam iterations, each on a fresh batch of noise.
        batch: samples per iteration.
        steps: DPM-Solver++(2M) steps per sample.
        lr: Adam's learning rate.
        rank: the LoRA rank (lora_alpha = rank).
        eval_batch: samples of the fixed held-out noise the reward is evaluated on.
        eval_every: evaluate on the held-out noise every this many iterations (and before the first, after the last).
        seed: seeds the adapters' initialisation and the noise.
    """

    label: int = 8
    grad: str = "discrete"
    iters: int = 40
    batch: int = 16
    steps: int = 10
    lr: float = 3e-4
    rank: int = 4
    eval_batch: int = 256
    eval_every: int = 5
    seed: int = 0


@dataclass(frozen=True)
class Evaluation:
    """The model's samples from the fixed held-out noise after `iteration` updates.

    Attributes:
        iteration: updates done.
        reward: the mean reward.
        accuracy: the classifier's accuracy for the label.
        spread: the per-pixel standard deviation across the samples, averaged over pixels (a diversity check:
            a reward-hacked model collapses onto one image and this falls towards 0).
    """

    iteration: int
    reward: float
    accuracy: float
    spread: float


@dataclass
class FinetuneResult:
    """A run's outcome.

    Attributes:
        model: the LoRA-wrapped copy of the entry's model (the entry's own model is not touched).
        rewards: (iters,) the mean reward of each iteration's training batch, before its update.
        evaluations: on the held-out noise, before training, every ``eval_every`` updates and after the last.
        seconds: wall time of the training iterations (the evaluations excluded).
    """

    model: torch.nn.Module
    rewards: list[float] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    seconds: float = 0.0


def class_log_prob(classifier: torch.nn.Module, images: Tensor, label: int) -> Tensor:
    """The differentiable reward: log p(label | image) under the classifier, images clamped to [-1, 1].

    images: (batch, 1, 8, 8) -> (batch,).
    """
    return classifier(images.clamp(-1, 1)).log_softmax(1)[:, label]


def lora_copy(model: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    """A peft LoRA-wrapped deep copy of `model`: only the adapters require grad, A and B both drawn at random
    with B scaled to 1e-3 of peft's draw (so training starts from the base model's samples, to within rounding,
    with a gradient to A as well as B)."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    with seeded(seed):
        wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-3)
    return wrapped


def _draft_sample(model, entry: ZooModel, noise: Tensor, label: int, steps: int, grad: str | None) -> Tensor:
    labels = torch.full((noise.shape[0],), label, dtype=torch.long)
    return sample(model, noise, entry.schedule, steps=steps, solver="dpmpp", order=2, spacing=entry.spacing,
                  prediction=entry.prediction, denoise_to_zero=entry.denoise_to_zero, cond=labels, grad=grad)


@torch.no_grad()
def evaluate(model, entry: ZooModel, classifier, noise: Tensor, settings: FinetuneSettings,
             iteration: int) -> Evaluation:
    """The model's samples from `noise` (batch, 1, 8, 8) scored (see :class:`Evaluation`)."""
    images = _draft_sample(model, entry, noise, settings.label, settings.steps, None)
    logits = classifier(images.clamp(-1, 1))
    return Evaluation(iteration, logits.log_softmax(1)[:, settings.label].mean().item(),
                      (logits.argmax(1) == settings.label).float().mean().item(), images.std(0).mean().item())


def reward_gradient(model, entry: ZooModel, classifier, noise: Tensor, settings: FinetuneSettings) -> Tensor:
    """One DRaFT gradient: samples from `noise` (batch, 1, 8, 8), ``-mean reward`` back-propagated into the
    adapters' ``.grad``; returns the mean reward (a 0-d tensor, detached)."""
    images = _draft_sample(model, entry, noise, settings.label, settings.steps, settings.grad)
    reward = class_log_prob(classifier, images, settings.label).mean()
    (-reward).backward()
    return reward.detach()


def finetune_class_reward(entry: ZooModel, classifier: torch.nn.Module, settings: FinetuneSettings | None = None,
                          progress: bool = True,
                          callback: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """LoRA-fine-tunes a copy of ``entry.model`` to raise the classifier's log-probability of ``settings.label``
    on its samples, through the whole DPM-Solver++(2M) run (DRaFT).

    Args:
        entry: a shipped diffusion or flow model (``zoo.load("digits")``, ``"digits-flow"``), sampled with its own
            prediction, grid spacing and ``denoise_to_zero``.
        classifier: the reward's classifier (``zoo.load_classifier()``); a frozen copy of it scores the samples
            (the caller's module is left as it is).
        settings: the run; default ``FinetuneSettings()``.
        progress: a tqdm bar over the iterations.
        callback: ``callback(iteration, reward)`` after each iteration.

    Raises:
        ValueError for an entry that is not sampled by a solver (the DSNO student), a grad mode other than
        "discrete" or "autograd", a label outside the classes, or a count (iters, batch, steps, rank, eval_batch,
        eval_every) out of range, naming the setting.
    """
    settings = settings or FinetuneSettings()
    if entry.prediction == "trajectory":
        raise ValueError("entry must be a model sampled by a solver (prediction eps, x0, v or flow), got the DSNO "
                         "student (prediction 'trajectory')")
    if settings.grad not in ("discrete", "autograd"):
        raise ValueError(f"settings.grad must be 'discrete' or 'autograd', got {settings.grad!r}")
    validation.integer(settings.label, "settings.label", 0, entry.num_classes - 1)
    validation.integer(settings.iters, "settings.iters", 0)
    for name in ("batch", "steps", "rank", "eval_batch", "eval_every"):
        validation.count(getattr(settings, name), f"settings.{name}")
    validation.real(settings.lr, "settings.lr", 0.0)
    validation.integer(settings.seed, "settings.seed")
    classifier = copy.deepcopy(classifier).requires_grad_(False)
    model = lora_copy(entry.model, settings.rank, settings.seed)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(adapters, lr=settings.lr)
    g = torch.Generator().manual_seed(settings.seed)
    held_out = torch.randn(settings.eval_batch, *entry.shape, generator=g)
    result = FinetuneResult(model, evaluations=[evaluate(model, entry, classifier, held_out, settings, 0)])
    bar = tqdm(range(settings.iters), desc=f"LoRA DRaFT ({settings.grad})", disable=None if progress else True)
    for it in bar:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn(settings.batch, *entry.shape, generator=g)
        reward = reward_gradient(model, entry, classifier, noise, settings).item()
        optimizer.step()
        result.seconds += time.perf_counter() - start
        result.rewards.append(reward)
        bar.set_postfix(reward=f"{reward:.3f}")
        if callback is not None:
            callback(it, reward)
        if (it + 1) % settings.eval_every == 0 or it + 1 == settings.iters:
            result.evaluations.append(evaluate(model, entry, classifier, held_out, settings, it + 1))
    return result
