"""TEMPORARY stand-in for the helper's FourierTemporalConv (pure PyTorch); replaced at merge."""
import torch
from torch import nn
from torch.nn import functional as F


class FourierTemporalConv(nn.Module):
    def __init__(self, in_channels, out_channels, n_times, modes, residual=True, activation="leaky_relu",
                 channelwise=False):
        super().__init__()
        self.n_times, self.modes, self.residual, self.activation = n_times, modes, residual, activation
        scale = 1e-2 / in_channels
        self.weight = nn.Parameter(scale * torch.randn(modes, in_channels, out_channels, 2))

    def forward(self, x):
        T = x.shape[1]
        w = torch.view_as_complex(self.weight.float())
        xf = torch.fft.rfft(x.float(), dim=1)[:, :self.modes]
        yf = torch.einsum("bkihw,kio->bkohw", xf, w)
        y = torch.fft.irfft(yf, n=T, dim=1).to(x.dtype)
        if self.activation is not None:
            y = F.leaky_relu(y, 0.01)
        return x + y if self.residual else y
