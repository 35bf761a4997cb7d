"""Small real networks for gradient tests: a few-layer conv net with a time embedding."""

import math

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A conv net eps(x, t[, cond]) with a sinusoidal time embedding, a norm layer and a buffer.

    cond: (batch, cond_dim) embedding added to the features.
    """

    def __init__(self, channels=2, width=8, cond_dim=4):
        super().__init__()
        self.time = nn.Linear(8, width)
        self.cond = nn.Linear(cond_dim, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.register_buffer("frequencies", torch.exp(torch.linspace(0, math.log(100.0), 4)))

    def forward(self, x, t, cond=None):
        angles = t.to(x.dtype)[:, None] * self.frequencies.to(x.dtype)
        emb = self.time(torch.cat([angles.sin(), angles.cos()], 1))
        if cond is not None:
            emb = emb + self.cond(cond)
        h = torch.nn.functional.silu(self.norm(self.inp(x)) + emb[:, :, None, None])
        h = torch.nn.functional.silu(self.mid(h))
        return self.out(h)


class ResidualBlock(nn.Module):
    """A residual 1x1 convolution on 2 channels that DSNO finds by its ``temporal_channels``."""

    temporal_channels = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return x + self.conv(x)
