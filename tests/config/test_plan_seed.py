"""A drawn-then-recorded seed gives a resumed run the same epoch plan."""

from __future__ import annotations

import json
from typing import Any

from raytuner.batches.plan import BatchShape, DatasetSampling, EpochPlan, PlanSample, plan_epoch
from raytuner.config import load_config, record_seed

SAMPLES = [
    PlanSample(dataset_id="images", key=f"images/{index}.png", bucket="1024x1024") for index in range(12)
]


def _plan(seed: int) -> EpochPlan:
    return plan_epoch(
        SAMPLES,
        [DatasetSampling(dataset_id="images")],
        BatchShape(per_worker=2, workers=2),
        seed=seed,
        epoch=0,
    )


def test_a_recorded_seed_gives_the_next_run_the_same_plan(write_run: Any) -> None:
    base = json.loads(write_run().read_text(encoding="utf-8"))
    config_path = write_run(config={key: value for key, value in base.items() if key != "seed"})
    first = load_config(config_path)
    assert first.seed_drawn and first.seed is not None
    record_seed(first)
    again = load_config(config_path)
    assert again.seed is not None
    assert _plan(again.seed) == _plan(first.seed)
    assert _plan(first.seed + 1).batches != _plan(first.seed).batches  # the seed does shape the plan
