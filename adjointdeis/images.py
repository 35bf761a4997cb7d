"""PNG output: digit grids and line plots (Pillow writes the PNGs; matplotlib draws the plots if installed).

Images are (batch, 1, h, w) tensors in the data range [-1, 1] (ink = +1, as the zoo's digits) and are
drawn as dark ink on white. A grid is a list of rows, each a list of images or ``None`` for a blank cell.
"""

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import validation

PAD_GREY = 160


def write_png(path, pixels: np.ndarray) -> pathlib.Path:
    """Writes an 8-bit greyscale (h, w) or RGB (h, w, 3) uint8 array as a PNG file.

    Returns:
        the path written.

    Raises:
        ValueError for another shape or dtype; ImportError without Pillow (``pip install adjointdeis[zoo]``).
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"pixels must be uint8 (h, w) or (h, w, 3), got {pixels.dtype} {pixels.shape}")
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("writing PNGs needs Pillow: pip install 'adjointdeis[zoo]'") from error
    path = pathlib.Path(path)
    Image.fromarray(pixels).save(path, format="PNG")   # uint8: "L" for (h, w), "RGB" for (h, w, 3)
    return path


def to_pixels(images: Tensor, scale: int = 4) -> np.ndarray:
    """(n, 1, h, w) images in [-1, 1] -> (n, h*scale, w*scale) uint8, ink dark on white.

    Raises:
        ValueError naming images when they are not (n, 1, h, w) or hold NaN, or naming scale below 1.
    """
    validation.count(scale, "scale")
    if validation.floating(images, "images").dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (n, 1, h, w) greyscale, got {list(images.shape)}")
    if bool(images.isnan().any()):
        raise ValueError("images hold NaN, which has no grey level")
    x = images.detach().float().cpu().clamp(-1, 1)[:, 0]
    x = ((1 - x) * 127.5).round().to(torch.uint8).numpy()
    return x.repeat(scale, axis=1).repeat(scale, axis=2)


def grid_pixels(rows: Sequence[Sequence[Tensor | None]], scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tiles rows of (1, h, w) images (``None`` leaves a blank cell) into one uint8 picture.

    Args:
        rows: rows of cells; each cell a (1, h, w) or (h, w) tensor in [-1, 1], or None.
        scale: pixels per image pixel.
        pad: grey pixels between cells.

    Raises:
        ValueError for a grid without images, cells of different sizes, scale below 1 or pad below 0.
    """
    validation.count(scale, "scale")
    validation.integer(pad, "pad", 0)
    cells = [c for row in rows for c in row if c is not None]
    if not cells:
        raise ValueError("a grid needs at least one image")
    if not all(isinstance(c, Tensor) and c.dim() >= 2 for c in cells):
        raise ValueError("every cell of a grid must be a (1, h, w) or (h, w) image tensor or None, got "
                         f"{sorted({type(c).__name__ + str(tuple(getattr(c, 'shape', ()))) for c in cells})}")
    h, w = cells[0].shape[-2:]
    if any(c.shape[-2:] != (h, w) or c.numel() != h * w for c in cells):
        raise ValueError(f"every cell of a grid must be one ({h}, {w}) image, got "
                         f"{sorted({tuple(c.shape) for c in cells})}")
    ch, cw = h * scale, w * scale
    ncol = max(len(row) for row in rows)
    out = np.full((len(rows) * (ch + pad) + pad, ncol * (cw + pad) + pad), PAD_GREY, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is None:
                continue
            top, left = pad + i * (ch + pad), pad + j * (cw + pad)
            out[top:top + ch, left:left + cw] = to_pixels(cell.reshape(1, 1, h, w), scale)[0]
    return out


def save_grid(path, images: Tensor, ncol: int, scale: int = 4) -> pathlib.Path:
    """Writes (n, 1, h, w) images in [-1, 1] as a PNG grid of `ncol` columns, row by row."""
    validation.count(ncol, "ncol")
    rows = [list(images[i:i + ncol]) for i in range(0, len(images), ncol)]
    return write_png(path, grid_pixels(rows, scale))


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _raster_plot(series: Mapping[str, Sequence[float]], width: int = 480, height: int = 320) -> np.ndarray:
    """A bare RGB line plot (axes box, no text) for when matplotlib is missing; non-finite values leave gaps."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 30, width - 10, 10, height - 30
    img[top:bottom + 1, left] = img[bottom, left:right + 1] = img[top, left:right + 1] = 0
    img[top:bottom + 1, right] = 0
    values = [v for ys in series.values() for v in ys if np.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    high = high if high > low else low + 1.0
    for k, ys in enumerate(series.values()):
        ys = np.asarray(ys, dtype=np.float64)
        if len(ys) == 0:
            continue
        xs = np.linspace(left + 1, right - 1, max(len(ys), 2))[:len(ys)]
        py = bottom - 1 - (ys - low) / (high - low) * (bottom - top - 2)
        dense = np.linspace(0, len(ys) - 1, 8 * width) if len(ys) > 1 else np.zeros(1)
        cy = np.interp(dense, np.arange(len(ys)), py)
        finite = np.isfinite(cy)   # NaN and infinite values leave gaps, as matplotlib draws them
        cx = np.interp(dense, np.arange(len(ys)), xs)[finite].round().astype(int)
        cy = cy[finite].round().astype(int)
        for dy in (0, 1):
            img[np.clip(cy + dy, 0, height - 1), np.clip(cx, 0, width - 1)] = colours[k % len(colours)]
    return img


def save_line_plot(path, series: Mapping[str, Sequence[float]], title: str = "", xlabel: str = "",
                   ylabel: str = "") -> pathlib.Path:
    """Plots named series against their index into a PNG: with matplotlib if installed, else a bare raster
    (lines and an axes box, no text)."""
    if not have_matplotlib():
        return write_png(path, _raster_plot(series))
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, ys in series.items():
        ax.plot(range(len(ys)), list(ys), label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return pathlib.Path(path)
