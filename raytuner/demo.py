"""The offline demo: tiny checkpoints, synthetic images, the Parquet cache, Ray Train, an adapter.

Everything runs on CPU without a network: for each family it builds a tiny random-weight
checkpoint of the real diffusers architecture, draws a captioned synthetic dataset of shapes and
colours with a held-out evaluation set, and then runs exactly what ``raytuner train`` runs on
``configs/demo/<family>/config.json``: Ray Data encodes the cache, a 2-worker Ray Train
``TorchTrainer`` trains the LoKr adapter with DDP on gloo, validates from the cached prompts,
measures the stable eval loss at the start and the end, checkpoints, and writes the adapter, its
EMA twin, the model card, the loss curve and the validation grid. Then ``raytuner generate`` renders
the validation prompt with the adapter merged in, as a user would after training.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from raytuner.cache.settings import image_datasets
from raytuner.config import RunConfig, load_config
from raytuner.config.datasets import DatasetConfig
from raytuner.config.training import replace_options
from raytuner.data.synthetic import synthetic_images, write_dataset
from raytuner.errors import RaytunerError
from raytuner.evaluate.metrics import read_metrics
from raytuner.models.registry import known_families
from raytuner.models.safety import is_tiny_checkpoint
from raytuner.models.tiny import build_tiny_checkpoint
from raytuner.ray_runtime import ray_session
from raytuner.train.launcher import TrainOutcome, run_training
from raytuner.train.settings import RayOverrides, resolve_settings

logger = logging.getLogger(__name__)

DEMO_CONFIGS = Path("configs/demo")
DEMO_IMAGES = 8
DEMO_EVAL_IMAGES = 4


class DemoError(RaytunerError, RuntimeError):
    """A one-line reason the demo cannot run."""


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    family: str
    outcome: TrainOutcome
    first_loss: float
    last_loss: float
    first_eval_loss: float | None
    generated: Path | None


def _prepare_inputs(run: RunConfig) -> None:
    """Build the tiny checkpoint and draw the datasets the demo config points at, when missing.

    Training and held-out images come from one seeded draw of distinct shape/colour combinations,
    so the evaluation images are never training images.
    """
    model_path = Path(run.training.model.pretrained_model_name_or_path or "")
    if not is_tiny_checkpoint(model_path):
        build_tiny_checkpoint(run.training.model.model_family, model_path)
    datasets: list[DatasetConfig] = image_datasets(run)
    size = int(datasets[0].resolution or 64)
    items = synthetic_images(DEMO_IMAGES + DEMO_EVAL_IMAGES, width=size, height=size, seed=run.seed)
    for dataset in datasets:
        folder = dataset.instance_data_dir
        assert folder is not None
        if folder.is_dir() and any(folder.glob("*.png")):
            continue
        chosen = items[DEMO_IMAGES:] if dataset.dataset_type == "eval" else items[:DEMO_IMAGES]
        write_dataset(folder, chosen)


def run_family_demo(config_path: Path, steps: int | None = None) -> DemoResult:
    run = load_config(config_path)
    if steps is not None:
        run = dataclasses.replace(run, training=replace_options(run.training, {"max_train_steps": steps}))
    _prepare_inputs(run)
    outcome = run_training(run, resolve_settings(run, RayOverrides()))
    entries = read_metrics(outcome.output_dir / "logs" / "metrics.jsonl")
    losses = [e["loss"] for e in entries if e.get("kind", "train") == "train"]
    evals = [e["eval_loss"] for e in entries if e.get("kind") == "eval"]
    generated = _generate_with_adapter(run, outcome)
    return DemoResult(
        family=run.training.model.model_family,
        outcome=outcome,
        first_loss=losses[0],
        last_loss=losses[-1],
        first_eval_loss=evals[0] if evals else None,
        generated=generated,
    )


def _generate_with_adapter(run: RunConfig, outcome: TrainOutcome) -> Path | None:
    """The validation prompt rendered by ``raytuner generate`` from the base model and the new adapter."""
    from raytuner.generate.command import GenerateOptions, run_generate

    training = run.training
    result = run_generate(
        GenerateOptions(
            model=str(training.model.pretrained_model_name_or_path),
            adapter=str(outcome.adapter),
            prompt=training.validation.validation_prompt or "a photo",
            negative_prompt=training.validation.validation_negative_prompt,
            guidance=training.validation.validation_guidance,
            steps=training.validation.validation_num_inference_steps,
            resolution=training.validation.validation_resolution,
            seed=training.validation.validation_seed or 0,
            num_images=2,
            out=str(outcome.output_dir / "generated"),
        )
    )
    return result.grid


def _summary_table(results: list[DemoResult]) -> str:
    header = (
        "family",
        "steps",
        "first loss",
        "last loss",
        "eval loss (start -> end)",
        "adapter",
        "validation",
        "generated",
    )
    rows = []
    for r in results:
        evaluation = (
            f"{r.first_eval_loss:.4f} -> {r.outcome.eval_loss:.4f}"
            if r.first_eval_loss is not None and r.outcome.eval_loss is not None
            else "-"
        )
        rows.append(
            (
                r.family,
                str(r.outcome.steps),
                f"{r.first_loss:.4f}",
                f"{r.last_loss:.4f}",
                evaluation,
                str(r.outcome.adapter),
                str(r.outcome.output_dir / "validation" / "grid.png"),
                str(r.generated or "-"),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def demo_main(
    *, configs: str = str(DEMO_CONFIGS), steps: int | None = None, families: list[str] | None = None
) -> int:
    configs_dir = Path(configs)
    chosen = families or known_families()
    results = []
    config_paths = [configs_dir / family_name / "config.json" for family_name in chosen]
    for config_path in config_paths:
        if not config_path.is_file():
            raise DemoError(
                f"demo config {config_path} not found: run from the repository root or pass --configs DIR"
            )
    # One local Ray for every family (with its dashboard on 127.0.0.1, as raytuner train starts it).
    with ray_session(dashboard=True):
        for config_path in config_paths:
            results.append(run_family_demo(config_path, steps))
    print()
    print(_summary_table(results))
    return 0
