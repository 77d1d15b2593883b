"""type huggingface datasets (saved with datasets, no Hub) through the Ray Data cache build and training,
and SimpleTuner's OmniGen example, which reads one, trained as shipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from raytuner.batches.reader import LatentCache, TextCache
from raytuner.cache.build import BuildOptions, run_cache
from raytuner.cache.format import REPORT_NAME, read_index, read_manifest
from raytuner.cache.keys import caption_key
from raytuner.config import load_config
from raytuner.config.sample_filters import CaptionShuffle
from raytuner.data.captions import shuffled_captions
from raytuner.storage import Location
from raytuner.train.launcher import run_training
from raytuner.train.settings import RayOverrides, resolve_settings
from tests.cache.helpers import text_dataset
from tests.hub_datasets import save_hub_dataset
from tests.simpletuner_examples import OMNIGEN_LOKR, lay_out_example
from tests.training_data import Data, load_run, train

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

CAPTIONS = ["a red circle", "a blue square", ""]


def test_a_huggingface_dataset_is_cached_and_trained_like_a_folder(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    folder = save_hub_dataset(tmp_path / "hub", 3, caption=CAPTIONS)
    captioned: dict[str, Any] = {
        "id": "hub",
        "type": "huggingface",
        "dataset_name": str(folder),
        "metadata_backend": "huggingface",
        "caption_strategy": "huggingface",
        "huggingface": {"caption_column": "caption"},
        # Each caption's words shuffled into one more caption, encoded with the others.
        "caption_shuffle": {"enable": True, "count": 1, "split_on": "space", "seed": 3},
        "resolution": 64,
        "resolution_type": "pixel_area",
        "cache_dir_vae": str(tmp_path / "cache" / "vae"),
    }
    # Shaped like SimpleTuner's cosmos2image.lycoris-lokr example dataloader, at a tiny resolution.
    example: dict[str, Any] = {
        "id": "dreambooth",
        "type": "huggingface",
        "dataset_name": str(folder),
        "crop": True,
        "crop_style": "random",
        "crop_aspect": "square",
        "minimum_image_size": 32,
        "maximum_image_size": 64,
        "target_downsample_size": 64,
        "resolution": 32,
        "resolution_type": "pixel",
        "metadata_backend": "huggingface",
        "caption_strategy": "instanceprompt",
        "instance_prompt": "🟫",
        "cache_dir_vae": str(tmp_path / "cache" / "vae-example"),
        # Encoded by the training workers as batches need it, and written back into this cache.
        "vae_cache_ondemand": True,
    }
    data = Data(
        datasets=[captioned, example, text_dataset(tmp_path / "cache" / "text")], model=tiny_cosmos_dir
    )
    config = {
        "max_train_steps": 2,
        "use_ema": False,
        "validation_step_interval": 100,
        "checkpoint_step_interval": 100,
        # The worker's transformer blocks compiled (dynamo's cheapest backend): training, the eval
        # loss and the closing validation render all run through them.
        "dynamo_backend": "eager",
        "dynamo_use_regional_compilation": True,
    }
    summary = run_cache(load_run(tmp_path / "run", data, **config), BuildOptions())
    assert [(d.images, d.encoded, d.skipped) for d in summary.datasets] == [(2, 2, 1), (3, 0, 0)]
    report = json.loads((tmp_path / "cache" / "vae" / REPORT_NAME).read_text())
    assert report["source"] == f"huggingface:{folder}[train]"
    assert [entry["file"] for entry in report["skipped"]] == ["train/2"]
    # Each row's latents come with its caption from the caption column and its shuffled variant
    # (caption_shuffle), all encoded in the text cache; each step draws one of them.
    shuffle = CaptionShuffle(enable=True, count=1, split_on="space", seed=3)
    expected = {
        caption_key(variant)
        for caption in CAPTIONS[:2]
        for variant in shuffled_captions(caption, shuffle, seed=11)
    }
    assert len(expected) == 4
    folder_vae = Location(uri=str(tmp_path / "cache" / "vae"))
    manifest = read_manifest(folder_vae)
    assert manifest is not None
    indexed = {
        key for keys in read_index(folder_vae, manifest).column("caption_keys").to_pylist() for key in keys
    }
    assert indexed == expected
    latents = LatentCache("hub", folder_vae)
    drawn = {
        latents.caption_key(sample.key, seed=11, step=step) for sample in latents.samples for step in range(8)
    }
    assert drawn <= expected
    text = TextCache(Location(uri=str(tmp_path / "cache" / "text")))
    assert len(text.conditioning(sorted(expected))) == 4
    example_latents = LatentCache("dreambooth", Location(uri=str(tmp_path / "cache" / "vae-example")))
    assert {bucket for bucket in (sample.bucket for sample in example_latents.samples)} == {"32x32"}
    outcome = train(tmp_path / "run", data, workers=1, **config)
    assert outcome.steps == 2 and outcome.adapter.is_file()
    # The worker wrote the latents of the example images it trained on back into their cache ...
    written = {
        key
        for shard in (tmp_path / "cache" / "vae-example").rglob("part-ondemand-*.parquet")
        for key in pq.read_table(shard, columns=["key"]).column("key").to_pylist()
    }
    folder = Location(uri=str(tmp_path / "cache" / "vae-example"))
    manifest = read_manifest(folder)
    assert manifest is not None
    example_keys = set(read_index(folder, manifest).column("key").to_pylist())
    assert written and written <= example_keys
    # ... so a later build without vae_cache_ondemand encodes only the images training has not reached,
    # and nothing of the other dataset: its rows are known by the split's fingerprint.
    example.pop("vae_cache_ondemand")
    plain = run_cache(load_run(tmp_path / "run", data, **config), BuildOptions())
    assert [(d.images, d.encoded) for d in plain.datasets] == [(2, 0), (3, len(example_keys - written))]
    assert list((outcome.output_dir / "validation").rglob("validation-*.png"))


def test_simpletuners_omnigen_example_caches_and_trains_from_a_local_dataset(
    tmp_path: Path, tiny_omnigen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SimpleTuner's omnigen.lycoris-lokr example, its files as shipped, with its dataloader
    (multidatabackend-reference-512px.json): one step on the tiny OmniGen checkpoint.

    Only what a CPU test cannot afford is changed: one step instead of 100, and the closing
    validation render at 32 px in 2 steps instead of 1024 px in 30.
    """
    monkeypatch.chdir(tmp_path)
    config = lay_out_example(
        tmp_path,
        OMNIGEN_LOKR,
        model=tiny_omnigen_dir,
        max_train_steps=1,
        validation_resolution="32x32",
        validation_num_inference_steps=2,
    )
    run = load_config(config)
    outcome = run_training(run, resolve_settings(run, RayOverrides(num_workers=1)))
    assert outcome.steps == 1 and outcome.adapter.is_file()
    # Where the example says, below the working directory: its {model_family} placeholder filled.
    assert outcome.output_dir == tmp_path / "output/examples/omnigen.lycoris-lokr"
    report = json.loads((tmp_path / "cache/vae/omnigen/reference-512" / REPORT_NAME).read_text())
    assert report["source"].startswith("huggingface:") and not report["skipped"]
    assert sorted(p.name for p in (outcome.output_dir / "validation").rglob("*.png"))[-1].startswith(
        "validation-32x32"
    )
