"""PNG helpers (adjointdeis.images): grey levels, grid layout, and bad input naming the argument."""

import numpy as np
import pytest
import torch

from adjointdeis import images


def test_grey_levels_and_scale():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    pixels = images.to_pixels(x, scale=2)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 4, 4)
    # ink (+1) is black, -1 white, 0 the rounded middle (127.5 -> 128), beyond the range clamped
    assert pixels[0, ::2, ::2].tolist() == [[255, 128], [0, 0]]
    assert (pixels[0, :2, :2] == 255).all()


def test_grid_layout_leaves_blank_cells_and_pads_grey():
    a, b = torch.ones(1, 2, 2), -torch.ones(2, 2)
    grid = images.grid_pixels([[a, None], [None, b]], scale=1, pad=1)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1)
    assert (grid[1:3, 1:3] == 0).all() and (grid[4:6, 4:6] == 255).all()
    assert (grid[1:3, 4:6] == images.PAD_GREY).all() and (grid[0] == images.PAD_GREY).all()


def test_save_grid_writes_rows_of_ncol(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    path = images.save_grid(tmp_path / "g.png", torch.zeros(5, 1, 8, 8), ncol=2, scale=1)
    assert Image.open(path).size == (2 * 10 + 2, 3 * 10 + 2)


def test_bad_input_names_the_argument(tmp_path):
    x = torch.zeros(2, 1, 8, 8)
    for bad, match in ((dict(ncol=0), "ncol"), (dict(ncol=2, scale=0), "scale")):
        with pytest.raises(ValueError, match=match):
            images.save_grid(tmp_path / "g.png", x, **bad)
    with pytest.raises(ValueError, match=r"\(n, 1, h, w\)"):
        images.to_pixels(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        images.to_pixels(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="every cell"):
        images.grid_pixels([[torch.zeros(1, 8, 8), torch.zeros(1, 4, 4)]])
    with pytest.raises(ValueError, match="pad"):
        images.grid_pixels([[torch.zeros(1, 8, 8)]], pad=-1)


def test_grid_arguments_are_checked_before_the_canvas_is_made():
    """A negative or fractional scale reached numpy's canvas first ("negative dimensions are not allowed"), and a
    1-d cell failed to unpack its shape."""
    cell = torch.zeros(1, 8, 8)
    for scale in (-1, 1.5):
        with pytest.raises(ValueError, match="scale must be a positive integer"):
            images.grid_pixels([[cell]], scale=scale)
    with pytest.raises(ValueError, match="every cell of a grid must be"):
        images.grid_pixels([[torch.zeros(64)]])


def test_raster_plot_leaves_gaps_at_non_finite_values(monkeypatch, tmp_path):
    """Without matplotlib, NaN/inf values were cast to integers and drawn as lines along the picture's edge."""
    monkeypatch.setattr(images, "have_matplotlib", lambda: False)
    from PIL import Image

    finite = np.asarray(Image.open(images.save_line_plot(tmp_path / "a.png", {"a": [1.0, 2.0, 3.0]})))
    for bad in (float("nan"), float("inf"), -float("inf")):
        pixels = np.asarray(Image.open(images.save_line_plot(tmp_path / "b.png", {"a": [1.0, 2.0, 3.0, bad]})))
        inside = np.zeros(pixels.shape[:2], dtype=bool)
        inside[10:291, 30:471] = True              # the axes box of the 480 x 320 raster
        assert not (pixels[~inside] != 255).any(), bad
        assert (pixels != 255).any(-1).sum() >= 0.5 * (finite != 255).any(-1).sum()   # the finite part is drawn
