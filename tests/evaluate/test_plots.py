"""The loss curve and the labelled image grid are real PNGs with what they were given drawn in them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytuner.evaluate.plots import save_image_grid, save_loss_curve


def _is_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_loss_curve_with_and_without_eval_loss(tmp_path: Path) -> None:
    steps = list(range(1, 51))
    losses = [1.0 / step for step in steps]
    plain = save_loss_curve(steps, losses, tmp_path / "plain" / "loss.png", title="cosmos2image")
    both = save_loss_curve(
        steps, losses, tmp_path / "loss.png", eval_steps=[10, 20, 30], eval_losses=[0.3, 0.2, 0.25], title="t"
    )
    assert _is_png(plain) == _is_png(both) == (600, 350)
    # The eval line (matplotlib's second colour, orange) is drawn only when eval losses are given.
    orange = np.array([255, 127, 14])

    def has_orange(path: Path) -> bool:
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return bool((np.abs(pixels - orange).sum(axis=-1) < 30).any())

    assert has_orange(both) and not has_orange(plain)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": [1, 2], "losses": [0.5]}, "2 steps for 1 losses"),
        ({"steps": [1], "losses": [0.5], "eval_steps": [1]}, "go together"),
        (
            {"steps": [1], "losses": [0.5], "eval_steps": [1], "eval_losses": []},
            "1 eval steps for 0 eval losses",
        ),
    ],
)
def test_loss_curve_refuses_mismatched_series(kwargs: dict[str, list], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        save_loss_curve(path=tmp_path / "loss.png", **kwargs)


def test_image_grid_places_every_image_under_its_label(tmp_path: Path) -> None:
    colours = ["red", "green", "blue"]
    images = [(f"step {i} {colour}", Image.new("RGB", (32, 32), colour)) for i, colour in enumerate(colours)]
    images.append(
        ("a label far too long to fit above a small image, cut short", Image.new("RGB", (64, 32), "black"))
    )
    path = save_image_grid(images, tmp_path / "grid.png", columns=2)
    width, height = _is_png(path)
    assert width == 2 * 64  # cells fit the widest image
    label_height = height // 2 - 32
    assert label_height > 0
    grid = np.asarray(Image.open(path).convert("RGB"))
    for index, (_, image) in enumerate(images):
        top = (index // 2) * (label_height + 32)
        left = (index % 2) * 64 + (64 - image.width) // 2
        cell = grid[top + label_height : top + label_height + 32, left : left + image.width]
        assert np.array_equal(cell, np.asarray(image))
        strip = grid[top : top + label_height, (index % 2) * 64 : (index % 2 + 1) * 64]
        assert (strip < 128).all(axis=-1).any()  # dark label text on white
    square = save_image_grid(images[:3], tmp_path / "square.png")  # columns default: ceil(sqrt(n))
    assert _is_png(square) == (2 * 32, 2 * (label_height + 32))


def test_image_grid_refuses_no_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        save_image_grid([], tmp_path / "grid.png")
