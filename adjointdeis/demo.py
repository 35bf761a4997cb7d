"""The demos: the shipped digits model at work (sampling, FD-digits, a guided morph) and a Gaussian oracle.

The digits demo (``adjointdeis demo``) samples class-conditional grids with three solvers, measures
FD-digits (see :mod:`adjointdeis.metrics`: a Fréchet distance in the shipped classifier's feature space,
not FID), and morphs pairs of held-out digits: x_T and the class embedding z are optimised through the
sampler so the sample's classifier features are equally close to both endpoints' features (the identity
loss of the AdjointDEIS face-morphing experiment, with the digit classifier in place of a face recogniser).

The Gaussian oracle (``adjointdeis accuracy``) compares every solver with the closed-form solution of the
probability-flow ODE of Gaussian data; :func:`zoo_table` (``adjointdeis diagnose``) runs the conservativity
diagnostics on a shipped model next to the exact score of a Gaussian.
"""

import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import validation, zoo
from .diagnostics import DiagnosticRow, GaussianEpsModel, conservativity_table
from .gradients import AdjointOptions
from .guidance import guide
from .metrics import class_accuracy, classifier_features, frechet_distance
from .sampling import sample
from .schedules import NoiseSchedule, VPSchedule
from .zoo.data import load_digits_split

_SOLVERS = [("ddim", 1), ("deis", 2), ("deis", 3), ("dpmpp", 2), ("dpmpp", 3), ("heun", 2)]
DEMO_SOLVERS = (("ddim", 1), ("deis", 3), ("dpmpp", 2))
SOLVER_NAMES = {("ddim", 1): "DDIM", ("deis", 2): "DEIS-2", ("deis", 3): "DEIS-3", ("dpmpp", 2): "DPM++2M",
                ("dpmpp", 3): "DPM++3M", ("heun", 2): "Heun"}
DEFAULT_FMR = 0.01
# Added (modulo 2**32: torch's CPU generator keeps a seed's low 32 bits only) to sample_digits' seed of the SDE
# noise, so that its stream is apart from class_noise's x_T of the same seed.
SDE_SEED_OFFSET = 0x5DE5EED5


def gaussian_accuracy_table(steps=(5, 10, 20, 50), dim=256, batch=256, seed=0) -> str:
    """A table of the max error of each solver against the exact ODE solution, per step count."""
    g = torch.Generator().manual_seed(seed)
    sched = VPSchedule.linear()
    mu = torch.rand(dim, generator=g, dtype=torch.float64) * 2 - 1
    s = 0.1 + 0.9 * torch.rand(dim, generator=g, dtype=torch.float64)
    model = GaussianEpsModel(sched, mu, s)
    x_T = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    lines = ["max |x - exact| on N(mu, s^2) data, VP linear schedule, logSNR grid",
             f"{'solver':<10}" + "".join(f"{f'N={n}':>11}" for n in steps)]
    for solver, order in _SOLVERS:
        row = f"{solver}-{order:<5}"
        for n in steps:
            ts = sched.timesteps(n)
            x = sample(model, x_T, sched, steps=n, solver=solver, order=order)
            row += f"{(x - model.flow_map(x_T, ts[0], ts[-1])).abs().max().item():>11.2e}"
        lines.append(row)
    return "\n".join(lines)


@dataclass
class DigitsKit:
    """The shipped digits model, its classifier and the held-out digits.

    Attributes:
        model: ``model(x, t, cond)``, x (batch, 1, 8, 8), cond (batch,) labels or (batch, 64) embeddings.
        schedule: its schedule (discrete VP for "digits", FlowSchedule for the flow models);
        classifier: the metrics' digit classifier.
        test_x: (297, 1, 8, 8) held-out digits in [-1, 1]; test_y: (297,) their labels.
        real_features: (297, 64) the classifier's features of test_x.
    """

    model: torch.nn.Module
    schedule: NoiseSchedule
    classifier: torch.nn.Module
    test_x: Tensor
    test_y: Tensor
    real_features: Tensor
    num_classes: int = 10
    shape: tuple[int, ...] = (1, 8, 8)
    prediction: str = "eps"
    spacing: str = "logsnr"
    denoise_to_zero: bool = False


def load_kit(name: str = "digits") -> DigitsKit:
    """Loads a shipped digits model (a name of ``zoo.MODELS``) and the classifier (no network) and the
    held-out split of sklearn's digits."""
    entry = zoo.load(name)
    classifier = zoo.load_classifier()
    for net in (entry.model, classifier):
        net.requires_grad_(False)
    _, _, test_x, test_y = load_digits_split()
    return DigitsKit(entry.model, entry.schedule, classifier, test_x, test_y,
                     classifier_features(classifier, test_x), entry.num_classes, entry.shape, entry.prediction,
                     entry.spacing, entry.denoise_to_zero)


