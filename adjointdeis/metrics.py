"""Sample-quality metrics at digit scale, standing in for FID (they are not FID).

"FD-digits" is the Fréchet distance between Gaussians fitted to the shipped digit classifier's
64-d penultimate features of generated and held-out real digits; numbers are comparable only
with other FD-digits numbers. Also: classifier accuracy on class-conditional samples, and
precision/recall in the same feature space (k-nearest-neighbour manifolds).
"""

import torch
from torch import Tensor

from . import validation


def _sqrtm_psd(a: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(a)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    Args:
        features_a: (n, d); features_b: (m, d).

    Returns:
        ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, computed in float64.
    """
    a = validation.instance(features_a, "features_a", Tensor, "an (n, d) tensor").double()
    b = validation.instance(features_b, "features_b", Tensor, "an (m, d) tensor").double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"feature sets must be (n, d) with equal d and n >= 2, got {list(a.shape)} and {list(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


@torch.no_grad()
def classifier_features(classifier, images: Tensor, batch_size: int = 512) -> Tensor:
    """(n, 64) penultimate features of images (n, 1, 8, 8) in [-1, 1] (clamped)."""
    validation.count(batch_size, "batch_size")
    chunks = [classifier.features(images[i:i + batch_size].float().clamp(-1, 1))
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def class_accuracy(classifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images the classifier assigns to their intended class.

    Raises:
        ValueError naming labels when they are not one label per image, (n,).
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(f"class_accuracy: labels must be a ({len(images)},) tensor, one per image, got "
                         f"{list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    logits = classifier(images.float().clamp(-1, 1))
    return float((logits.argmax(1) == labels.to(logits.device)).float().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN balls in feature space.

    Precision: fraction of fake features inside the union of real k-NN balls; recall: the converse.

    Raises:
        ValueError naming k when it is not a positive integer below each set's size, or naming a feature set
        that is not (n, d) with the other's d.
    """
    validation.integer(k, "k", 1)
    validation.instance(real, "real", Tensor, "an (n, d) tensor")
    validation.instance(fake, "fake", Tensor, "an (m, d) tensor")
    for name, features in (("real", real), ("fake", fake)):
        if features.dim() != 2 or features.shape[1] != real.shape[-1]:
            raise ValueError(f"precision_recall: {name} must be (n, d) features with real's d, got "
                             f"{list(features.shape)}")
        if len(features) <= k:
            raise ValueError(f"precision_recall: k={k} nearest neighbours need more than {k} {name} features; got "
                             f"{len(features)}")
    real, fake = real.double(), fake.double()

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # the 0-th neighbour is the point itself

    def coverage(points, centres, r):
        return float((torch.cdist(points, centres) <= r[None]).any(1).double().mean())

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))
