"""LoRA reward fine-tuning of the digits model (DRaFT-style): grad="discrete" against plain autograd.

Usage: python bench/bench_finetune.py [--iters 40] [--steps 10] [--batch 16] [--label 8] [--png PATH] [--json PATH]

Each gradient mode runs :func:`adjointdeis.zoo.finetune.finetune_class_reward` (LoRA rank 4 on the digits UNet,
reward = the shipped classifier's log-probability of the label, Adam, DPM-Solver++(2M)) in its own fresh
child process, from the same seed: the same adapters' initialisation and the same noise, so the two reward
curves coincide to float32 rounding (the discrete adjoint is the exact gradient of the computed sample).
Memory per mode: the rise of the child's peak RSS during the whole training run (bench/memory.py), and the
peak of live tensor bytes during one gradient from torch's CPU profiler memory events. One thread per child.
"""

import argparse
import datetime
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adjointdeis import zoo  # noqa: E402
from adjointdeis.benchmarks import tensor_peak_bytes  # noqa: E402
from adjointdeis.zoo.finetune import (FinetuneSettings, evaluate, finetune_class_reward, lora_copy,  # noqa: E402
                                      reward_gradient)
from adjointdeis.benchmarks import cpu_name  # noqa: E402
from memory import RSS_METHOD, in_fresh_process, peak_rss_rise  # noqa: E402  bench/memory.py

MODES = ("autograd", "discrete")
SHOWN = 16   # samples drawn in the figure per model
TENSOR_METHOD = "tensor peak: the highest sum of live CPU tensor bytes during one gradient (torch profiler memory events)"


def run_mode(settings: FinetuneSettings) -> dict:
    """One fine-tuning run in this (fresh) process: rewards, evaluations, time, memory and samples."""
    torch.set_num_threads(1)
    entry, classifier = zoo.load("digits"), zoo.load_classifier()
    warm = lora_copy(entry.model, settings.rank, settings.seed)
    noise = torch.randn(settings.batch, *entry.shape, generator=torch.Generator().manual_seed(12345))
    reward_gradient(warm, entry, classifier, noise, settings)  # warm-up: lazy init of kernels and threads
    del warm
    result, rss = peak_rss_rise(lambda: finetune_class_reward(entry, classifier, settings))
    result.model.zero_grad(set_to_none=True)
    tensors = tensor_peak_bytes(lambda: reward_gradient(result.model, entry, classifier, noise, settings))
    shown = torch.randn(SHOWN, *entry.shape, generator=torch.Generator().manual_seed(7))
    # numpy, not tensors: torch's multiprocessing pickler would share tensors through the exiting child's memory
    before, after = (evaluate_images(model, entry, shown, settings).numpy() for model in (entry.model, result.model))
    return {"rewards": result.rewards, "evaluations": [vars(e) for e in result.evaluations],
            "seconds": result.seconds, "rss_peak": rss, "tensor_peak": tensors,
            "adapters": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
            "base": sum(p.numel() for p in entry.model.parameters()), "before": before, "after": after}


def evaluate_images(model, entry, noise, settings) -> torch.Tensor:
    from adjointdeis.sampling import sample

    with torch.no_grad():
        labels = torch.full((noise.shape[0],), settings.label, dtype=torch.long)
        return sample(model, noise, entry.schedule, steps=settings.steps, solver="dpmpp", order=2,
                      spacing=entry.spacing, cond=labels).clamp(-1, 1)


def plot(results: dict, settings: FinetuneSettings, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adjointdeis.images import grid_pixels

    fig, (ax, ax_img) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    styles = {"autograd": dict(color="tab:orange", ls="--"), "discrete": dict(color="tab:blue", ls="-")}
    for mode, r in results.items():
        ax.plot(range(len(r["rewards"])), r["rewards"], alpha=0.35, lw=1, **styles[mode])
        ev = r["evaluations"]
        ax.plot([e["iteration"] for e in ev], [e["reward"] for e in ev], marker="o", lw=2,
                label=f'grad="{mode}": held-out, {r["seconds"]:.0f} s, {r["rss_peak"] / 2**20:.0f} MiB peak RSS rise',
                **styles[mode])
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"reward: classifier log p({settings.label} | sample)")
    ax.set_title(f"LoRA DRaFT, DPM-Solver++(2M), {settings.steps} steps (thin: training batch; the modes coincide)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    rows = []
    for mode, key in (("discrete", "before"), ("discrete", "after"), ("autograd", "after")):
        images = list(torch.from_numpy(results[mode][key]))
        rows += [images[:SHOWN // 2], images[SHOWN // 2:], [None]]
    rows.pop()
    ax_img.imshow(grid_pixels(rows, scale=4), cmap="gray", vmin=0, vmax=255)
    ax_img.set_title("the same noise: before; after (discrete); after (autograd)", fontsize=9)
    ax_img.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--label", type=int, default=8)
    parser.add_argument("--png", type=pathlib.Path, default=pathlib.Path(__file__).parents[1] / "docs/demo/finetune.png")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    base = dict(iters=args.iters, steps=args.steps, batch=args.batch, label=args.label)
    load = os.getloadavg()
    results = {}
    for mode in MODES:
        settings = FinetuneSettings(grad=mode, **base)
        results[mode] = in_fresh_process(run_mode, settings, preload=["torch", "adjointdeis.zoo.finetune"])
    end_load = os.getloadavg()
    r0, r1 = results["autograd"], results["discrete"]
    print(f"## LoRA reward fine-tuning (DRaFT), {datetime.date.today()}, {cpu_name()}, 1 thread per run; "
          f"1-minute load {load[0]:.1f} before, {end_load[0]:.1f} after (a shared machine)")
    print(f"digits UNet ({r1['base'] / 1e3:.0f}k parameters, frozen) + LoRA rank 4 on {', '.join(('inp', 'conv1', 'conv2', 'emb'))} "
          f"({r1['adapters']} trainable); label {args.label}; {args.iters} Adam iterations of batch {args.batch}; "
          f"DPM-Solver++(2M), {args.steps} steps; held-out reward on 256 fixed noises")
    print(f"- {RSS_METHOD}\n- {TENSOR_METHOD}")
    print("\n| grad | held-out reward before -> after | accuracy before -> after | spread before -> after "
          "| train time s | s / iteration | peak RSS rise MiB | tensor peak MiB per gradient |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        a, b = r["evaluations"][0], r["evaluations"][-1]
        print(f"| {mode} | {a['reward']:.3f} -> {b['reward']:.3f} | {a['accuracy']:.1%} -> {b['accuracy']:.1%} "
              f"| {a['spread']:.3f} -> {b['spread']:.3f} | {r['seconds']:.1f} | {r['seconds'] / args.iters:.2f} "
              f"| {r['rss_peak'] / 2**20:.1f} | {r['tensor_peak'] / 2**20:.2f} |")
    diff = max(abs(u - v) for u, v in zip(r0["rewards"], r1["rewards"]))
    print(f"\nmax |reward(discrete) - reward(autograd)| over the {args.iters} iterations: {diff:.1e} "
          f"(same seed; float32 rounding only); time discrete / autograd {r1['seconds'] / r0['seconds']:.2f}x, "
          f"tensor peak {r1['tensor_peak'] / r0['tensor_peak']:.2f}x")
    plot(results, FinetuneSettings(**base), args.png)
    print(f"plot: {args.png}")
    if args.json:
        slim = {m: {k: v for k, v in r.items() if k not in ("before", "after")} for m, r in results.items()}
        args.json.write_text(json.dumps({"settings": base, "results": slim}, indent=1))


if __name__ == "__main__":
    main()
