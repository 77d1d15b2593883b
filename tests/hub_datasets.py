"""Tiny Hugging Face datasets written with ``datasets`` on disk (no Hub access), for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raytuner.data.synthetic import synthetic_images


def save_hub_dataset(
    folder: Path, count: int = 3, *, size: tuple[int, int] = (64, 48), **columns: list[Any]
) -> Path:
    """``count`` synthetic images in an ``image`` column and their captions in ``caption``
    (``columns`` adds or replaces columns), saved with ``save_to_disk``."""
    import datasets

    items = synthetic_images(count, width=size[0], height=size[1])
    data: dict[str, list[Any]] = {
        "image": [item.image for item in items],
        "caption": [item.caption for item in items],
    }
    data.update(columns)
    features = datasets.Features(
        {name: datasets.Image() if name == "image" else _feature(values) for name, values in data.items()}
    )
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(folder))
    return folder


def _feature(values: list[Any]) -> Any:
    import datasets

    sample = next((value for value in values if value is not None), "")
    if isinstance(sample, list):
        return datasets.Sequence(datasets.Value("string"))
    if isinstance(sample, dict):
        return {key: datasets.Value("string") for key in sample}
    return datasets.Value("string")
