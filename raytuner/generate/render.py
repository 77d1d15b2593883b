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
from diffusers import DiffusionPipeline
from PIL import Image

from raytuner.adapters import AdapterError, load_adapter
from raytuner.generate.prompts import ImageRequest
from raytuner.generate.settings import GenerateError, GenerationSettings
from raytuner.models.registry import get_family
from raytuner.models.safety import PassThroughSafetyChecker

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
        self.pipeline = self._build_pipeline()
        self.pipeline.set_progress_bar_config(disable=not progress)
        self.clip_scorer: Any = None
        if settings.clip_model:
            from raytuner.evaluate.clip_score import ClipScorer

            self.clip_scorer = ClipScorer(settings.clip_model, device=self.device)

    def _build_pipeline(self) -> DiffusionPipeline:
        family = get_family(self.settings.family)
        components: dict[str, Any] = {}
        if self.settings.family == "cosmos2image":
            # The policy was decided with the settings: a checker when screened, else pass-through.
            if self.settings.screening.screened:
                components = family(self.settings.model).pipeline_components(allow_unscreened=False)
            else:
                components = {"safety_checker": PassThroughSafetyChecker()}
        options = {"revision": self.settings.revision} if self.settings.revision else {}
        try:
            pipeline = family.pipeline_class.from_pretrained(
                self.settings.model, dtype=self.dtype, **options, **components
            )
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
            image = self._call(call, negative)
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

    def _call(self, call: dict[str, Any], negative: str | None) -> Image.Image:
        if self.settings.family != "omnigen":
            if negative is not None:
                call["negative_prompt"] = negative
            return self.pipeline(**call).images[0]
        # OmniGenPipeline.__call__ takes no negative prompt: its processor adds its own default.
        # A processor that passes ours on is lent to the pipeline for this call.
        own = self.pipeline.multimodal_processor
        if negative is not None:
            self.pipeline.multimodal_processor = _WithNegativePrompt(own, negative)
        try:
            return self.pipeline(**call).images[0]
        finally:
            self.pipeline.multimodal_processor = own

    def _screen_prompt(self, prompt: str) -> str | None:
        """The text check the Cosmos2 pipeline would make (and raise on), made first, so that one
        refused prompt of a batch is recorded in the index instead of ending the run."""
        if not self.settings.screening.screened:
            return None
        from raytuner.models.cosmos2image import prompt_is_safe

        return (
            None
            if prompt_is_safe(self.pipeline, prompt, self.device)
            else "the safety checker refused the prompt"
        )


class _WithNegativePrompt:
    """An OmniGen multimodal processor whose negative prompt is the one given."""

    def __init__(self, processor: Any, negative_prompt: str) -> None:
        self._processor = processor
        self._negative_prompt = negative_prompt

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["negative_prompt"] = self._negative_prompt
        return self._processor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # max_image_size and the rest, as the processor has them
        return getattr(self._processor, name)
