"""Training data for the end-to-end runs: tiny Cosmos2 images, optional loss masks, held-out images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tests.cache.helpers import draw_images, image_dataset, text_dataset


@dataclass(frozen=True)
class Data:
    datasets: list[dict[str, Any]]
    model: Path


def cosmos_training_data(root: Path, tiny_cosmos_dir: Path, *, masks: bool = False) -> Data:
    """With ``masks``, every training image has a mask (left half white: learned, right half black:
    ignored) in a SimpleTuner conditioning dataset, so every run trains with masked loss."""
    images = draw_images(root / "images", [(64, 64)] * 8)
    draw_images(root / "eval", [(64, 64)] * 2, start=20)
    square = {"resolution_type": "pixel", "crop": True, "crop_aspect": "square"}
    masked: dict[str, Any] = {}
    mask_datasets: list[dict[str, Any]] = []
    if masks:
        (root / "masks").mkdir()
        for image in images:
            mask = Image.new("RGB", (64, 64), "black")
            mask.paste((255, 255, 255), (0, 0, 32, 64))
            mask.save(root / "masks" / image.name)
        masked = {"conditioning_data": "masks"}
        mask_datasets = [
            {
                "id": "masks",
                "type": "local",
                "dataset_type": "conditioning",
                "conditioning_type": "mask",
                "instance_data_dir": str(root / "masks"),
            }
        ]
    return Data(
        datasets=[
            image_dataset(root / "images", root / "cache/vae", **square, **masked),
            *mask_datasets,
            image_dataset(
                root / "eval", root / "cache/vae-eval", id="held-out", dataset_type="eval", **square
            ),
            text_dataset(root / "cache/text"),
        ],
        model=tiny_cosmos_dir,
    )
