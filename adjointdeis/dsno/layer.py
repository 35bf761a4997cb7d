"""DSNO's temporal block: a Fourier convolution along the trajectory axis (docs/math.md section 7)."""

import torch
from torch import Tensor, nn

from .. import ops, validation
from ..reference import MAX_TIMES

ACTIVATIONS = ("leaky_relu", None)
NEGATIVE_SLOPE = 0.01


class FourierTemporalConv(nn.Module):
    """DSNO's temporal block on activations (B, T, C, H, W): ``y = x + LeakyReLU(layer(x))``.

    ``layer`` keeps the first ``modes`` bins of the rfft along T and multiplies bin k by a complex
    ``C_in x C_out`` matrix W_k (or, channel-wise, a complex scalar per channel), back through the
    irfft. It runs as the fused op ops.fourier_temporal_conv: the factored product
    ``(E (x) I) M (P (x) I)`` of docs/math.md section 7.2 (no FFT, no complex tensor on the activations).

    The weight is stored as a real parameter (modes, C_in, C_out, 2) (channel-wise: (modes, C, 2)),
    real and imaginary parts last (safetensors holds no complex tensors), initialised small,
    uniform in [0, 1/(C_in C_out)) as in FNO/DSNO, so that a residual block starts close to the
    identity.

    Args:
        in_channels: C_in.
        out_channels: C_out (equal to in_channels when residual or channelwise).
        n_times: T, the trajectory points, in [2, 32].
        modes: bins kept, in [1, T // 2 + 1].
        residual: add the input (y = x + act(layer(x))).
        activation: "leaky_relu" (slope 0.01) or None.
        channelwise: per-channel complex multipliers instead of channel mixing.

    Raises:
        ValueError for an out-of-range or inconsistent argument.
    """

    def __init__(self, in_channels: int, out_channels: int, n_times: int, modes: int, residual: bool = True,
                 activation: str | None = "leaky_relu", channelwise: bool = False):
        super().__init__()
        in_channels, out_channels = (validation.count(in_channels, "in_channels"),
                                     validation.count(out_channels, "out_channels"))
        n_times = validation.integer(n_times, "n_times", 2, MAX_TIMES)
        modes = validation.integer(modes, "modes", 1, n_times // 2 + 1)
        validation.choice(activation, "activation", ACTIVATIONS)
        residual, channelwise = validation.flag(residual, "residual"), validation.flag(channelwise, "channelwise")
        if (residual or channelwise) and in_channels != out_channels:
            why = "residual" if residual else "channelwise"
            raise ValueError(f"{why}=True needs in_channels == out_channels, got {in_channels} and {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.n_times, self.modes = n_times, modes
        self.residual, self.activation, self.channelwise = residual, activation, channelwise
        shape = (modes, in_channels, 2) if channelwise else (modes, in_channels, out_channels, 2)
        self.weight = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialises the weight uniformly in [0, 1 / (C_in C_out))."""
        scale = 1.0 / (self.in_channels * (1 if self.channelwise else self.out_channels))
        with torch.no_grad():
            self.weight.uniform_(0.0, scale)

    def complex_weight(self, dtype: torch.dtype = torch.complex64) -> Tensor:
        """The weight as a complex tensor (modes, C_in, C_out) (channel-wise: (modes, C))."""
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        return torch.view_as_complex(self.weight.to(real).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block.

        Args:
            x: (B, n_times, in_channels, H, W), float64/float32/float16/bfloat16.

        Returns:
            (B, n_times, out_channels, H, W) in x's dtype.
        """
        validation.floating(x, "x")
        if x.dim() != 5 or x.shape[1] != self.n_times or x.shape[2] != self.in_channels:
            raise ValueError(
                f"FourierTemporalConv: x must have shape (B, n_times={self.n_times}, "
                f"in_channels={self.in_channels}, H, W), got {list(x.shape)}"
            )
        weight = self.complex_weight(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        slope = NEGATIVE_SLOPE if self.activation == "leaky_relu" else None
        conv = ops.fourier_temporal_conv_channelwise if self.channelwise else ops.fourier_temporal_conv
        return conv(x, weight, self.modes, self.residual, slope)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, n_times={self.n_times}, modes={self.modes}, "
                f"residual={self.residual}, activation={self.activation!r}, channelwise={self.channelwise}")
