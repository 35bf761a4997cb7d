"""scikit-learn's bundled 8x8 handwritten digits (1,797 images), split and scaled to [-1, 1]."""

import torch

HELD_OUT = 297  # the last 297 images (after a fixed shuffle) are never trained on


def load_digits_split(seed: int = 1234):
    """(train_x, train_y, test_x, test_y): x (n, 1, 8, 8) float32 in [-1, 1], y (n,) int64.

    Raises:
        ImportError if scikit-learn is missing (``pip install adjointdeis[zoo]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits data needs scikit-learn: pip install 'adjointdeis[zoo]'") from error
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:-HELD_OUT], y[:-HELD_OUT], x[-HELD_OUT:], y[-HELD_OUT:]