def class_noise(kit: DigitsKit, n: int, seed: int, label: int | None = None) -> tuple[Tensor, Tensor]:
    """(x_T (n, 1, 8, 8), labels (n,)): standard normal noise and labels cycling 0..9 (or all `label`)."""
    x_T = torch.randn(n, *kit.shape, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % kit.num_classes if label is None else torch.full((n,), label, dtype=torch.long)
    return x_T, labels


def sample_digits(kit: DigitsKit, x_T: Tensor, labels: Tensor, solver: str = "dpmpp", order: int | None = None,
                  steps: int = 20, guidance: float | None = None, seed: int = 0, batch_size: int = 250,
                  **sample_kwargs) -> Tensor:
    """Class-conditional samples (n, 1, 8, 8) from x_T (n, 1, 8, 8) and labels (n,), in batches.

    Args:
        guidance: classifier-free guidance scale (the unconditional label is ``num_classes``); None: none.
        seed: seed of the SDE noise (``sde=True`` in `sample_kwargs`), drawn from a stream apart from
            :func:`class_noise`'s of the same seed (drawn from that one, the first noise was x_T itself).
        sample_kwargs: more arguments of :func:`adjointdeis.sample`; ``prediction`` is the kit's, and
            ``spacing`` and ``denoise_to_zero`` default to the kit's.
    """
    sample_kwargs = {"spacing": kit.spacing, "denoise_to_zero": kit.denoise_to_zero, **sample_kwargs,
                     "prediction": kit.prediction}
    generator = torch.Generator().manual_seed((seed + SDE_SEED_OFFSET) % 2**32)
    chunks = []
    for i in range(0, len(x_T), batch_size):
        cond = labels[i:i + batch_size]
        extra = {}
        if guidance is not None:
            extra = dict(guidance_scale=guidance, uncond=torch.full_like(cond, kit.num_classes))
        with torch.no_grad():
            chunks.append(sample(kit.model, x_T[i:i + batch_size], kit.schedule, steps=steps, solver=solver,
                                 order=order, cond=cond, generator=generator, **extra, **sample_kwargs))
    return torch.cat(chunks)


def fd_digits(kit: DigitsKit, images: Tensor) -> float:
    """FD-digits of images (n, 1, 8, 8) against the held-out digits."""
    return frechet_distance(classifier_features(kit.classifier, images), kit.real_features)


def fd_table(kit: DigitsKit, solvers: Sequence[tuple[str, int]], steps_list: Sequence[int], n: int, seed: int = 0,
             progress: bool = True) -> tuple[str, dict, dict]:
    """FD-digits and class accuracy of n class-conditional samples per (solver, steps), same x_T throughout.

    Returns:
        (table text, {(solver, order, steps): {"fd", "accuracy", "seconds"}}, {(solver, order, steps): samples}).
    """
    x_T, labels = class_noise(kit, n, seed)
    results, samples = {}, {}
    cells = [(s, o, k) for s, o in solvers for k in steps_list]
    for solver, order, steps in tqdm(cells, desc="sampling", disable=None if progress else True, leave=False):
        start = time.perf_counter()
        images = sample_digits(kit, x_T, labels, solver, order, steps)
        seconds = time.perf_counter() - start
        results[solver, order, steps] = dict(fd=fd_digits(kit, images), seconds=seconds,
                                             accuracy=class_accuracy(kit.classifier, images, labels))
        samples[solver, order, steps] = images
    lines = [f"FD-digits (lower is better; not FID) against the {len(kit.test_x)} held-out digits and classifier "
             f"accuracy, {n} class-conditional samples per cell",
             f"{'solver':<10}" + "".join(f"{f'FD N={k}':>11}{'acc':>6}" for k in steps_list)]
    for solver, order in solvers:
        row = f"{SOLVER_NAMES.get((solver, order), f'{solver}-{order}'):<10}"
        for k in steps_list:
            r = results[solver, order, k]
            row += f"{r['fd']:>11.2f}{r['accuracy']:>6.0%}"
        lines.append(row)
    return "\n".join(lines), results, samples


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos(a, b) along the last axis: a, b (..., d) -> (...)."""
    return 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)


def morph_loss(features: Tensor, features_a: Tensor, features_b: Tensor) -> Tensor:
    """The AdjointDEIS / DiM identity loss per sample: d(f, f_a) + d(f, f_b) + |d(f, f_a) - d(f, f_b)|.

    Args:
        features, features_a, features_b: (batch, d) classifier features of the morph and its endpoints.

    Returns:
        (batch,) the loss, d the cosine distance.
    """
    return identity_loss(cosine_distance(features, features_a), cosine_distance(features, features_b))


def identity_loss(distance_a: Tensor, distance_b: Tensor) -> Tensor:
    """d_a + d_b + |d_a - d_b|, elementwise, from the distances to the two endpoints."""
    return distance_a + distance_b + (distance_a - distance_b).abs()


def verification_threshold(kit: DigitsKit, fmr: float = DEFAULT_FMR) -> tuple[float, float]:
    """The classifier's same-digit threshold: the cosine distance below which a pair counts as the same digit.

    Chosen on all pairs of held-out digits so that a fraction `fmr` of different-digit pairs fall below it
    (the false match rate, as face verification thresholds are set).

    Returns:
        (threshold, the fraction of same-digit held-out pairs below it).
    """
    f = kit.real_features.double()
    d = cosine_distance(f[:, None], f[None])
    upper = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)
    same = kit.test_y[:, None] == kit.test_y[None]
    threshold = float(torch.quantile(d[upper & ~same], fmr))
    return threshold, float((d[upper & same] <= threshold).double().mean())


def endpoint_distances(kit: DigitsKit, images: Tensor, pairs: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Cosine distances (pairs,) of the features of images (pairs, 1, 8, 8) to those of each pair's endpoints."""
    f = classifier_features(kit.classifier, images)
    index_a = torch.tensor([i for i, _ in pairs])
    index_b = torch.tensor([j for _, j in pairs])
    return cosine_distance(f, kit.real_features[index_a]), cosine_distance(f, kit.real_features[index_b])


def morph_pairs(kit: DigitsKit, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n pairs (i, j) of held-out indices showing different digits, no index used twice, drawn from a seed.

    Raises:
        ValueError if the held-out digits do not make n such pairs (about 145 at most).
    """
    order = torch.rand(len(kit.test_y), generator=torch.Generator().manual_seed(seed)).argsort().tolist()
    pairs: list[tuple[int, int]] = []
    pending = None
    for i in order:
        if pending is None:
            pending = i
        elif kit.test_y[pending] != kit.test_y[i]:
            pairs.append((pending, i))
            pending = None
        if len(pairs) == n:
            return pairs
    raise ValueError(f"the held-out digits make only {len(pairs)} disjoint pairs, not {n}")


def ddim_invert(kit: DigitsKit, x0: Tensor, cond: Tensor, steps: int, spacing: str = "logsnr") -> Tensor:
    """Deterministic DDIM inversion of clean digits x0 (batch, 1, 8, 8) to noise along the sampling grid."""
    ts = kit.schedule.timesteps(steps, spacing).flip(0)
    alpha, sigma = kit.schedule.alpha(ts).tolist(), kit.schedule.sigma(ts).tolist()
    x = x0 * alpha[0]
    with torch.no_grad():
        for i in range(steps):
            eps = kit.model(x, ts[i].float().expand(len(x)), cond)
            data = (x - sigma[i] * eps) / alpha[i]
            x = alpha[i + 1] * data + sigma[i + 1] * eps
    return x


def slerp(a: Tensor, b: Tensor, weight: float = 0.5) -> Tensor:
    """Spherical interpolation between a and b (batch, ...) per sample."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (torch.nn.functional.normalize(fa, dim=1) * torch.nn.functional.normalize(fb, dim=1)).sum(1).clamp(-1, 1)
    theta = torch.acos(cos)[:, None]
    sin = torch.sin(theta).clamp_min(1e-8)
    out = (torch.sin((1 - weight) * theta) * fa + torch.sin(weight * theta) * fb) / sin
    return out.view_as(a)


@dataclass
class MorphResult:
    """Morphs of pairs of held-out digits.

    Attributes:
        pairs: the (i, j) held-out indices; sample: (pairs, 1, 8, 8) the optimised morphs;
        initial: (pairs, 1, 8, 8) the morphs before optimisation (slerped inverted noise, mean embedding);
        losses: mean loss per iteration; pair_losses: (iters, pairs) per pair; final_losses: (pairs,) of `sample`;
        distance_a, distance_b: (pairs,) cosine distances of each morph's features to its endpoints';
        accepted: (pairs,) both distances within the same-digit threshold; threshold: that threshold;
        snapshots: {iteration: (pairs, 1, 8, 8) sample}; seconds: time of the optimisation.
    """

    pairs: list[tuple[int, int]]
    sample: Tensor
    initial: Tensor
    losses: list[float]
    pair_losses: list[list[float]]
    distance_a: Tensor
    distance_b: Tensor
    final_losses: Tensor
    accepted: Tensor
    threshold: float
    snapshots: dict[int, Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def morph_start(kit: DigitsKit, pairs: Sequence[tuple[int, int]], steps: int = 10):
    """Where a morph starts, as DiM and the AdjointDEIS paper start it.

    Returns:
        (x_T, z, f_a, f_b): x_T (pairs, 1, 8, 8) the slerp of the endpoints' DDIM-inverted noise (along the
        `steps`-step logSNR grid), z (pairs, 64) the mean of their class embeddings, f_a, f_b (pairs, 64)
        the endpoints' classifier features.
    """
    index_a = torch.tensor([i for i, _ in pairs])
    index_b = torch.tensor([j for _, j in pairs])
    with torch.no_grad():
        z_a, z_b = kit.model.class_embedding(kit.test_y[index_a]), kit.model.class_embedding(kit.test_y[index_b])
    noise_a = ddim_invert(kit, kit.test_x[index_a], z_a, steps)
    noise_b = ddim_invert(kit, kit.test_x[index_b], z_b, steps)
    return slerp(noise_a, noise_b), (z_a + z_b) / 2, kit.real_features[index_a], kit.real_features[index_b]


def morph(kit: DigitsKit, pairs: Sequence[tuple[int, int]], steps: int = 10, iters: int = 20, lr: float = 0.05,
          grad: str = "discrete", solver: str = "dpmpp", order: int = 2, adjoint_order: int = 1,
          adjoint_steps: int | None = None, adjoint_form: str = "eps", threshold: float | None = None,
          snapshot_every: int | None = None, progress: bool = True,
          callback: Callable[[int, float, Tensor], None] | None = None) -> MorphResult:
    """Morphs each pair of held-out digits by optimising x_T and the class embedding z through the sampler.

    Starts from :func:`morph_start` and minimises :func:`morph_loss` on the classifier's features with
    Adam, x_T kept on its Gaussian shell, all pairs in one batch (the loss is a mean over pairs, and Adam's
    update is per element, so each pair follows its own optimisation).

    Args:
        pairs: (i, j) indices into the held-out digits.
        steps: sampling steps (logSNR grid); solver, order: the sampler.
        grad: "discrete" (exact gradient) or "adjoint" (AdjointDEIS of `adjoint_order` in `adjoint_form`
            on `adjoint_steps`).
        threshold: same-digit threshold; None computes it (:func:`verification_threshold`).
        snapshot_every: keep the sample every this many iterations (and the first).
    """
    x_T, z, f_a, f_b = morph_start(kit, pairs, steps)
    per_pair: list[list[float]] = []
    snapshots: dict[int, Tensor] = {}

    def loss_fn(x0):
        loss = morph_loss(kit.classifier.features(x0.clamp(-1, 1)), f_a, f_b)
        per_pair.append(loss.detach().tolist())
        return loss.mean()

    def record(it, value, x0):
        if it == 0 or (snapshot_every and it % snapshot_every == 0):
            snapshots[it] = x0
        if callback is not None:
            callback(it, value, x0)

    adjoint = {}
    if grad == "adjoint":
        adjoint = dict(adjoint=AdjointOptions(order=adjoint_order, form=adjoint_form, steps=adjoint_steps))
    start = time.perf_counter()
    result = guide(kit.model, kit.schedule, loss_fn, x_T, cond=z, optimize=("x_T", "cond"), steps=steps,
                   iters=iters, lr=lr, grad=grad, progress=progress, callback=record, solver=solver, order=order,
                   **adjoint)
    seconds = time.perf_counter() - start
    d_a, d_b = endpoint_distances(kit, result.sample, pairs)
    if threshold is None:
        threshold, _ = verification_threshold(kit)
    return MorphResult(list(pairs), result.sample, snapshots.get(0, result.sample), result.losses,
                       per_pair[:len(result.losses)], d_a, d_b, identity_loss(d_a, d_b),
                       (d_a <= threshold) & (d_b <= threshold), threshold, snapshots, seconds)


def morph_rows(kit: DigitsKit, result: MorphResult) -> list[list[Tensor | None]]:
    """One grid row per pair: endpoint A, the snapshots in iteration order, the final morph, endpoint B."""
    rows = []
    for k, (i, j) in enumerate(result.pairs):
        middle = [result.snapshots[it][k] for it in sorted(result.snapshots)]
        rows.append([kit.test_x[i], None, *middle, result.sample[k], None, kit.test_x[j]])
    return rows


def run_demo(out: pathlib.Path, quick: bool = False, seed: int = 0, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """The digits demo: sample grids, the FD-digits table, a guided morph, and the PNGs; prints as it goes.

    Returns:
        {"fd": {...}, "morph": {...}, "files": [paths written]}.
    """
    from .images import grid_pixels, save_line_plot, write_png

    started = time.perf_counter()
    kit = load_kit()
    steps_list = (5, 10) if quick else (5, 10, 20)
    n = 100 if quick else 500
    table, results, samples = fd_table(kit, DEMO_SOLVERS, steps_list, n, seed, progress)
    echo(table)
    files = []
    for solver, order in DEMO_SOLVERS:
        rows = []
        for steps in steps_list:
            images = samples[solver, order, steps]
            rows += [list(images[:10]), list(images[10:20]), []]
        name = SOLVER_NAMES[solver, order].lower().replace("+", "p")
        files.append(write_png(out / f"samples-{name}.png", grid_pixels(rows[:-1], scale=5)))
    echo(f"sample grids: columns are the digits 0-9; two rows per step count N = {', '.join(map(str, steps_list))}")

    threshold, same_rate = verification_threshold(kit)
    pairs = morph_pairs(kit, 2 if quick else 6, seed)
    iters = 4 if quick else 50
    result = morph(kit, pairs, steps=10, iters=iters, grad="discrete", threshold=threshold,
                   snapshot_every=max(1, iters // 3), progress=progress)
    files.append(write_png(out / "morph.png", grid_pixels(morph_rows(kit, result), scale=6)))
    series = {"mean over pairs": result.losses}
    series.update({f"{int(kit.test_y[i])}->{int(kit.test_y[j])}": [row[k] for row in result.pair_losses]
                   for k, (i, j) in enumerate(pairs)})
    files.append(save_line_plot(out / "morph-loss.png", series, title="morph loss (discrete adjoint)",
                                xlabel="iteration", ylabel="identity loss"))
    echo(f"morph of {len(pairs)} held-out pairs, {iters} Adam iterations on x_T and z through DPM++2M, 10 steps "
         f"(exact discrete gradient), {result.seconds:.1f} s:")
    echo(f"  same-digit threshold: cosine distance {threshold:.3f} (1% of different-digit held-out pairs below it, "
         f"{same_rate:.0%} of same-digit pairs)")
    for k, (i, j) in enumerate(pairs):
        echo(f"  {int(kit.test_y[i])} (#{i}) -> {int(kit.test_y[j])} (#{j}): loss {result.pair_losses[0][k]:.3f} -> "
             f"{float(result.final_losses[k]):.3f}, distances {float(result.distance_a[k]):.3f} / "
             f"{float(result.distance_b[k]):.3f}"
             f"{' (both within threshold)' if result.accepted[k] else ''}")
    echo("morph.png: one row per pair: endpoint A | the morph at iterations "
         f"{', '.join(map(str, sorted(result.snapshots)))} and after the last | endpoint B")
    echo(f"done in {time.perf_counter() - started:.0f} s; pictures in {out.resolve()}")
    return {"fd": results, "morph": result, "files": files}


def zoo_table(name: str = "digits", times: Sequence[float] = (50, 200, 500, 800), n: int = 64, probes: int = 32,
              points: int = 32, radius: float = 1.0, seed: int = 0) -> list[DiagnosticRow]:
    """Both diagnostics for a shipped model and for the exact score of a Gaussian fitted to its training data.

    The points are the first `n` held-out digits noised at each t, conditioned on their labels; the
    Gaussian has the training digits' per-pixel mean and standard deviation (floored at 0.01).

    Args:
        name: a model of ``adjointdeis.zoo.MODELS``; times: its model times (training steps for "digits").
        n: the held-out digits used, 1 to 297.
        probes, points, radius, seed: as in :func:`conservativity_table`.

    Raises:
        ValueError naming n when there are not n held-out digits.
    """
    train_x, _, test_x, test_y = load_digits_split()
    validation.integer(n, "n", 1, len(test_x))
    entry = zoo.load(name)
    entry.model.requires_grad_(False)
    gaussian = GaussianEpsModel(entry.schedule, train_x.mean(0), train_x.std(0).clamp_min(0.01))
    models = {"Gaussian fit (exact score)": (gaussian, "eps"), name: (entry.model, entry.prediction)}
    return conservativity_table(models, entry.schedule, test_x[:n], times, cond=test_y[:n], probes=probes,
                                points=points, radius=radius, seed=seed)
