"""The LoRA reward fine-tuning example (adjointdeis.zoo.finetune): a few iterations raise the reward, the two
gradient modes train identically, and the shipped model is left as it was."""

import pytest
import torch

from adjointdeis import zoo

peft = pytest.importorskip("peft")
from adjointdeis.zoo.finetune import FinetuneSettings, finetune_class_reward  # noqa: E402


def test_a_few_iterations_raise_the_reward_the_same_way_in_both_modes():
    entry, classifier = zoo.load("digits"), zoo.load_classifier()
    before = {n: p.detach().clone() for n, p in entry.model.named_parameters()}
    results = {}
    for grad in ("discrete", "autograd"):
        settings = FinetuneSettings(grad=grad, iters=6, batch=8, steps=6, lr=1e-3, eval_batch=64, eval_every=6)
        results[grad] = finetune_class_reward(entry, classifier, settings, progress=False)
    discrete = results["discrete"]
    first, last = discrete.evaluations[0], discrete.evaluations[-1]
    assert [e.iteration for e in discrete.evaluations] == [0, 6]
    assert last.reward > first.reward + 0.02
    assert last.spread > 0.5 * first.spread          # not collapsed onto one image
    for u, v in zip(discrete.rewards, results["autograd"].rewards):
        assert abs(u - v) < 1e-4                     # the exact gradient of the same computation
    trained = [n for n, p in discrete.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    for name, p in entry.model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name


def test_bad_settings_name_the_setting():
    entry, classifier = zoo.load("digits"), zoo.load_classifier()
    with pytest.raises(ValueError, match="settings.grad"):
        finetune_class_reward(entry, classifier, FinetuneSettings(grad="adjoint"), progress=False)
    with pytest.raises(ValueError, match="settings.label"):
        finetune_class_reward(entry, classifier, FinetuneSettings(label=10), progress=False)
    for name, value in (("iters", -3), ("batch", 0), ("steps", 0), ("rank", 0), ("eval_batch", 0),
                        ("eval_every", 0), ("iters", 1.5), ("lr", float("nan")), ("lr", -1.0), ("seed", 1.5)):
        with pytest.raises((ValueError, TypeError), match=f"settings.{name}"):
            finetune_class_reward(entry, classifier, FinetuneSettings(**{name: value}), progress=False)


def test_the_caller_s_classifier_and_generator_are_left_as_they_were():
    entry, classifier = zoo.load("digits"), zoo.load_classifier()
    classifier.requires_grad_(True)
    torch.manual_seed(123)
    want = torch.get_rng_state()
    settings = FinetuneSettings(iters=1, batch=2, steps=2, eval_batch=4, eval_every=1)
    result = finetune_class_reward(entry, classifier, settings, progress=False)
    assert len(result.rewards) == 1 and len(result.evaluations) == 2
    assert torch.equal(torch.get_rng_state(), want)
    assert all(p.requires_grad and p.grad is None for p in classifier.parameters())


def test_a_flow_entry_is_sampled_as_a_flow_model():
    """_draft_sample called sample() without the entry's prediction, so a flow model was read as eps (samples of
    spread ~40 in a [-1, 1] data range, scored after clamping); the evaluation must be that of the entry's sampler."""
    from adjointdeis import sample
    from adjointdeis.zoo.finetune import evaluate

    entry, classifier = zoo.load("digits-flow"), zoo.load_classifier()
    settings = FinetuneSettings(label=3, steps=6)
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = evaluate(entry.model, entry, classifier, noise, settings, 0)
    with torch.no_grad():
        images = sample(entry.model, noise, entry.schedule, steps=6, solver="dpmpp", order=2, prediction="flow",
                        spacing=entry.spacing, denoise_to_zero=entry.denoise_to_zero, cond=torch.full((32,), 3))
        reward = classifier(images.clamp(-1, 1)).log_softmax(1)[:, 3].mean().item()
    assert got.reward == pytest.approx(reward, rel=1e-5, abs=1e-6)
    assert got.spread == pytest.approx(images.std(0).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="entry must be"):
        finetune_class_reward(zoo.load("digits-dsno"), classifier, FinetuneSettings(iters=1), progress=False)
