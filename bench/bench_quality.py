"""Sample quality of the shipped digits model: FD-digits against NFE (ours next to diffusers), and morphing.

Usage: python bench/bench_quality.py [--quick] [--json PATH] [--samples N] [--pairs P] [--threads T]

FD-digits (``adjointdeis.metrics``: the Fréchet distance between the shipped classifier's 64-d features of
generated and of the 297 held-out real digits; it stands in for FID and is comparable only with itself):

- n class-conditional samples (labels i mod 10) per cell, the same x_T (and SDE noise seed) in every cell;
- NFE 1, 2, 3, 5, 10, 20, 50 for DDIM, DEIS-2/3, DPM-Solver++ 2M/3M and SDE-DPM-Solver++(2M), each run by
  ``adjointdeis.sample`` and by the diffusers scheduler of the same algorithm (DDIMScheduler eta=0,
  DEISMultistepScheduler, DPMSolverMultistepScheduler dpmsolver++ / sde-dpmsolver++), all on diffusers'
  "trailing" grid (good at few steps), from one config (the model's linear betas 1e-4..0.02, eps
  prediction). Ours runs on ``VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)`` (diffusers' float32
  products) along ``scheduler.timesteps`` + [0], landing on zero noise where diffusers does (DDIM
  ``set_alpha_to_one``, DPM-Solver ``final_sigmas_type="zero"``; DEIS ends at sigma_min). The max
  |ours - diffusers| over all samples is printed per solver: the algorithms are the same, so the samples
  must coincide up to float32 rounding (DDIMScheduler at NFE 3 excepted: it steps from t to
  t - 1000 // 3, which is not its next trailing timestep);
- reference: diffusers' DDPMScheduler, the 1000-step ancestral sampler (no clipping), with its precision and
  recall in feature space; and n real training digits against the held-out ones. FD-digits has a positive
  bias that shrinks with n and grows with the spread of the features, so only numbers at the same n compare,
  and samples less diverse than the data (lower recall) can score below real digits.

Morphing (MMPMR analogue): for P pairs (default 50) of held-out digits of different classes, x_T and the class
embedding z are optimised (Adam, 20 iterations, through DPM-Solver++(2M), 10 steps, logSNR grid) from
the slerp of the endpoints' DDIM-inverted noise and their mean embedding, to minimise the identity loss
d(f, f_a) + d(f, f_b) + |d(f, f_a) - d(f, f_b)| on cosine distances of classifier features
(``adjointdeis.demo.morph``). A morph is accepted when both distances are within the classifier's
same-digit threshold (the distance below which 1% of different-digit held-out pairs fall); the table
gives the accepted fraction (MMPMR) for grad = discrete (the exact gradient) and AdjointDEIS-1 / -2M on 5,
10, 20 adjoint steps, in the paper's noise-prediction form ("eps") and the data-prediction form ("x0"),
with the cosine between each method's first gradient and the exact one and the ratio of their norms, the
time of the whole optimisation (all pairs in one batch) and the peak live tensor memory of that first
gradient (sample + backward, profiler). Timings: one process, --threads torch threads (default 1).
"""

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time
import warnings

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler,  # noqa: E402
                       DPMSolverMultistepScheduler)

from adjointdeis.benchmarks import cpu_name  # noqa: E402

import adjointdeis  # noqa: E402
from adjointdeis import VPSchedule, sample  # noqa: E402
from adjointdeis.benchmarks import tensor_peak_bytes  # noqa: E402
from adjointdeis.demo import (endpoint_distances, fd_digits, identity_loss, load_kit, morph,  # noqa: E402
                              morph_loss, morph_pairs, morph_start, verification_threshold)
from adjointdeis.metrics import class_accuracy, classifier_features, precision_recall  # noqa: E402
from adjointdeis.zoo.data import load_digits_split  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

