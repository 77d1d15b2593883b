"""caption_dropout_probability as SimpleTuner's collate applies it: in every batch, regularisation too.

The caches are committed without Ray or encoders (``tests/cache/helpers.py``): choosing a batch's
captions reads only the indexes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from raytuner.batches.plan import BatchShape
from raytuner.batches.reader import caption_dropped, open_training_data
from raytuner.config import RunConfig
from tests.cache.helpers import (
    commit_without_encoding,
    discover_without_ray,
    draw_images,
    image_dataset,
    text_dataset,
    write_run_files,
)


def _run(root: Path, **config: object) -> RunConfig:
    """A subject dataset and a regularisation dataset of two images each; no model is ever loaded."""
    draw_images(root / "subject", [(64, 64)] * 2)
    draw_images(root / "regularisation", [(64, 64)] * 2, start=5)
    datasets = [
        image_dataset(root / "subject", root / "cache" / "subject", id="subject"),
        image_dataset(
            root / "regularisation",
            root / "cache" / "regularisation",
            id="regularisation",
            is_regularisation_data=True,
        ),
        text_dataset(root / "cache" / "text"),
    ]
    run = write_run_files(root, root / "model-never-loaded", datasets, **config).load()
    commit_without_encoding(run, discover_without_ray(run))
    return run


def test_caption_dropout_applies_to_regularisation_batches_too(tmp_path: Path) -> None:
    run = _run(tmp_path, caption_dropout_probability=1.0)
    data = open_training_data(run)
    plan = data.plan(BatchShape(per_worker=2), seed=run.seed, epoch=0)
    assert sorted(batch.is_regularisation for batch in plan.batches) == [False, True]
    empty = data.text.role_key("empty")
    for batch in plan.batches:
        assert data.caption_keys(batch, batch.keys, seed=run.seed, step=0) == [empty, empty]

    # At any other probability a regularisation sample is dropped by the same (seed, key, step)
    # draw as every other sample, so every rank and every resume agree.
    (regularisation,) = [batch for batch in plan.batches if batch.is_regularisation]
    half = replace(data, caption_dropout=0.5)
    draws = []
    for step in range(20):
        captions = half.caption_keys(regularisation, regularisation.keys, seed=run.seed, step=step)
        expected = [caption_dropped(run.seed, key, step, 0.5) for key in regularisation.keys]
        assert [caption == empty for caption in captions] == expected
        draws.extend(expected)
    assert any(draws) and not all(draws)


def test_without_caption_dropout_every_sample_keeps_its_caption(tmp_path: Path) -> None:
    run = _run(tmp_path, caption_dropout_probability=0.0)
    data = open_training_data(run)
    empty = data.text.role_key("empty")
    for batch in data.plan(BatchShape(per_worker=2), seed=run.seed, epoch=0).batches:
        for step in range(10):
            assert empty not in data.caption_keys(batch, batch.keys, seed=run.seed, step=step)
