"""The offline demo: tiny checkpoints, synthetic images, LoKr training, an adapter and validation images.

Everything runs on CPU without a network: for each family it builds a tiny random-weight
checkpoint of the real diffusers architecture, draws a captioned synthetic dataset, loads the
family's demo ``config.json`` exactly as a user's file is loaded, builds the Parquet latent and
text cache with Ray Data on a local Ray, trains a LoKr adapter with flow matching on the seeded
epoch plan read back from that cache, saves ``pytorch_lora_weights.safetensors`` and renders the
validation prompt with the base model and with the adapter loaded by the seeds' recipe.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from raytuner.adapters import AdapterError, build_adapter, load_adapter, save_adapter
from raytuner.cache.build import BuildOptions
from raytuner.cache.command import EXPECTED_ERRORS, run_cache
from raytuner.config import DatasetConfig, RunConfig, load_config
from raytuner.config.check import quiet_config_logging
from raytuner.data.plan import BatchShape, GlobalBatch, sample_generators
from raytuner.data.reader import TrainingData, open_training_data
from raytuner.data.synthetic import synthetic_images, write_dataset
from raytuner.models.base import ModelFamily
from raytuner.models.registry import get_family
from raytuner.models.safety import is_tiny_checkpoint
from raytuner.models.tiny import build_tiny_checkpoint
from raytuner.ray_runtime import ray_session
from raytuner.train.optim import OptimizerError, build_lr_scheduler, build_optimizer, optimizer_settings
from raytuner.train.schedule import flow_schedule_from_config
from raytuner.train.step import train_step

logger = logging.getLogger(__name__)

DEMO_CONFIGS = Path("configs/demo")
DEMO_FAMILIES = ("cosmos2image", "omnigen")
DEMO_IMAGES = 8


class DemoError(RuntimeError):
    """A one-line reason the demo cannot run."""


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    family: str
    images: int
    encoded: int
    steps: int
    first_loss: float
    last_loss: float
    adapter: Path
    validation_image: Path
    loss_plot: Path


def _validation_size(value: str) -> tuple[int, int]:
    """The first ``WxH`` (or square ``N``) of SimpleTuner's ``validation_resolution``."""
    first = value.split(",")[0].strip().lower()
    width, _, height = first.partition("x")
    return int(width), int(height or width)


def _prepare_inputs(run: RunConfig, dataset: DatasetConfig) -> None:
    """Build the tiny checkpoint and draw the dataset the demo config points at, when missing."""
    model_path = Path(run.training.pretrained_model_name_or_path or "")
    if not is_tiny_checkpoint(model_path):
        build_tiny_checkpoint(run.training.model_family, model_path)
    folder = dataset.instance_data_dir
    assert folder is not None
    if not folder.is_dir() or not any(folder.glob("*.png")):
        size = int(dataset.resolution or 64)
        write_dataset(folder, synthetic_images(DEMO_IMAGES, width=size, height=size, seed=run.seed))


