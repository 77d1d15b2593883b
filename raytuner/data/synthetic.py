"""Synthetic captioned images, drawn offline for the demo and the tests.

Each image is a coloured shape on a coloured background, and its caption says exactly that, so
a model can learn the pairing and a person can check the validation images at a glance.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True, kw_only=True)
class SyntheticImage:
    image: Image.Image
    caption: str


def draw_shape(shape: str, colour: str, background: str, *, width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(image)
    margin_x, margin_y = width // 5, height // 5
    box = (margin_x, margin_y, width - margin_x, height - margin_y)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "triangle":
        draw.polygon(
            [(width // 2, margin_y), (width - margin_x, height - margin_y), (margin_x, height - margin_y)],
            fill=COLOURS[colour],
        )
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return image


def synthetic_images(count: int, *, width: int = 64, height: int = 64, seed: int = 0) -> list[SyntheticImage]:
    """``count`` distinct shape/colour combinations, in a seeded order."""
    rng = random.Random(seed)
    combos = [
        (shape, colour, background)
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if colour != background
    ]
    rng.shuffle(combos)
    if count > len(combos):
        raise ValueError(f"at most {len(combos)} distinct synthetic images, asked for {count}")
    return [
        SyntheticImage(
            image=draw_shape(shape, colour, background, width=width, height=height),
            caption=f"a {colour} {shape} on a {background} background",
        )
        for shape, colour, background in combos[:count]
    ]


def write_dataset(folder: str | Path, items: list[SyntheticImage]) -> list[Path]:
    """Write PNGs with ``.txt`` captions beside them (SimpleTuner's ``textfile`` caption strategy)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, item in enumerate(items):
        path = folder / f"{index:04d}.png"
        item.image.save(path)
        path.with_suffix(".txt").write_text(item.caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def to_pixels(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """PIL images or ``[H, W, 3]`` uint8 arrays -> ``[B, 3, H, W]`` float32 in ``[-1, 1]``, as
    diffusers' image processors give."""
    arrays = np.stack(
        [
            np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
            / 127.5
            - 1.0
            for image in images
        ]
    )
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
