"""Validation inside the training loop: rank 0 renders through the family's pipeline around the
adapted transformer, with the trained weights and, with ``use_ema``, with the EMA weights.

The pipeline is built once per run (its VAE stays loaded) and reused at every validation step;
prompts and the negative prompt come from the text cache, so no text encoder is ever loaded.
With ``evaluation_type: "clip"`` the CLIP model is loaded once too, and every round's images are
scored against their prompts (SimpleTuner's CLIP score tracking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

from PIL import Image

from raytuner.evaluate.clip_score import CLIP_EVALUATION, ClipScorer
from raytuner.evaluate.validation import (
    ValidationImage,
    ValidationPrompt,
    ValidationSettings,
    render_validation,
    validation_prompts,
    validation_settings,
)

if TYPE_CHECKING:
    from raytuner.train.loop import Worker

EMA_LABEL = "ema"
CLIP_SCORE_KEY = "clip_score"
# The EMA weights' images get their own keys: averaging them with the trained weights' images
# would hide the difference between the two.
CLIP_SCORE_EMA_KEY = "clip_score_ema"


@dataclass(frozen=True, kw_only=True)
class ValidationRound:
    """What one validation round produced, for the metrics sinks."""

    images: list[tuple[str, Image.Image]]  # (file stem, image), for TensorBoard and W&B
    captions: dict[str, str] = field(default_factory=dict)  # file stem -> its prompt
    metrics: dict[str, float] = field(default_factory=dict)  # CLIP scores; empty when evaluation is off


class Validator:
    """Rank 0's validation: settings, prompts, pipeline and CLIP model kept between steps."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        run, text = worker.run, worker.data.text
        self.prompts: list[ValidationPrompt] = validation_prompts(
            run, text, texts=worker.job.validation_prompts
        )
        self.settings: ValidationSettings = validation_settings(run, text, worker.family)
        self._pipeline: Any = None
        self.clip: ClipScorer | None = None
        # Only rank 0 keeps its images (under ZeRO-3 the others render in lockstep and discard theirs).
        if worker.training.evaluation_type == CLIP_EVALUATION and worker.rank == 0:
            self.clip = ClipScorer(
                worker.training.pretrained_evaluation_model_name_or_path, device=worker.device
            )

    def render(self, folder: Path | None = None) -> ValidationRound:
        """Render into ``folder`` (default ``output_dir/validation/step_N``), then score the images."""
        worker = self.worker
        if self._pipeline is None:
            self._pipeline = worker.family.build_validation_pipeline(worker.transformer)
        folder = folder or worker.training.output_dir / "validation" / f"step_{worker.step}"
        images = render_validation(
            worker.family,
            worker.transformer,
            self.prompts,
            self.settings,
            out_dir=folder,
            adapter=worker.network,
            pipeline=self._pipeline,
        )
        if worker.ema is not None:
            with worker.ema.swapped_in():
                images += render_validation(
                    worker.family,
                    worker.transformer,
                    self.prompts,
                    self.settings,
                    out_dir=folder,
                    label=EMA_LABEL,
                    adapter=worker.network,
                    pipeline=self._pipeline,
                )
        return ValidationRound(
            images=[(image.path.stem, image.image) for image in images],
            captions={image.path.stem: image.prompt for image in images},
            metrics=clip_score_metrics(self.clip, images) if self.clip is not None else {},
        )


def clip_score_metrics(scorer: ClipScorer, images: Sequence[ValidationImage]) -> dict[str, float]:
    """``clip_score`` (the mean over a round's images) and ``clip_score/<nickname>`` (the mean over
    that prompt's resolutions); the EMA weights' images as ``clip_score_ema`` and
    ``clip_score_ema/<nickname>``.

    Images of an empty prompt (the ``unconditional`` one) are left out: there is no text to match
    them against. All images are scored in one call, so the CLIP model runs once per round.
    """
    scored = [image for image in images if image.prompt.strip()]
    if not scored:
        return {}
    values = scorer.score([image.image for image in scored], [image.prompt for image in scored])
    metrics: dict[str, float] = {}
    for label, key in (("", CLIP_SCORE_KEY), (EMA_LABEL, CLIP_SCORE_EMA_KEY)):
        by_nickname: dict[str, list[float]] = {}
        for image, value in zip(scored, values, strict=True):
            if image.label == label:
                by_nickname.setdefault(image.nickname, []).append(value)
        if not by_nickname:
            continue
        metrics[key] = fmean(value for group in by_nickname.values() for value in group)
        metrics.update({f"{key}/{nickname}": fmean(group) for nickname, group in by_nickname.items()})
    return metrics
