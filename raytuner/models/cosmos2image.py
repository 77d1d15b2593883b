"""NVIDIA Cosmos2 Predict (Image): ``cosmos2image``, flavours ``2b`` and ``14b``.

Upstream conventions followed (diffusers 0.42, ``pipelines/cosmos/pipeline_cosmos2_text2image.py``):

* **Latents.** The Wan VAE encodes a one-frame video ``[B, 3, 1, H, W]``; latents are normalised as
  ``(z - latents_mean) / latents_std * sigma_data`` — the inverse of the decode step in
  ``__call__`` (``latents / latents_std / sigma_data + latents_mean`` with ``latents_std`` stored
  inverted) and the same as ``pipeline_cosmos2_video2world.py::prepare_latents``. They keep the
  frame dimension: ``[B, 16, 1, H/8, W/8]``. The cache stores the posterior mean so that an entry
  is a pure function of its content key.
* **Text.** ``_get_t5_prompt_embeds``: T5 tokens padded to ``max_sequence_length`` (512), the
  encoder run with the attention mask, and every position past the prompt's length zeroed. The
  cache keeps only the first ``length`` rows; :meth:`collate_conditioning` re-pads with zeros to
  512 because the transformer's cross-attention takes no text mask, so the zero rows take part in
  attention exactly as they do at inference.
* **Timesteps.** The denoising loop feeds ``latents * c_in`` with ``c_in = 1 - t`` and
  ``t = sigma / (sigma + 1)`` for the scheduler's EDM sigma, and turns the output into
  ``x0 = c_skip * latents + c_out * v`` with ``c_skip = 1 - t``, ``c_out = -t``. Writing
  ``z_t = (1 - t) * x0 + t * noise`` that is ``x0 = z_t - t * v``: a rectified-flow model with
  noise fraction ``t`` and velocity ``v = noise - x0``. So training noises with flow sigma ``t``,
  passes ``timestep = t`` (shape ``[B]``, not scaled by 1000) and regresses ``noise - x0``.
  Sigmas are clamped to the range the pipeline ever evaluates, ``[0.002 / 1.002, 80 / 81]``.
* **Loss weighting** (:meth:`Cosmos2Image.loss_weight`). SimpleTuner
  (``simpletuner/helpers/models/cosmos/model.py``, ``loss``) regresses ``x0`` with the EDM weight
  ``(sigma**2 + sigma_data**2) / (sigma * sigma_data)**2`` (``sigma_data = 1``). Its ``x0``
  prediction is the pipeline's, ``x0 = z_t - t * v``, so ``x0_pred - x0 = t * (v - (noise - x0))``
  and its per-sample loss is ``t**2 * w * |v - target|**2``. With ``sigma = t / (1 - t)``,
  ``w = (t**2 + (1 - t)**2) / t**2``: the EDM ``x0`` loss is the velocity MSE times
  ``t**2 + (1 - t)**2`` — 1 at either end, 1/2 at ``t = 1/2``. raytuner regresses the velocity
  with that weight, so it trains what SimpleTuner trains and logs losses in its units.
* **Sigma sampling.** SimpleTuner draws ``log sigma ~ N(0, 1)`` (``prepare_edm_sigmas``), which is
  ``t = sigmoid(N(0, 1))``: raytuner's default logit-normal schedule, clamped the same way. The
  difference is the shift: SimpleTuner's Cosmos2 code ignores ``flow_schedule_shift`` and
  ``flow_schedule_auto_shift``; raytuner applies them, as the Cosmos2 quickstart describes
  (``docs/simpletuner-differences.md``).
* **Padding mask.** ``padding_mask = zeros(1, 1, height, width)`` in pixels, which the transformer
  resizes to the latent grid and concatenates as an extra channel.
* **Validation from the cache.** ``__call__`` takes ``prompt_embeds`` and ``negative_prompt_embeds``
  instead of text (with ``prompt=None``: it refuses both). Given the cached embeds re-padded as
  :meth:`collate_conditioning` pads them, it never touches its text encoder, so the validation
  pipeline is built with ``text_encoder=None, tokenizer=None``. Two things it would otherwise do
  from the text are done here: screening the prompt with the safety checker, and encoding a
  negative prompt (``DEFAULT_NEGATIVE_PROMPT`` when none is given) whenever ``guidance_scale > 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from raytuner.models.base import (
    CardLicense,
    ConditioningBatch,
    Denoiser,
    ModelFamily,
    PromptConditioning,
    UpstreamClass,
)
from raytuner.models.registry import register_family
from raytuner.models.safety import PassThroughSafetyChecker, load_safety_checker
from raytuner.upstream import execution_device

if TYPE_CHECKING:
    # diffusers and transformers are imported where a model is loaded, not with the family: the
    # config checks read this class and must not pay seconds of imports for it.
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import T5EncoderModel

# Cosmos2TextToImagePipeline.__init__ registers these on its scheduler config.
SIGMA_MAX = 80.0
SIGMA_MIN = 0.002
SIGMA_DATA = 1.0
MAX_SEQUENCE_LENGTH = 512  # __call__'s max_sequence_length default


@register_family
class Cosmos2Image(ModelFamily):
    name: ClassVar[str] = "cosmos2image"
    display_name: ClassVar[str] = "Cosmos2"
    # SimpleTuner's metadata names the family "cosmos"; its model code registers "cosmos2image".
    aliases: ClassVar[tuple[str, ...]] = ("cosmos",)
    card_license: ClassVar[CardLicense] = {
        "license": "other",
        "license_name": "nvidia-open-model-license",
        "license_link": "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license",
    }
    screens_images: ClassVar[bool] = True
    quantized_base_advice: ClassVar[str | None] = (
        "the Cosmos2 quickstart says not to quantise Cosmos2 (set base_model_precision to "
        "no_change); quantising it anyway, expect lower quality"
    )
    flavours: ClassVar[dict[str, str]] = {
        "2b": "nvidia/Cosmos-Predict2-2B-Text2Image",
        "14b": "nvidia/Cosmos-Predict2-14B-Text2Image",
    }
    default_flavour: ClassVar[str] = "2b"
    pipeline_class: ClassVar[UpstreamClass[DiffusionPipeline]] = UpstreamClass(
        "diffusers.pipelines.cosmos.pipeline_cosmos2_text2image", "Cosmos2TextToImagePipeline"
    )
    transformer_class: ClassVar[UpstreamClass[ModelMixin]] = UpstreamClass(
        "diffusers.models.transformers.transformer_cosmos", "CosmosTransformer3DModel"
    )
    vae_class: ClassVar[UpstreamClass[ModelMixin]] = UpstreamClass(
        "diffusers.models.autoencoders.autoencoder_kl_wan", "AutoencoderKLWan"
    )
    # Cosmos2 blocks use diffusers' Attention; checkpoints with image context build their cross-attention
    # as the CosmosAttention subclass, which LyCORIS (exact class-name match) would otherwise skip.
    module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "Attention": ("CosmosAttention",),
    }
    checkpoint_blocks: ClassVar[str] = "transformer_blocks"
    target_direction: ClassVar[float] = 1.0
    # Training never evaluates t where the pipeline cannot: its EDM sigmas run from 0.002 to 80.
    sigma_range: ClassVar[tuple[float, float]] = (SIGMA_MIN / (SIGMA_MIN + 1), SIGMA_MAX / (SIGMA_MAX + 1))
    text_components: ClassVar[tuple[str, ...]] = ("tokenizer", "text_encoder")
    prompt_tensors: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    # T5 (11B parameters in the released models) is never loaded to render from cached embeds.
    validation_skipped_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokenizer: Any = None
        self._text_encoder: T5EncoderModel | None = None

    # ---- parts ---------------------------------------------------------------------------------

    def _load_text_side(self) -> tuple[Any, T5EncoderModel]:
        if self._text_encoder is None:
            from transformers import AutoTokenizer, T5EncoderModel

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, subfolder="tokenizer", **self._load_kwargs()
            )
            encoder = T5EncoderModel.from_pretrained(
                self.model_path, subfolder="text_encoder", dtype=self.dtype, **self._load_kwargs()
            )
            # transformers wraps PreTrainedModel.to in functools.wraps, which hides the bound self from mypy.
            self._text_encoder = encoder.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        return self._tokenizer, self._text_encoder

    # ---- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.load_vae()
        video = pixels.to(self.device, vae.dtype).unsqueeze(2)  # [B, 3, 1, H, W]: one frame
        posterior = vae.encode(video).latent_dist
        latents = posterior.mode().to(torch.float32)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=latents.device)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=latents.device)
        return (latents - mean.view(1, z_dim, 1, 1, 1)) / std.view(1, z_dim, 1, 1, 1) * SIGMA_DATA

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptConditioning]:
        tokenizer, text_encoder = self._load_text_side()
        tokens = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        attention_mask = tokens.attention_mask.bool().to(self.device)
        hidden = text_encoder(
            tokens.input_ids.to(self.device), attention_mask=attention_mask
        ).last_hidden_state
        lengths = attention_mask.sum(dim=1).tolist()
        return [
            {"prompt_embeds": hidden[i, :length].to(torch.float32).cpu()} for i, length in enumerate(lengths)
        ]

    def text_settings(self) -> dict[str, Any]:
        return {
            **super().text_settings(),
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "dtype": str(self.dtype),
        }

    def collate_conditioning(self, items: Sequence[PromptConditioning]) -> ConditioningBatch:
        first = items[0]["prompt_embeds"]
        batch = torch.zeros(len(items), MAX_SEQUENCE_LENGTH, first.shape[-1], dtype=torch.float32)
        for row, item in enumerate(items):
            embeds = item["prompt_embeds"][:MAX_SEQUENCE_LENGTH]
            batch[row, : embeds.shape[0]] = embeds
        return {"prompt_embeds": batch}

    # ---- training step -------------------------------------------------------------------------

    def image_seq_len(self, latents: torch.Tensor) -> int:
        _, _, frames, height, width = latents.shape
        # transformer patch_size is (1, 2, 2) in every released Cosmos2 checkpoint
        return frames * (height // 2) * (width // 2)

    def timesteps_from_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas

    @classmethod
    def loss_weight(cls, t: torch.Tensor) -> torch.Tensor:
        """``t**2 + (1 - t)**2``: SimpleTuner's EDM ``x0`` loss weight in velocity terms (see the
        module docstring), for noise fractions ``t``."""
        t = t.to(torch.float32)
        return t**2 + (1.0 - t) ** 2

    def predict(
        self,
        transformer: Denoiser,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: ConditioningBatch,
    ) -> torch.Tensor:
        dtype = transformer.dtype
        _, _, _, latent_height, latent_width = noisy_latents.shape
        scale = 8  # Wan VAE: 2 ** len(temperal_downsample) pixels per latent
        padding_mask = noisy_latents.new_zeros(1, 1, latent_height * scale, latent_width * scale, dtype=dtype)
        velocity = transformer(
            hidden_states=noisy_latents.to(dtype),
            timestep=self.timesteps_from_sigmas(sigmas).to(dtype),
            encoder_hidden_states=conditioning["prompt_embeds"].to(noisy_latents.device, dtype),
            padding_mask=padding_mask,
            return_dict=False,
        )[0]
        return velocity.to(torch.float32)

    # ---- inference -----------------------------------------------------------------------------

    def pipeline_components(self, *, allow_unscreened: bool) -> dict[str, Any]:
        # The pipeline refuses to run without a safety checker (the model licence asks for NVIDIA's
        # guardrail); raytuner.models.safety holds the policy.
        return {"safety_checker": load_safety_checker(allow_unscreened=allow_unscreened)}

    def generation_components(self, *, screened: bool) -> dict[str, Any]:
        # The pipeline refuses to run without a checker: the guardrail's, or a pass-through when
        # generate's policy allows unscreened images (raytuner.generate.settings.screening_for).
        if screened:
            return self.pipeline_components(allow_unscreened=False)
        return {"safety_checker": PassThroughSafetyChecker()}

    def prompt_refusal(self, pipeline: DiffusionPipeline, prompt: str, device: torch.device) -> str | None:
        return None if prompt_is_safe(pipeline, prompt, device) else "the safety checker refused the prompt"

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
        device = execution_device(pipeline)
        dtype = pipeline.transformer.dtype
        _screen_prompt(pipeline, prompt, device)
        # The pipeline's own rule (do_classifier_free_guidance): guidance only above 1.
        guided = not disable_cfg and guidance_scale > 1.0
        extra: dict[str, torch.Tensor] = {}
        if guided:
            if negative is None:
                raise ValueError(
                    f"{self.name}: classifier-free guidance (guidance {guidance_scale}) needs the negative "
                    "prompt's cached conditioning; without it the pipeline would run its text encoder"
                )
            extra["negative_prompt_embeds"] = self._padded_embeds(negative, device, dtype)
        output = pipeline(
            prompt_embeds=self._padded_embeds(conditioning, device, dtype),
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale if guided else 1.0,
            generator=generator,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            **extra,
        )
        return output.images[0]

    def _padded_embeds(
        self, conditioning: PromptConditioning, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        # The pipeline hands prompt_embeds to the transformer as they are; its own T5 states are
        # in the text encoder's dtype, which build_pipeline loads as the transformer's.
        return self.collate_conditioning([conditioning])["prompt_embeds"].to(device, dtype)


def prompt_is_safe(pipeline: DiffusionPipeline, prompt: str, device: torch.device) -> bool:
    """The text check ``__call__`` makes on a prompt given as text, made the same way: the checker
    on ``device`` for the call only."""
    checker = pipeline.safety_checker
    checker.to(device)
    try:
        return bool(checker.check_text_safety(prompt))
    finally:
        checker.to("cpu")


def _screen_prompt(pipeline: DiffusionPipeline, prompt: str, device: torch.device) -> None:
    """:func:`prompt_is_safe`, raising as ``__call__`` does on an unsafe prompt."""
    if not prompt_is_safe(pipeline, prompt, device):
        raise ValueError(
            f"Cosmos Guardrail detected unsafe text in the prompt: {prompt}. Please ensure that the "
            "prompt abides by the NVIDIA Open Model License Agreement."
        )
