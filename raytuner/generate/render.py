"""One family pipeline with the adapter merged in, rendering one ``ImageRequest`` at a time.

The pipeline is built as the seeds' inference example builds it: ``from_pretrained`` on the base
model, then ``create_lycoris_from_weights(scale, file, pipe.transformer)`` and ``merge_to()``
(through :func:`raytuner.adapters.load_adapter`, which checks the file first). Each image starts
from a CPU generator seeded with its request's seed, so an image is the same on any device and in
any actor.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from raytuner.adapters import AdapterError, load_adapter
from raytuner.generate.prompts import ImageRequest
from raytuner.generate.settings import GenerateError, GenerationSettings
from raytuner.models.registry import get_family

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class Rendered:
    """One request's outcome: a PNG, or the reason the safety checker refused its prompt."""

    request: ImageRequest
    png: bytes | None
    width: int
    height: int
    seconds: float
    refused: str | None = None
    clip_score: float | None = None
    dtype: str = ""  # the precision it was rendered in ("auto" resolves per device)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 on the CPU, where bfloat16 matmuls are slow."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ImageRenderer:
    """The pipeline of one run's settings, loaded once; :meth:`render` takes one request."""

    def __init__(
        self,
        settings: GenerationSettings,
        *,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> None:
        self.settings = settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch_dtype(settings.dtype, self.device)
        self.family = get_family(settings.family)(
            settings.model, revision=settings.revision, dtype=self.dtype
        )
        self.pipeline = self._build_pipeline()
        self.pipeline.set_progress_bar_config(disable=not progress)
        self.clip_scorer: Any = None
        if settings.clip_model:
            from raytuner.evaluate.clip_score import ClipScorer

            self.clip_scorer = ClipScorer(settings.clip_model, device=self.device)

    def _build_pipeline(self) -> DiffusionPipeline:
        # Built on the CPU, the adapter merged there, then moved to the device.
        family = self.family
        # The screening policy was decided with the settings (a checker when screened).
        components = family.generation_components(screened=self.settings.screening.screened)
        try:
            pipeline = family.build_pipeline(**components)
        except (OSError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise GenerateError(f"--model {self.settings.model} could not be loaded: {first_line}") from None
        if self.settings.adapter:
            try:
                load_adapter(
                    self.settings.adapter,
                    pipeline.transformer,
                    scale=self.settings.adapter_scale,
                    merge=True,
                    family=self.settings.family,
                )
            except AdapterError as error:
                raise GenerateError(str(error)) from None
        return pipeline.to(self.device)

    def render(self, request: ImageRequest) -> Rendered:
        start = time.perf_counter()
        refusal = self._screen_prompt(request.prompt)
        if refusal:
            return Rendered(
                request=request,
                png=None,
                width=0,
                height=0,
                seconds=0.0,
                refused=refusal,
                dtype=self.dtype_name,
            )
        call: dict[str, Any] = {
            "prompt": request.prompt,
            "num_inference_steps": self.settings.steps,
            "guidance_scale": self.settings.guidance,
            # On the CPU: the same starting noise whatever device renders.
            "generator": torch.Generator().manual_seed(request.seed),
        }
        width = request.width or self.settings.width
        height = request.height or self.settings.height
        if width and height:
            call.update(width=width, height=height)
        negative = (
            request.negative_prompt if request.negative_prompt is not None else self.settings.negative_prompt
        )
        with torch.inference_mode():
            image = self.family.render(self.pipeline, call, negative_prompt=negative)
        clip_score = None
        if self.clip_scorer is not None:
            clip_score = float(self.clip_scorer.score([image], [request.prompt])[0])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Rendered(
            request=request,
            png=buffer.getvalue(),
            width=image.width,
            height=image.height,
            seconds=time.perf_counter() - start,
            clip_score=clip_score,
            dtype=self.dtype_name,
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _screen_prompt(self, prompt: str) -> str | None:
        """The text check a screening pipeline would make (and raise on), made first, so that one
        refused prompt of a batch is recorded in the index instead of ending the run."""
        if not self.settings.screening.screened:
            return None
        return self.family.prompt_refusal(self.pipeline, prompt, self.device)
