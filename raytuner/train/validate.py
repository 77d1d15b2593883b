"""Evaluation and validation inside the training loop.

:class:`Evaluation`: the flow-matching loss on the held-out ``eval`` datasets at fixed noise
levels, each worker on its share and summed, or under ZeRO-3 every worker on every sample in
lockstep (each forward of the base gathers its layers from all of them).

:class:`Validator`: rank 0 renders through the family's pipeline around the adapted transformer,
with the trained weights and, with ``use_ema``, with the EMA weights. The pipeline is built once
per run (its VAE stays loaded) and reused at every validation step; prompts and the negative
prompt come from the text cache, so no text encoder is ever loaded. With ``evaluation_type:
"clip"`` the CLIP model is loaded once too, and every round's images are scored against their
prompts (SimpleTuner's CLIP score tracking).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from PIL import Image

from raytuner.batches.reader import TrainingData, eval_caches
from raytuner.config import RunConfig
from raytuner.evaluate.clip_score import CLIP_EVALUATION, ClipScorer
from raytuner.evaluate.eval_loss import EvalSample, eval_samples, evaluation_loss
from raytuner.evaluate.validation import (
    ValidationImage,
    ValidationPrompt,
    ValidationSettings,
    render_validation,
    validation_prompts,
    validation_settings,
)
from raytuner.train.ema import AdapterEMA
from raytuner.train.model import AdaptedModel
from raytuner.train.strategy import TrainingStrategy

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


class Evaluation:
    """The evaluation loss of the held-out set, the same samples and noise levels every time."""

    def __init__(
        self, run: RunConfig, data: TrainingData, model: AdaptedModel, strategy: TrainingStrategy
    ) -> None:
        self.training = run.training
        self.text = data.text
        self.model = model
        self.strategy = strategy
        self.caches = eval_caches(run)
        self.samples: list[EvalSample] = (
            eval_samples(self.caches, self.training.validation.num_eval_images) if self.caches else []
        )

    def __bool__(self) -> bool:
        return bool(self.samples)

    def loss(self) -> float | None:
        if not self.samples:
            return None
        everyone = self.strategy.collective  # every worker evaluates the whole set in lockstep
        return evaluation_loss(
            self.model.family,
            self.model.transformer,
            self.samples,
            self.caches,
            self.text,
            timesteps=self.training.validation.eval_timesteps,
            batch_size=self.training.optimization.train_batch_size,
            rank=0 if everyone else self.strategy.rank,
            world_size=1 if everyone else self.strategy.world_size,
            mixed_precision=self.training.model.mixed_precision,
            reduce_sum=self.strategy.eval_reduce,
        )


class Validator:
    """Rank 0's validation: settings, prompts, pipeline and CLIP model kept between steps.

    Under ZeRO-3 every worker renders the same images in lockstep, since each layer of the base
    is gathered from all of them; only rank 0 keeps what it renders.
    """

    def __init__(
        self,
        run: RunConfig,
        data: TrainingData,
        model: AdaptedModel,
        strategy: TrainingStrategy,
        ema: AdapterEMA | None,
        *,
        texts: Mapping[str, str],
        device: torch.device,
    ) -> None:
        self.run = run
        self.text = data.text
        self.model = model
        self.strategy = strategy
        self.ema = ema
        self.texts = dict(texts)
        self.device = device
        self._ready = False

    def _prepare(self) -> None:
        """Prompts, settings, pipeline and CLIP model, on the first round only."""
        self.prompts: list[ValidationPrompt] = validation_prompts(self.run, self.text, texts=self.texts)
        self.settings: ValidationSettings = validation_settings(self.run, self.text, self.model.family)
        self.pipeline: Any = self.model.family.build_validation_pipeline(self.model.transformer)
        self.clip: ClipScorer | None = None
        # Only rank 0 keeps its images (under ZeRO-3 the others render in lockstep and discard theirs).
        training = self.run.training
        if training.validation.evaluation_type == CLIP_EVALUATION and self.strategy.rank == 0:
            self.clip = ClipScorer(
                training.validation.pretrained_evaluation_model_name_or_path, device=self.device
            )
        self._ready = True

    def round(self, step: int) -> ValidationRound | None:
        """Rank 0's round into ``output_dir/validation/step_N``; None on every other worker."""
        rank = self.strategy.rank
        if not self.texts or (rank != 0 and not self.strategy.collective):
            return None
        if not self._ready:
            self._prepare()
        if rank != 0:
            with tempfile.TemporaryDirectory(prefix="raytuner-validation-") as scratch:
                self.render(Path(scratch))
            return None
        return self.render(self.run.training.output_dir / "validation" / f"step_{step}")

    def render(self, folder: Path) -> ValidationRound:
        """Render into ``folder``, then score the images."""
        family, transformer, network = self.model.family, self.model.transformer, self.model.network
        images = render_validation(
            family,
            transformer,
            self.prompts,
            self.settings,
            out_dir=folder,
            adapter=network,
            pipeline=self.pipeline,
        )
        if self.ema is not None:
            with self.ema.swapped_in():
                images += render_validation(
                    family,
                    transformer,
                    self.prompts,
                    self.settings,
                    out_dir=folder,
                    label=EMA_LABEL,
                    adapter=network,
                    pipeline=self.pipeline,
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
