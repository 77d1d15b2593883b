"""The end-to-end training runs' data (tiny Cosmos2 images, optional loss masks, held-out images),
their shared config, and what the tests read back from a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from raytuner.config import RunConfig
from raytuner.evaluate.metrics import read_metrics
from raytuner.train.callbacks import TrainCallback
from raytuner.train.launcher import TrainOutcome, run_training
from raytuner.train.settings import RayOverrides, resolve_settings
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files


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


STEPS = 6
SECRET = "hf_raytuner_test_secret_value"
# Different float summation orders (two gradient all-reduce halves vs. one accumulated sum) after
# six AdamW steps: agreement well inside this, while one different step moves weights by ~1e-2.
ADAPTER_TOLERANCE = 2e-4


BASE: dict[str, Any] = {
    "train_batch_size": 2,
    "learning_rate": 3e-2,
    "optimizer": "torch-adamw",
    "lr_scheduler": "constant",
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "caption_dropout_probability": 0.3,
    "max_train_steps": STEPS,
    "checkpoint_step_interval": 2,
    "checkpoints_total_limit": 2,
    "validation_step_interval": 3,
    "validation_resolution": "32x32",
    "validation_num_inference_steps": 2,
    "validation_guidance": 2.0,
    "eval_timesteps": 4,
    "eval_steps_interval": 4,
    "use_ema": True,
    "ema_decay": 0.9,
    "report_to": "tensorboard",
    "hf_token": SECRET,
}


def load_run(root: Path, data: Data, **config: Any) -> RunConfig:
    return write_run_files(root, data.model, data.datasets, **{**BASE, **config}).load()


def train(
    root: Path,
    data: Data,
    *,
    workers: int,
    max_failures: int = 0,
    callbacks: tuple[TrainCallback, ...] = (),
    **config: Any,
) -> TrainOutcome:
    run = load_run(root, data, **config)
    settings = resolve_settings(run, RayOverrides(num_workers=workers, max_failures=max_failures))
    return run_training(run, settings, callbacks=callbacks)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_adapter(a: Path, b: Path, tolerance: float = ADAPTER_TOLERANCE) -> None:
    first, second = adapter_tensors(a), adapter_tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=tolerance, rtol=tolerance, msg=key)


def train_lines(output_dir: Path) -> list[dict[str, Any]]:
    return [
        e for e in read_metrics(output_dir / "logs" / "metrics.jsonl") if e.get("kind", "train") == "train"
    ]


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in (output_dir / "ray").glob("*/checkpoint-*"))