NFES = (1, 2, 3, 5, 10, 20, 50)
QUICK_NFES = (1, 3, 10)
CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon", timestep_spacing="trailing")
# name: (our sample() options, diffusers scheduler factory, does diffusers' last step land on zero noise)
SOLVERS = {
    "DDIM": (dict(solver="ddim"), lambda: DDIMScheduler(**CONFIG, clip_sample=False, set_alpha_to_one=True), True),
    "DEIS-2": (dict(solver="deis", order=2), lambda: DEISMultistepScheduler(**CONFIG, solver_order=2), False),
    "DEIS-3": (dict(solver="deis", order=3), lambda: DEISMultistepScheduler(**CONFIG, solver_order=3), False),
    "DPM++2M": (dict(solver="dpmpp", order=2), lambda: DPMSolverMultistepScheduler(
        **CONFIG, solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero"), True),
    "DPM++3M": (dict(solver="dpmpp", order=3), lambda: DPMSolverMultistepScheduler(
        **CONFIG, solver_order=3, algorithm_type="dpmsolver++", final_sigmas_type="zero"), True),
    "SDE-DPM++2M": (dict(solver="dpmpp", order=2, sde=True), lambda: DPMSolverMultistepScheduler(
        **CONFIG, solver_order=2, algorithm_type="sde-dpmsolver++", final_sigmas_type="zero"), True),
}
MORPH_STEPS, MORPH_ITERS, MORPH_LR = 10, 20, 0.05
CHUNK = 250  # samples per model call: the 8x8 network is fastest per sample in batches of a few hundred
ADJOINT_STEPS = (5, 10, 20)


def chunk_generator(seed, start):
    """The SDE noise generator of the chunk starting at sample `start`: one per chunk, so that diffusers'
    extra (zero-weighted) draw on a step to zero noise does not shift the next chunk's noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + start)


def diffusers_sample(kit, scheduler, nfe, x_T, labels, seed):
    """diffusers' denoising loop with the digits model, CHUNK samples at a time; stochastic steps draw from
    :func:`chunk_generator`."""
    stochastic = isinstance(scheduler, DDPMScheduler) or scheduler.config.get("algorithm_type") == "sde-dpmsolver++"
    chunks = []
    with torch.no_grad():
        for i in range(0, len(x_T), CHUNK):
            scheduler.set_timesteps(nfe)
            x, cond, generator = x_T[i:i + CHUNK].clone(), labels[i:i + CHUNK], chunk_generator(seed, i)
            for t in scheduler.timesteps:
                out = kit.model(x, t.float().expand(len(x)), cond)
                x = scheduler.step(out, t, x, **({"generator": generator} if stochastic else {})).prev_sample
            chunks.append(x)
    return torch.cat(chunks)


def our_sample(kit, scheduler, nfe, x_T, labels, seed, options, to_zero):
    """``adjointdeis.sample`` on the scheduler's grid and noise levels, CHUNK samples at a time."""
    scheduler.set_timesteps(nfe)
    grid = torch.cat([scheduler.timesteps.to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    schedule = VPSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    with torch.no_grad():
        return torch.cat([sample(kit.model, x_T[i:i + CHUNK], schedule, timesteps=grid, cond=labels[i:i + CHUNK],
                                 generator=chunk_generator(seed, i), denoise_to_zero=to_zero, **options)
                          for i in range(0, len(x_T), CHUNK)])


def run_fd(kit, n, nfes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, *kit.shape, generator=g)
    labels = torch.arange(n) % kit.num_classes
    rows = {}
    cells = [(name, nfe) for name in SOLVERS for nfe in nfes]
    for name, nfe in tqdm(cells, desc="FD cells", disable=None):
        options, factory, to_zero = SOLVERS[name]
        scheduler = factory()
        start = time.perf_counter()
        ours = our_sample(kit, scheduler, nfe, x_T, labels, seed + 1, options, to_zero)
        our_time = time.perf_counter() - start
        start = time.perf_counter()
        theirs = diffusers_sample(kit, factory(), nfe, x_T, labels, seed + 1)
        their_time = time.perf_counter() - start
        rows[name, nfe] = dict(fd_ours=fd_digits(kit, ours), fd_diffusers=fd_digits(kit, theirs),
                               accuracy_ours=class_accuracy(kit.classifier, ours, labels),
                               max_difference=float((ours - theirs).abs().max()), seconds_ours=our_time,
                               seconds_diffusers=their_time)
    start = time.perf_counter()
    ddpm = DDPMScheduler(**{k: v for k, v in CONFIG.items() if k != "timestep_spacing"}, clip_sample=False)
    reference = diffusers_sample(kit, ddpm, 1000, x_T, labels, seed + 1)
    precision, recall = precision_recall(kit.real_features, classifier_features(kit.classifier, reference))
    ddpm_row = dict(fd=fd_digits(kit, reference), accuracy=class_accuracy(kit.classifier, reference, labels),
                    precision=precision, recall=recall, seconds=time.perf_counter() - start)
    train_x, _, _, _ = load_digits_split()
    real = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]]
    precision, recall = precision_recall(kit.real_features, classifier_features(kit.classifier, real))
    real_row = dict(n=len(real), fd=fd_digits(kit, real), precision=precision, recall=recall)
    return dict(samples=n, nfes=list(nfes), cells=rows, ddpm=ddpm_row, real_digits=real_row)


def print_fd(result):
    nfes = result["nfes"]
    print(f"\nFD-digits against NFE ({result['samples']} class-conditional samples per cell, lower is better; "
          f"not FID)")
    print(f"{'solver':<13}{'run':<11}" + "".join(f"{f'NFE={k}':>9}" for k in nfes) + f"{'max|ours-diffusers|':>21}")
    for name in SOLVERS:
        cells = [result["cells"][name, k] for k in nfes]
        diff = max(c["max_difference"] for c in cells)
        print(f"{name:<13}{'ours':<11}" + "".join(f"{c['fd_ours']:>9.2f}" for c in cells) + f"{diff:>21.1e}")
        print(f"{'':<13}{'diffusers':<11}" + "".join(f"{c['fd_diffusers']:>9.2f}" for c in cells))
    ddpm = result["ddpm"]
    print(f"reference: DDPM ancestral, 1000 steps (diffusers DDPMScheduler): FD-digits {ddpm['fd']:.2f}, "
          f"accuracy {ddpm['accuracy']:.0%}, precision {ddpm['precision']:.2f}, recall {ddpm['recall']:.2f} "
          f"({ddpm['seconds']:.0f} s)")
    real = result["real_digits"]
    print(f"{real['n']} real training digits: FD-digits {real['fd']:.2f}, precision {real['precision']:.2f}, "
          f"recall {real['recall']:.2f}")
    if "DDIM" in SOLVERS and 3 in nfes:
        per_nfe = ", ".join(f"NFE {k}: {result['cells']['DDIM', k]['max_difference']:.0e}" for k in nfes)
        print(f"DDIM max|ours-diffusers| per NFE: {per_nfe}")
    accuracy = ", ".join(f"{name} {result['cells'][name, nfes[-1]]['accuracy_ours']:.0%}" for name in SOLVERS)
    print(f"classifier accuracy at NFE={nfes[-1]} (ours): {accuracy}")


def morph_configs():
    """(name, morph options): the exact discrete gradient, then AdjointDEIS-1 and -2M in both forms on
    ADJOINT_STEPS (the grid of MORPH_STEPS is the sampling grid itself: no extra forward solve)."""
    configs = [("discrete", dict(grad="discrete"))]
    for form in ("eps", "x0"):
        for order in (1, 2):
            for steps in ADJOINT_STEPS:
                configs.append((f"adjoint-{'1' if order == 1 else '2M'} {form} K={steps}",
                                dict(grad="adjoint", adjoint_order=order, adjoint_form=form,
                                     adjoint_steps=None if steps == MORPH_STEPS else steps)))
    return configs


def start_gradient(kit, start, options):
    """d(mean morph loss)/d(x_T, z) at the morphs' starting point."""
    x_T, z, f_a, f_b = (t.detach().clone() for t in start)
    x_T.requires_grad_(True)
    z.requires_grad_(True)
    adjoint = {k: v for k, v in options.items() if k != "grad"}
    x0 = sample(kit.model, x_T, kit.schedule, steps=MORPH_STEPS, solver="dpmpp", order=2, cond=z,
                grad=options["grad"], parameters=[], **adjoint)
    loss = morph_loss(kit.classifier.features(x0.clamp(-1, 1)), f_a, f_b).mean()
    return torch.autograd.grad(loss, [x_T, z])


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def run_morph(kit, n_pairs, iters, seed=0):
    threshold, same_rate = verification_threshold(kit)
    pairs = morph_pairs(kit, n_pairs, seed)
    start = morph_start(kit, pairs, MORPH_STEPS)
    exact = start_gradient(kit, start, dict(grad="discrete"))
    rows, initial = {}, None
    for name, options in tqdm(morph_configs(), desc="morph configs", disable=None):
        result = morph(kit, pairs, steps=MORPH_STEPS, iters=iters, lr=MORPH_LR, threshold=threshold,
                       progress=False, **options)
        gradients = []
        peak = tensor_peak_bytes(lambda: gradients.append(start_gradient(kit, start, options)))
        gradient = gradients[0]
        if initial is None:  # iteration 0 (the same for every config): the unoptimised start
            d_a, d_b = endpoint_distances(kit, result.initial, pairs)
            initial = dict(accepted=float(((d_a <= threshold) & (d_b <= threshold)).double().mean()),
                           loss=float(identity_loss(d_a, d_b).mean()), distance_a=float(d_a.mean()),
                           distance_b=float(d_b.mean()))
        rows[name] = dict(accepted=float(result.accepted.double().mean()), loss=float(result.final_losses.mean()),
                          distance_a=float(result.distance_a.mean()), distance_b=float(result.distance_b.mean()),
                          cos_x_T=cosine(gradient[0], exact[0]), cos_z=cosine(gradient[1], exact[1]),
                          norm_ratio=float(gradient[0].norm() / exact[0].norm()),
                          seconds=result.seconds, peak_mib=peak / 2**20)
    return dict(pairs=len(pairs), iters=iters, threshold=threshold, same_digit_rate=same_rate, start=initial,
                rows=rows)


def print_morph(result):
    print(f"\nMorphing: {result['pairs']} pairs of held-out digits, {result['iters']} Adam iterations on x_T and z "
          f"through DPM++2M ({MORPH_STEPS} steps)")
    print(f"same-digit threshold: cosine distance {result['threshold']:.3f} (FMR 1% on held-out pairs; "
          f"{result['same_digit_rate']:.0%} of same-digit pairs within it)")
    print("MMPMR: morphs within the threshold of both endpoints; cos: the first gradient against the exact one "
          "(x_T, z); |g|: its norm over the exact one's (x_T)")
    print(f"{'grad':<22}{'MMPMR':>7}{'loss':>7}{'d(A)':>7}{'d(B)':>7}{'cos x_T':>9}{'cos z':>7}{'|g|':>9}"
          f"{'time s':>8}{'peak MiB':>10}")
    r = result["start"]
    print(f"{'none (start)':<22}{r['accepted']:>7.0%}{r['loss']:>7.3f}{r['distance_a']:>7.3f}{r['distance_b']:>7.3f}")
    for name, r in result["rows"].items():
        print(f"{name:<22}{r['accepted']:>7.0%}{r['loss']:>7.3f}{r['distance_a']:>7.3f}{r['distance_b']:>7.3f}"
              f"{r['cos_x_T']:>9.3f}{r['cos_z']:>7.3f}{r['norm_ratio']:>9.2g}{r['seconds']:>8.1f}{r['peak_mib']:>10.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NFE 1, 3, 10, 200 samples, 10 pairs, 5 iterations")
    parser.add_argument("--samples", type=int, help="samples per FD cell (default 1000; --quick 200)")
    parser.add_argument("--pairs", type=int,
                        help="morph pairs (default 50, which keeps the run near 10 minutes; --quick 10)")
    parser.add_argument("--iters", type=int, help=f"morph iterations (default {MORPH_ITERS}; --quick 5)")
    parser.add_argument("--only", choices=("fd", "morph"), help="run one of the two tables")
    parser.add_argument("--json", metavar="PATH", help="write the results and run facts as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples = args.samples or (200 if args.quick else 1000)
    pairs = args.pairs or (10 if args.quick else 50)
    iters = args.iters or (5 if args.quick else MORPH_ITERS)
    kit = load_kit()
    started = time.perf_counter()
    out = dict(meta=dict(adjointdeis=adjointdeis.__version__, torch=torch.__version__, threads=args.threads,
                         machine=platform.machine(), cpu=cpu_name(), quick=args.quick,
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat()))
    if args.only in (None, "fd"):
        fd = run_fd(kit, samples, QUICK_NFES if args.quick else NFES)
        print_fd(fd)
        out["fd"] = {**fd, "cells": {f"{name} NFE={nfe}": v for (name, nfe), v in fd["cells"].items()}}
    if args.only in (None, "morph"):
        morph_result = run_morph(kit, pairs, iters)
        print_morph(morph_result)
        out["morph"] = morph_result
    out["meta"]["seconds"] = time.perf_counter() - started
    print(f"\ntotal {out['meta']['seconds']:.0f} s on {cpu_name()}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
