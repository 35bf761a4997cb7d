"""The zoo's networks: a small class-conditional UNet for 8x8 digits and a digit classifier."""

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def timestep_embedding(t: Tensor, dim: int, max_period: float = 1000.0) -> Tensor:
    """(batch,) times -> (batch, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time/class embedding added in between."""

    def __init__(self, channels_in: int, channels_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels_out)
        self.norm2 = nn.GroupNorm(8, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    @property
    def temporal_channels(self) -> int:
        """Output channels: a DSNO temporal block follows every ResBlock (:func:`adjointdeis.dsno.find_blocks`)."""
        return self.conv2.out_channels

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class DigitsUNet(nn.Module):
    """eps(x, t, z) for 1x8x8 digits: a two-level UNet conditioned on time and a class embedding z.

    Args (forward):
        x: (batch, 1, 8, 8); t: (batch,) training timesteps in [0, 999];
        cond: (batch,) int64 labels (10 = unconditional) or (batch, emb_dim) float embeddings
            (e.g. ``model.class_embedding(labels)``, so gradients with respect to z are possible).
    """

    sample_shape = (1, 8, 8)

    def __init__(self, channels: tuple[int, int] = (32, 64), emb_dim: int = 64, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.emb_dim = emb_dim
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim)  # last row: unconditional
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.down2 = ResBlock(c1, c2, emb_dim)
        self.mid = ResBlock(c2, c2, emb_dim)
        self.up2 = ResBlock(2 * c2, c1, emb_dim)
        self.up1 = ResBlock(2 * c1, c1, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def embed(self, cond) -> Tensor:
        """Class labels (int64) to embeddings; float embeddings pass through."""
        return self.class_embedding(cond) if not cond.is_floating_point() else cond

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            cond = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(x.dtype)) + self.embed(cond).to(x.dtype)
        h1 = self.down1(self.inp(x), emb)                       # 8x8
        h2 = self.down2(F.avg_pool2d(h1, 2), emb)               # 4x4
        m = self.mid(F.avg_pool2d(h2, 2), emb)                  # 2x2
        u2 = self.up2(torch.cat([F.interpolate(m, scale_factor=2.0), h2], 1), emb)
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2.0), h1], 1), emb)
        return self.out(u1)


class FlowDigitsUNet(DigitsUNet):
    """The digits UNet as a flow-matching model: ``v(x, t, z) = eps - x0`` with t the flow time in [0, 1].

    Its time embedding sees ``time_scale * t`` (1000 t, diffusers' convention for flow models, so the
    sinusoidal features span the same range as the diffusion model's timesteps); the state dict is
    the plain :class:`DigitsUNet`'s.
    """

    def __init__(self, time_scale: float = 1000.0, **kwargs):
        super().__init__(**kwargs)
        self.time_scale = time_scale

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return super().forward(x, self.time_scale * t, cond)


class DigitClassifier(nn.Module):
    """A small CNN for 1x8x8 digits in [-1, 1]; ``features`` gives its 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