def _save_loss_plot(losses: list[float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3))
    axes.plot(range(1, len(losses) + 1), losses, marker=".")
    axes.set(xlabel="step", ylabel="flow-matching loss", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _side_by_side(images: list[Image.Image], labels: list[str], path: Path) -> Path:
    from PIL import ImageDraw

    width, height = images[0].size
    canvas = Image.new("RGB", (width * len(images), height + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        canvas.paste(image, (index * width, 14))
        draw.text((index * width + 2, 1), label, fill="black")
    canvas.save(path)
    return path


def _generate(family: ModelFamily, run: RunConfig, pipeline: object) -> Image.Image:
    width, height = _validation_size(run.training.validation_resolution)
    return pipeline(  # type: ignore[operator]
        prompt=run.training.validation_prompt,
        height=height,
        width=width,
        num_inference_steps=run.training.validation_num_inference_steps,
        guidance_scale=run.training.validation_guidance,
        generator=torch.Generator().manual_seed(run.training.validation_seed or run.seed),
    ).images[0]


def _load_demo_config(config_path: Path) -> RunConfig:
    """Load a demo config, summing up rather than listing the keys raytuner's training lacks yet.

    The demo's own single-process loop reads max_train_steps, train_batch_size, resolution and the
    validation keys, which the compatibility table still lists as not yet supported by training.
    """
    with quiet_config_logging():
        run = load_config(config_path)
    unsupported = [warning for warning in run.warnings if ": accepted, not yet supported: " in warning]
    for warning in run.warnings:
        if warning not in unsupported:
            logger.warning(warning)
    if unsupported:
        logger.info(
            "%s: %d key(s) are not yet supported by raytuner's training; the demo's own loop reads "
            "max_train_steps, train_batch_size, resolution and the validation keys "
            "(`raytuner check-config --config %s` lists them all)",
            config_path,
            len(unsupported),
            config_path,
        )
    return run


def run_family_demo(config_path: Path, steps: int | None = None) -> DemoResult:
    run = _load_demo_config(config_path)
    family_name = run.training.model_family
    # Refuse an optimiser raytuner cannot run before building or drawing anything.
    try:
        optimizer_settings(run.training)
    except OptimizerError as error:
        raise DemoError(f"{config_path}: {error}") from error
    dataset = next(d for d in run.enabled_datasets if d.needs_images)
    _prepare_inputs(run, dataset)

    family = get_family(family_name)(run.training.pretrained_model_name_or_path or "")
    output_dir = run.training.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = run.to_dict()
    (output_dir / "raytuner_config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")

    # The cache step: Ray Data encodes the images and captions into Parquet (only what is new).
    cache = run_cache(run, BuildOptions())
    logger.info("%s cache:\n%s", family_name, cache.table())
    data = open_training_data(run)

    transformer = family.load_transformer()
    assert run.lycoris is not None
    network, report = build_adapter(
        transformer, run.lycoris, module_aliases=family.module_aliases, seed=run.seed
    )
    parameters = [p for p in network.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, run.training)
    schedule = flow_schedule_from_config(run.training)
    total_steps = steps if steps is not None else (run.training.max_train_steps or 30)
    lr_scheduler = build_lr_scheduler(optimizer, run.training, total_steps=total_steps)
    # One process and one optimizer step per batch: the global batch is train_batch_size
    # (gradient accumulation comes with raytuner train).
    shape = BatchShape(per_worker=run.training.train_batch_size)

    losses: list[float] = []
    progress = tqdm(total=total_steps, desc=f"{family_name} LoKr", unit="step")
    for step, batch in enumerate(_global_batches(data, shape, run)):
        if step == total_steps:
            break
        keys = batch.slice_for(shape, rank=0)
        latents, conditioning = data.batch(batch, keys, seed=run.seed, step=step)
        seeds = batch.seeds_for(shape, rank=0, seed=run.seed, step=step)
        result = train_step(
            family,
            transformer,
            parameters,
            optimizer,
            latents,
            family.collate_conditioning(conditioning),
            schedule,
            generator=sample_generators(seeds),
            max_grad_norm=run.training.max_grad_norm,
            grad_clip_method=run.training.grad_clip_method,
        )
        lr_scheduler.step()
        losses.append(result.loss)
        progress.update()
        progress.set_postfix(loss=f"{result.loss:.4f}")
    progress.close()

    adapter = save_adapter(
        network,
        output_dir,
        metadata={"raytuner_family": family_name, "lycoris_config": resolved["lycoris"]},
    )
    loss_plot = _save_loss_plot(losses, output_dir / "loss.png", f"{family_name}: LoKr on synthetic shapes")

    # Tiny random-weight models have nothing to screen; validation runs unscreened, logged once.
    pipeline = family.build_pipeline(**family.pipeline_components(allow_unscreened=True))
    base_image = _generate(family, run, pipeline)
    load_adapter(adapter, pipeline.transformer, scale=1.0, merge=True)
    adapted_image = _generate(family, run, pipeline)
    validation_dir = output_dir / "validation"
    validation_dir.mkdir(exist_ok=True)
    validation_image = _side_by_side(
        [base_image, adapted_image], ["base", "LoKr"], validation_dir / f"step{total_steps:05d}.png"
    )
    logger.info("%s: %s", family_name, report.summary())
    return DemoResult(
        family=family_name,
        images=cache.datasets[0].images,
        encoded=cache.encoded,
        steps=total_steps,
        first_loss=losses[0],
        last_loss=losses[-1],
        adapter=adapter,
        validation_image=validation_image,
        loss_plot=loss_plot,
    )


def _global_batches(data: TrainingData, shape: BatchShape, run: RunConfig) -> Iterator[GlobalBatch]:
    """The seeded epoch plans, one epoch after another."""
    for epoch in itertools.count():
        yield from data.plan(shape, seed=run.seed, epoch=epoch).batches


def _summary_table(results: list[DemoResult]) -> str:
    header = (
        "family",
        "cached images",
        "encoded now",
        "steps",
        "first loss",
        "last loss",
        "adapter",
        "validation",
    )
    rows = [
        (
            r.family,
            str(r.images),
            str(r.encoded),
            str(r.steps),
            f"{r.first_loss:.4f}",
            f"{r.last_loss:.4f}",
            str(r.adapter),
            str(r.validation_image),
        )
        for r in results
    ]
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
    chosen = families or list(DEMO_FAMILIES)
    results = []
    try:
        config_paths = [configs_dir / family_name / "config.json" for family_name in chosen]
        for config_path in config_paths:
            if not config_path.is_file():
                raise DemoError(
                    f"demo config {config_path} not found: run from the repository root or pass --configs DIR"
                )
        with ray_session():
            for config_path in config_paths:
                results.append(run_family_demo(config_path, steps))
    except (DemoError, OptimizerError, AdapterError, *EXPECTED_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print(_summary_table(results))
    return 0
