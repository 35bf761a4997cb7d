"""The digit-scale metrics against closed forms."""

import pytest
import torch

from adjointdeis import metrics


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    d, n = 4, 200_000
    mu_a, mu_b = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([0.5, 1.0, 0.0, 2.0])
    s_a, s_b = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 2.0, 0.5, 0.2])
    a = mu_a + s_a * torch.randn(n, d, generator=g, dtype=torch.float64)
    b = mu_b + s_b * torch.randn(n, d, generator=g, dtype=torch.float64)
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (s_a - s_b)^2.
    exact = float((mu_a - mu_b).pow(2).sum() + (s_a - s_b).pow(2).sum())
    assert metrics.frechet_distance(a, b) == pytest.approx(exact, abs=0.02)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rotation_invariant_and_checks_shapes():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert metrics.frechet_distance(a @ q, b @ q) == pytest.approx(metrics.frechet_distance(a, b), rel=1e-8)
    with pytest.raises(ValueError, match="feature sets"):
        metrics.frechet_distance(a, b[:, :5])


def test_precision_recall():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(500, 2, generator=g)
    assert metrics.precision_recall(real, torch.randn(500, 2, generator=g)) > (0.85, 0.85)
    far = torch.randn(500, 2, generator=g) + 10.0
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    with pytest.raises(ValueError, match="k=3 nearest neighbours need more than 3 fake"):
        metrics.precision_recall(real, far[:3])
    for bad in (far[:, 0], far[:, :1], far[None]):
        with pytest.raises(ValueError, match="fake must be"):
            metrics.precision_recall(real, bad)
    # A fake set covering only half the real support: precise but half the recall.
    half = torch.randn(2000, 2, generator=g)
    half = half[half[:, 0] > 0][:500]
    precision, recall = metrics.precision_recall(real, half)
    assert precision > 0.9 and 0.35 < recall < 0.7


def test_class_accuracy():
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        classifier[1].weight.zero_()
        classifier[1].bias.copy_(torch.arange(10.0))  # always predicts class 9
    images = torch.zeros(4, 1, 8, 8)
    assert metrics.class_accuracy(classifier, images, torch.tensor([9, 9, 1, 9])) == pytest.approx(0.75)
    for bad in (torch.tensor([[9], [9], [1], [9]]), torch.tensor([9]), torch.tensor(9)):
        with pytest.raises(ValueError, match="labels must be"):
            metrics.class_accuracy(classifier, images, bad)


def test_non_tensor_and_bad_batch_arguments_are_named():
    features = torch.randn(5, 3)
    with pytest.raises(ValueError, match="features_a must be an"):
        metrics.frechet_distance(features.numpy(), features)
    with pytest.raises(ValueError, match="fake must be an"):
        metrics.precision_recall(features, features.tolist())
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        metrics.classifier_features(torch.nn.Flatten(), torch.zeros(2, 1, 8, 8), batch_size=0)
    with pytest.raises(ValueError, match="labels must be"):
        metrics.class_accuracy(torch.nn.Flatten(), torch.zeros(2, 1, 8, 8), [1, 2])
