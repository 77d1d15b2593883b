"""Listing and probing the rows of a Hugging Face dataset saved on disk (no Ray, no Hub)."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from raytuner.config.datasets import DatasetConfig
from raytuner.data.discovery import DatasetError, list_dataset, merge_probes, probe_file, read_source
from raytuner.data.synthetic import synthetic_images
from tests.hub_datasets import save_hub_dataset


def _dataset(folder: Path, **options: object) -> DatasetConfig:
    values: dict[str, object] = {
        "id": "hub",
        "type": "huggingface",
        "dataset_name": str(folder),
        "metadata_backend": "huggingface",
        "caption_strategy": "huggingface",
    }
    values.update(options)
    return DatasetConfig(**values)  # type: ignore[arg-type]


def _probe_all(dataset: DatasetConfig) -> tuple[list, list]:
    listing = list_dataset(dataset)
    probes = {
        listed.fingerprint: probe_file(listed, listing.location, caption_strategy=dataset.caption_strategy)
        for listed in listing.files
    }
    return merge_probes(listing, probes)


def test_rows_are_listed_and_probed_with_their_captions(tmp_path: Path) -> None:
    folder = save_hub_dataset(
        tmp_path / "hub",
        4,
        caption=["a red circle", "", None, "  "],
        alt=["", "from the fallback", "", ""],
        description=["", "", "described", ""],
        image_column_two=["x", "y", "z", "w"],
    )
    images, skipped = _probe_all(
        _dataset(folder, caption_columns=("caption",), fallback_caption_column="alt")
    )
    assert [image.relative for image in images] == ["train/0", "train/1", "train/2"]
    assert [image.captions for image in images] == [("a red circle",), ("from the fallback",), ("described",)]
    assert [(entry.relative, "no caption" in entry.reason) for entry in skipped] == [("train/3", True)]
    # The probe hashes the stored image bytes, and reads the size from the decoded image.
    stored = synthetic_images(4, width=64, height=48)[0].image
    decoded = Image.open(io.BytesIO(read_source(list_dataset(_dataset(folder)).location, "0")))
    assert decoded.size == stored.size == (images[0].width, images[0].height)
    assert (
        images[0].sha256
        == hashlib.sha256(read_source(list_dataset(_dataset(folder)).location, "0")).digest().hex()
    )


def test_several_caption_columns_and_nested_ones_give_several_captions(tmp_path: Path) -> None:
    folder = save_hub_dataset(
        tmp_path / "hub", 2, short=["short one", "short two"], meta=[{"text": "nested one"}, {"text": ""}]
    )
    images, _ = _probe_all(_dataset(folder, caption_columns=("short", "meta.text")))
    assert [image.captions for image in images] == [("short one", "nested one"), ("short two",)]


def test_another_image_column_and_split_are_read(tmp_path: Path) -> None:
    import datasets

    picture = synthetic_images(1, width=40, height=30)[0]
    split = datasets.Dataset.from_dict(
        {"picture": [picture.image], "caption": ["held out"]},
        features=datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")}),
    )
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "hub"))
    images, _ = _probe_all(_dataset(tmp_path / "hub", split="test", image_column="picture"))
    assert [(image.relative, image.width, image.height, image.captions) for image in images] == [
        ("test/0", 40, 30, ("held out",))
    ]
    with pytest.raises(DatasetError, match=r"'split' = 'train'.*has splits test"):
        list_dataset(_dataset(tmp_path / "hub"))
    with pytest.raises(DatasetError, match=r"'image_column' = 'image'.*columns: picture, caption"):
        list_dataset(_dataset(tmp_path / "hub", split="test"))
    save_hub_dataset(tmp_path / "single", 1)
    with pytest.raises(DatasetError, match=r"'split' = 'test'.*holds a single split"):
        list_dataset(_dataset(tmp_path / "single", split="test"))


def test_instanceprompt_captions_every_row_and_a_changed_caption_column_reads_rows_again(
    tmp_path: Path,
) -> None:
    folder = save_hub_dataset(tmp_path / "hub", 2, other=["o1", "o2"])
    images, _ = _probe_all(_dataset(folder, caption_strategy="instanceprompt", instance_prompt="sks"))
    assert [image.captions for image in images] == [("sks",), ("sks",)]
    before = {listed.fingerprint for listed in list_dataset(_dataset(folder)).files}
    # Read once for both datasets on one split, a row would be probed for captions it does not need.
    prompted = list_dataset(_dataset(folder, caption_strategy="instanceprompt", instance_prompt="sks")).files
    assert before.isdisjoint(listed.fingerprint for listed in prompted)
    after = {
        listed.fingerprint for listed in list_dataset(_dataset(folder, caption_columns=("other",))).files
    }
    assert before.isdisjoint(after)


def test_a_folder_saved_again_is_read_anew(tmp_path: Path) -> None:
    folder = save_hub_dataset(tmp_path / "hub", 2)
    before = {listed.fingerprint for listed in list_dataset(_dataset(folder)).files}
    save_hub_dataset(tmp_path / "next", 3, caption=["one", "two", "three"])
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "next", folder, copy_function=shutil.copy)  # new modification times
    images, _ = _probe_all(_dataset(folder))
    assert [image.captions for image in images] == [("one",), ("two",), ("three",)]
    assert before.isdisjoint(listed.fingerprint for listed in list_dataset(_dataset(folder)).files)


def test_a_folder_this_node_cannot_see_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"dataset 'hub': node cannot read folder .*missing .*shared filesystem"
    ):
        list_dataset(_dataset(tmp_path / "missing"))
