"""Validation inside the training loop: rank 0 renders through the family's pipeline around the
adapted transformer, with the trained weights and, with ``use_ema``, with the EMA weights.

The pipeline is built once per run (its VAE stays loaded) and reused at every validation step;
prompts and the negative prompt come from the text cache, so no text encoder is ever loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from raytuner.evaluate.validation import (
    ValidationPrompt,
    ValidationSettings,
    render_validation,
    validation_prompts,
    validation_settings,
)

if TYPE_CHECKING:
    from raytuner.train.loop import Worker

EMA_LABEL = "ema"


class Validator:
    """Rank 0's validation: settings, prompts and pipeline kept between steps."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        run, text = worker.run, worker.data.text
        self.prompts: list[ValidationPrompt] = validation_prompts(
            run, text, texts=worker.job.validation_prompts
        )
        self.settings: ValidationSettings = validation_settings(run, text, worker.family)
        self._pipeline: Any = None

    def render(self, folder: Path | None = None) -> list[tuple[str, Image.Image]]:
        """Render into ``folder`` (default ``output_dir/validation/step_N``)."""
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
        return [(image.path.stem, image.image) for image in images]
