"""The quickstarts' own multidatabackend.json files build as they are, with their datasets drawn here.

The files are copied byte for byte; their relative ``instance_data_dir`` and cache paths resolve
against the working directory, as in SimpleTuner, so the test draws images of the sizes each
dataset accepts into ``datasets/...`` below a temporary working directory. The OmniGen eval
example names absolute folders, which are pointed at test folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raytuner.batches.plan import BatchShape
from raytuner.batches.reader import open_training_data
from raytuner.cache.build import BuildOptions, run_cache
from tests.cache.helpers import draw_images, write_run_files

pytestmark = pytest.mark.usefixtures("ray_cluster")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LARGE = [(1024, 1024), (1280, 1024)]
MEDIUM = [(512, 512), (640, 512)]


@pytest.mark.parametrize(
    ("family", "seed_file", "folders", "expected"),
    [
        (
            "cosmos2image",
            "cosmos2image/multidatabackend.json",
            {"datasets/pseudo-camera-10k": LARGE, "datasets/dreambooth-subject": LARGE},
            {"pseudo-camera-10k-cosmos2": {"1024x1024"}, "dreambooth-subject": {"1024x1024", "1152x896"}},
        ),
        (
            "omnigen",
            "omnigen/multidatabackend.json",
            {"datasets/pseudo-camera-10k": MEDIUM, "datasets/dreambooth-subject": LARGE},
            {
                # The camera set is 512 px and square-cropped; the 1024 px subject images also feed
                # the 512 px subject set, which does not crop (so 1280 x 1024 keeps its aspect).
                "pseudo-camera-10k-omnigen": {"512x512"},
                "dreambooth-subject": {"1024x1024", "1152x896"},
                "dreambooth-subject-512": {"512x512", "576x448"},
            },
        ),
    ],
)
def test_a_quickstart_multidatabackend_builds_unchanged(
    family: str,
    seed_file: str,
    folders: dict[str, list[tuple[int, int]]],
    expected: dict[str, set[str]],
    tmp_path: Path,
    tiny_checkpoints: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for offset, (folder, sizes) in enumerate(folders.items()):
        draw_images(tmp_path / folder, sizes, start=10 * offset)
    shutil.copyfile(CONFIGS / seed_file, tmp_path / "multidatabackend.json")
    files = write_run_files(
        tmp_path, tiny_checkpoints[family], [], model_family=family, aspect_bucket_alignment=64
    )
    shutil.copyfile(CONFIGS / seed_file, tmp_path / "multidatabackend.json")  # write_run_files wrote [] there
    run = files.load()
    summary = run_cache(run, BuildOptions())
    built = {
        dataset.dataset_id: {bucket.bucket for bucket in dataset.buckets} for dataset in summary.datasets
    }
    assert built == expected
    assert all(dataset.skipped == 0 for dataset in summary.datasets)
    # The caches landed where the quickstart says, relative to the working directory.
    for dataset in run.enabled_datasets:
        folder = dataset.cache_dir_vae if dataset.needs_images else dataset.cache_dir
        assert folder is not None and (Path(folder) / "raytuner_cache.json").is_file()
        assert Path(folder).is_relative_to(tmp_path / "cache")

    data = open_training_data(run)
    plan = data.plan(BatchShape(per_worker=1), seed=run.seed, epoch=0)
    regularisation = {dataset.id for dataset in run.enabled_datasets if dataset.is_regularisation_data}
    assert all(batch.is_regularisation == (batch.dataset_id in regularisation) for batch in plan.batches)
    # "repeats": 1000 on the subject: its 2 images are seen 1001 times each per epoch.
    assert (
        sum(len(batch.keys) for batch in plan.batches if batch.dataset_id == "dreambooth-subject") == 2 * 1001
    )


def test_the_omnigen_eval_example_builds_with_its_folders_pointed_here(
    tmp_path: Path, tiny_omnigen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    datasets = json.loads((CONFIGS / "omnigen/multidatabackend-eval.json").read_text())
    folders = {
        "something-special-to-remember-by": [(1024, 1024), (1536, 1024)],
        "omnigen-eval": [(1024, 1024)],
    }
    for offset, dataset in enumerate(datasets):
        if dataset["id"] in folders:
            dataset["instance_data_dir"] = str(tmp_path / dataset["id"])
            draw_images(tmp_path / dataset["id"], folders[dataset["id"]], start=10 * offset)
    files = write_run_files(
        tmp_path, tiny_omnigen_dir, datasets, model_family="omnigen", aspect_bucket_alignment=64
    )
    summary = run_cache(files.load(), BuildOptions())
    built = {
        dataset.dataset_id: (dataset.images, {b.bucket for b in dataset.buckets})
        for dataset in summary.datasets
    }
    # Square crops at 1024 px; the 1536 x 1024 image is first downsampled (target_downsample_size).
    assert built == {
        "something-special-to-remember-by": (2, {"1024x1024"}),
        "omnigen-eval": (1, {"1024x1024"}),
    }
    # The eval set is cached but never drawn for training.
    assert set(open_training_data(files.load()).latents) == {"something-special-to-remember-by"}
