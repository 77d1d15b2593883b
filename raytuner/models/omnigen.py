"""OmniGen v1: ``omnigen``, flavour ``v1``.

Upstream conventions followed (diffusers 0.42, ``pipelines/omnigen/pipeline_omnigen.py`` and
``processor_omnigen.py``):

* **Latents.** SDXL-style ``AutoencoderKL``; the pipeline encodes input images as
  ``latent_dist.sample() * scaling_factor`` (``encode_input_images``) and decodes with
  ``latents / scaling_factor`` — no shift factor either way, so none is applied here. The cache
  stores the posterior mean so that an entry is a pure function of its content key.
* **Text.** There is no text encoder: the transformer embeds token ids itself.
  ``OmniGenMultiModalProcessor.process_multi_modal_prompt`` wraps the prompt in OmniGen's chat
  template (``add_prefix_instruction``) and tokenizes it; that id list is what is cached. Left
  padding, the attention mask (causal over text, bidirectional over the image) and the position
  ids depend on the batch and the image size, so :meth:`predict` builds them per batch with the
  pipeline's own ``OmniGenCollator.process_mllm_input``, as ``OmniGenMultiModalProcessor.__call__``
  does at inference (there the batch also holds the negative prompt rows; masks make the padding
  irrelevant to each row's result).
* **Timesteps.** The pipeline's scheduler is ``FlowMatchEulerDiscreteScheduler(invert_sigmas=True,
  num_train_timesteps=1)`` (``scripts/convert_omnigen_to_diffusers.py``): inference integrates
  from noise at ``t = 0`` to data at ``t = 1`` and passes ``timestep = t`` in ``[0, 1]``. So with
  noise fraction ``sigma`` the transformer gets ``timestep = 1 - sigma`` and predicts
  ``x0 - noise`` (target direction -1). Training ``t`` is drawn as ``sigmoid(N(0, 1))``, OmniGen's
  own scheme (as SimpleTuner's ``OmniGen.sample_flow_sigmas``): no schedule shift applies, as
  the OmniGen quickstart says ("OmniGen is hard-coded to its own flow-matching scheme; schedule
  shift is not applied").
* **Loss.** The plain mean squared error against ``x0 - noise``, every noise level weighted alike
  (``loss_weight`` is 1), as SimpleTuner's ``OmniGen.loss``.
* **Validation from the cache.** ``__call__`` takes only text: its ``multimodal_processor`` turns
  the prompt and a fixed negative prompt (the processor's ``negative_prompt`` default) into one
  batch of ids, masks and position ids, and guidance is always on (``uncond + g * (cond - uncond)``).
  :meth:`generate_image` lends the pipeline a processor that returns the same batch built from the
  cached ids instead, so the cached negative prompt is the one used; for no guidance the negative
  row is the prompt itself, which makes ``uncond`` equal ``cond`` whatever ``g`` is.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from raytuner import flow
from raytuner.models.base import (
    CardLicense,
    ConditioningBatch,
    Denoiser,
    ModelFamily,
    PromptConditioning,
    UpstreamClass,
)
from raytuner.models.registry import register_family
from raytuner.upstream import lent_multimodal_processor

if TYPE_CHECKING:
    # diffusers and transformers are imported where a model is loaded, not with the family: the
    # config checks read this class and must not pay seconds of imports for it.
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator, OmniGenMultiModalProcessor
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

PIXELS_PER_LATENT = 8  # the processor hard-codes 16 pixels per token: VAE x8 times patch 2


@functools.cache
def default_negative_prompt() -> str:
    """The negative prompt OmniGenPipeline always uses: its ``__call__`` has no negative_prompt argument."""
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor

    prompt: str = inspect.signature(OmniGenMultiModalProcessor.__call__).parameters["negative_prompt"].default
    return prompt


@register_family
class OmniGen(ModelFamily):
    name: ClassVar[str] = "omnigen"
    display_name: ClassVar[str] = "OmniGen"
    card_license: ClassVar[CardLicense] = {"license": "mit"}
    # Its quickstart: "hard-coded to its own flow-matching scheme; schedule shift is not applied".
    fixed_sigma_schedule: ClassVar[str | None] = (
        "OmniGen trains with its own flow-matching schedule (t = sigmoid(N(0, 1))) and applies no shift"
    )
    # diffusers' OmniGen attention processor calls PyTorch's scaled_dot_product_attention itself.
    fixed_attention: ClassVar[str | None] = (
        "OmniGen's diffusers attention calls PyTorch SDPA directly, not diffusers' attention backends"
    )
    flavours: ClassVar[dict[str, str]] = {"v1": "Shitao/OmniGen-v1-diffusers"}
    default_flavour: ClassVar[str] = "v1"
    pipeline_class: ClassVar[UpstreamClass[DiffusionPipeline]] = UpstreamClass(
        "diffusers.pipelines.omnigen.pipeline_omnigen", "OmniGenPipeline"
    )
    transformer_class: ClassVar[UpstreamClass[ModelMixin]] = UpstreamClass(
        "diffusers.models.transformers.transformer_omnigen", "OmniGenTransformer2DModel"
    )
    vae_class: ClassVar[UpstreamClass[ModelMixin]] = UpstreamClass(
        "diffusers.models.autoencoders.autoencoder_kl", "AutoencoderKL"
    )
    # The OmniGen seed preset says FeedForward; diffusers names the class OmniGenFeedForward.
    module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "FeedForward": ("OmniGenFeedForward",),
    }
    checkpoint_blocks: ClassVar[str] = "layers"
    target_direction: ClassVar[float] = -1.0
    text_components: ClassVar[tuple[str, ...]] = ("tokenizer",)
    prompt_tensors: ClassVar[tuple[str, ...]] = ("input_ids",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

        self._processor: OmniGenMultiModalProcessor | None = None
        self._collator: OmniGenCollator = (
            OmniGenCollator()
        )  # the pipeline's processor builds its collator with defaults

    # ---- parts ---------------------------------------------------------------------------------

    def processor(self) -> OmniGenMultiModalProcessor:
        if self._processor is None:
            from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, subfolder="tokenizer", **self._load_kwargs()
            )
            self._processor = OmniGenMultiModalProcessor(tokenizer, max_image_size=1024)
        return self._processor

    # ---- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.load_vae()
        posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return posterior.mode().to(torch.float32) * vae.config.scaling_factor

    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptConditioning]:
        processor = self.processor()
        return [
            {"input_ids": torch.tensor(processor.process_multi_modal_prompt(prompt, None)["input_ids"])}
            for prompt in prompts
        ]

    def text_settings(self) -> dict[str, Any]:
        # The ids are the chat-templated prompt: the template is part of the text side's identity.
        return {
            **super().text_settings(),
            "template": "OmniGenMultiModalProcessor.process_multi_modal_prompt",
        }

    def collate_conditioning(self, items: Sequence[PromptConditioning]) -> ConditioningBatch:
        return {"input_ids": [item["input_ids"].tolist() for item in items]}

    # ---- training step -------------------------------------------------------------------------

    def image_seq_len(self, latents: torch.Tensor) -> int:
        _, _, height, width = latents.shape
        return (height // 2) * (width // 2)

    def sample_sigmas(
        self,
        latents: torch.Tensor,
        schedule: flow.FlowSchedule,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        # OmniGen's own scheme: t = sigmoid(N(0, 1)); no shift, whatever the schedule says.
        data_fraction = flow.sample_sigmas(
            latents.shape[0], flow.SigmaSampling(), generator=generator, device=latents.device
        )
        return 1.0 - data_fraction

    def timesteps_from_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        return 1.0 - sigmas

    def build_model_inputs(
        self, input_ids: Sequence[Sequence[int]], height: int, width: int
    ) -> dict[str, Any]:
        """Padded ids, attention mask and position ids for a batch of images of one pixel size."""
        mllm_inputs = [
            {"input_ids": list(ids), "pixel_values": None, "image_sizes": None} for ids in input_ids
        ]
        padded_ids, position_ids, attention_mask, _, _, image_sizes = self._collator.process_mllm_input(
            mllm_inputs, [[height, width]] * len(mllm_inputs)
        )
        return {
            "input_ids": padded_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "input_image_sizes": image_sizes,
        }

    def predict(
        self,
        transformer: Denoiser,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: ConditioningBatch,
    ) -> torch.Tensor:
        dtype = transformer.dtype
        device = noisy_latents.device
        _, _, latent_height, latent_width = noisy_latents.shape
        inputs = self.build_model_inputs(
            conditioning["input_ids"], latent_height * PIXELS_PER_LATENT, latent_width * PIXELS_PER_LATENT
        )
        prediction = transformer(
            hidden_states=noisy_latents.to(dtype),
            timestep=self.timesteps_from_sigmas(sigmas).to(device, dtype),
            input_ids=inputs["input_ids"].to(device),
            input_img_latents=[],
            input_image_sizes=inputs["input_image_sizes"],
            attention_mask=inputs["attention_mask"].to(device),
            position_ids=inputs["position_ids"].to(device),
            return_dict=False,
        )[0]
        return prediction.to(torch.float32)

    # ---- inference -----------------------------------------------------------------------------

    def pipeline_components(self, *, allow_unscreened: bool) -> dict[str, Any]:
        return {}

    def render(
        self, pipeline: DiffusionPipeline, call: dict[str, Any], *, negative_prompt: str | None
    ) -> Image.Image:
        assert callable(pipeline)  # DiffusionPipeline has no __call__; each pipeline class defines one
        # OmniGenPipeline.__call__ takes no negative prompt: its processor adds its own default.
        # A processor that passes ours on is lent to the pipeline for this call.
        if negative_prompt is None:
            return pipeline(**call).images[0]
        with lent_multimodal_processor(
            pipeline, _WithNegativePrompt(pipeline.multimodal_processor, negative_prompt)
        ):
            return pipeline(**call).images[0]

    def generate_image(
        self,
        pipeline: DiffusionPipeline,
        prompt: str,
        conditioning: PromptConditioning,
        negative: PromptConditioning | None,
        *,
        width: int,
        height: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator,
        disable_cfg: bool = False,
    ) -> Image.Image:
        assert callable(pipeline)  # DiffusionPipeline has no __call__; each pipeline class defines one
        own = pipeline.multimodal_processor
        ids = conditioning["input_ids"].tolist()
        if disable_cfg:
            negative_ids = ids
        elif negative is None:
            negative_ids = own.process_multi_modal_prompt(default_negative_prompt(), None)["input_ids"]
        else:
            negative_ids = negative["input_ids"].tolist()
        with lent_multimodal_processor(
            pipeline, _CachedIdsProcessor(self, ids, negative_ids, own.max_image_size)
        ):
            output = pipeline(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                max_input_image_size=own.max_image_size,
                guidance_scale=1.0 if disable_cfg else guidance_scale,
                generator=generator,
            )
        return output.images[0]


class _CachedIdsProcessor:
    """Answers the pipeline's one processor call with the batch ``OmniGenMultiModalProcessor``
    would build for a text-only prompt (prompt row, then negative row), from cached ids."""

    def __init__(self, family: OmniGen, ids: list[int], negative_ids: list[int], max_image_size: int) -> None:
        self.family = family
        self.ids = ids
        self.negative_ids = negative_ids
        self.max_image_size = max_image_size  # __call__ compares it with its max_input_image_size

    def __call__(
        self,
        instructions: Sequence[str],
        input_images: Sequence[Any] | None = None,
        *,
        height: int,
        width: int,
        num_images_per_prompt: int = 1,
        **_: Any,
    ) -> dict[str, Any]:
        if len(instructions) != 1 or num_images_per_prompt != 1 or any(input_images or ()):
            raise ValueError("cached OmniGen conditioning renders one text-only prompt, one image at a time")
        inputs = self.family.build_model_inputs([self.ids, self.negative_ids], height, width)
        return {**inputs, "input_pixel_values": []}


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
