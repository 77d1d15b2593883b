"""The ``raytuner generate`` command: settings checked, requests listed, images rendered, index written."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from raytuner.generate.index import GenerationIndex
from raytuner.generate.prompts import (
    ImageRequest,
    read_prompt_file,
    single_prompt,
)
from raytuner.generate.settings import GenerateError, GenerationSettings, resolve_settings
from raytuner.models.registry import get_family

logger = logging.getLogger(__name__)

GRID_NAME = "grid.png"
_GRID_LIMIT = 64


@dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    """The command line of ``raytuner generate``."""

    model: str
    family: str | None = None
    revision: str | None = None
    adapter: str | None = None
    scale: float = 1.0
    prompt: str | None = None
    prompts: str | None = None
    negative_prompt: str | None = None
    guidance: float | None = None
    steps: int | None = None
    resolution: str | None = None
    seed: int = 0
    num_images: int = 1
    out: str = "generated"
    dtype: str = "auto"
    no_safety_checker: bool = False
    clip_model: str | None = None
    actors: int | None = None


@dataclass(frozen=True, kw_only=True)
class GenerateOutcome:
    out_dir: Path
    index: Path
    rendered: int
    skipped: int
    refused: int
    clip_score_mean: float | None
    grid: Path | None


def run_generate(options: GenerateOptions) -> GenerateOutcome:
    """Check everything, then render what the output folder does not hold yet."""
    if (options.prompt is None) == (options.prompts is None):
        raise GenerateError("give one of --prompt TEXT or --prompts FILE (.txt or .json)")
    if options.num_images < 1:
        raise GenerateError(f"--num-images {options.num_images}: expected at least 1")
    if options.actors is not None and options.actors < 1:
        raise GenerateError(f"--actors {options.actors}: expected at least 1")
    settings = _settings(options)
    multiple = get_family(settings.family).pixels_per_token
    if options.prompt is not None:
        requests = single_prompt(
            options.prompt,
            negative_prompt=None,
            seed=options.seed,
            num_images=options.num_images,
        )
    else:
        requests = read_prompt_file(
            Path(options.prompts or ""),
            seed=options.seed,
            num_images=options.num_images,
            multiple=multiple,
        )
    out_dir = Path(options.out)
    _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = GenerationIndex(out_dir, settings)
    pending = index.pending(requests)
    skipped = len(requests) - len(pending)
    if skipped:
        logger.info("%d of %d image(s) are already in %s: skipped", skipped, len(requests), out_dir)
    _log_screening(settings)
    rendered = 0
    try:
        if pending and options.prompts is None:
            rendered = _render_here(settings, pending, index)
        elif pending:
            from raytuner.generate.batch import render_on_ray
            from raytuner.ray_runtime import ray_session

            with ray_session():
                rendered = render_on_ray(settings, pending, index, actors=options.actors)
    finally:
        index_path = index.save(order=requests)
    entries = [index.entries[r.file_name] for r in requests if r.file_name in index.entries]
    scores = [e["clip_score"] for e in entries if e.get("clip_score") is not None]
    return GenerateOutcome(
        out_dir=out_dir,
        index=index_path,
        rendered=rendered,
        skipped=skipped,
        refused=sum(1 for e in entries if e.get("refused")),
        clip_score_mean=sum(scores) / len(scores) if scores else None,
        grid=_write_grid(out_dir, requests, index) if len(requests) > 1 else None,
    )


def _settings(options: GenerateOptions) -> GenerationSettings:
    return resolve_settings(
        model=options.model,
        family=options.family,
        revision=options.revision,
        adapter=options.adapter,
        adapter_scale=options.scale,
        negative_prompt=options.negative_prompt,
        guidance=options.guidance,
        steps=options.steps,
        resolution=options.resolution,
        dtype=options.dtype,
        no_safety_checker=options.no_safety_checker,
        clip_model=options.clip_model,
    )


def _check_out_dir(out_dir: Path) -> None:
    from raytuner.train.layout import on_cluster

    if out_dir.exists() and not out_dir.is_dir():
        raise GenerateError(f"--out {out_dir} is a file, not a folder")
    if on_cluster() and not out_dir.is_absolute():
        raise GenerateError(
            f"--out {out_dir}: on a cluster the job's working directory is a temporary copy on the head node; "
            "give an absolute folder that outlives the job (a mounted shared folder)"
        )


def _log_screening(settings: GenerationSettings) -> None:
    if settings.screening.screened:
        logger.info("prompts and images are screened by %s", settings.screening.checker)
    else:
        family = get_family(settings.family)
        if family.screens_images:
            logger.warning(
                "%s images are NOT screened by a safety checker (%s)",
                family.display_name,
                settings.screening.note,
            )


def _render_here(settings: GenerationSettings, requests: list[ImageRequest], index: GenerationIndex) -> int:
    from raytuner.generate.render import ImageRenderer

    renderer = ImageRenderer(settings)
    for request in requests:
        index.add(renderer.render(request))
    return len(requests)


def _write_grid(out_dir: Path, requests: list[ImageRequest], index: GenerationIndex) -> Path | None:
    """A contact sheet of the run's first images, ``grid.png``, for a look at the whole batch."""
    from PIL import Image

    from raytuner.evaluate.plots import save_image_grid

    images = []
    for request in requests[:_GRID_LIMIT]:
        path = out_dir / request.file_name
        entry = index.entries.get(request.file_name)
        if entry and not entry.get("refused") and path.is_file():
            images.append((f"{request.name} s{request.seed}", Image.open(path).convert("RGB")))
    return save_image_grid(images, out_dir / GRID_NAME) if images else None


def generate_main(options: GenerateOptions) -> int:
    """``raytuner generate``: exit 0 with the images and index written, 130 when interrupted (it
    resumes). What stops it is raised as a RaytunerError, which the command line prints (raytuner/cli.py).
    """
    try:
        outcome = run_generate(options)
    except KeyboardInterrupt:
        print("interrupted: the images written so far are in the index; run again to resume", file=sys.stderr)
        return 130
    print()
    print(
        f"images:      {outcome.rendered} rendered, {outcome.skipped} already there, {outcome.refused} refused"
    )
    print(f"folder:      {outcome.out_dir}")
    print(f"index:       {outcome.index}")
    if outcome.grid is not None:
        print(f"grid:        {outcome.grid}")
    if outcome.clip_score_mean is not None:
        print(f"CLIP score:  {outcome.clip_score_mean:.2f} (mean)")
    return 0
