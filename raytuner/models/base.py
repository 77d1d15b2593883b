"""The small interface every model family answers.

A family knows where its parts come from, how its diffusers pipeline expects latents and
conditioning, how the pipeline calls the transformer at inference time, and which module class
names its LoKr presets may target. The training loop only ever talks to this interface.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypedDict, TypeVar

import torch
from PIL import Image

from raytuner import flow
from raytuner.errors import RaytunerError
from raytuner.upstream import BlockCheckpointing, enable_block_interval_checkpointing

if TYPE_CHECKING:
    # For annotations only: the data types below (conditioning, batches) are read by processes
    # that never load a model (Ray Train's controller, a sweep's trial driver), and importing
    # diffusers costs seconds; each family's module imports its own classes.
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

logger = logging.getLogger(__name__)


UpstreamT = TypeVar("UpstreamT")


class UpstreamClass(Generic[UpstreamT]):
    """A diffusers or transformers class a family names, imported the first time it is read.

    The family classes are read without loading any model: the config checks ask them for
    aliases, fixed schedules and advice. Importing diffusers takes seconds, so a family module
    names its pipeline, transformer and VAE classes by module and name, and
    ``Family.transformer_class`` imports the module then.
    """

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def __get__(self, instance: object, owner: type | None = None) -> type[UpstreamT]:
        upstream_class: type[UpstreamT] = getattr(importlib.import_module(self.module), self.name)
        return upstream_class


class AttentionBackendError(RaytunerError, RuntimeError):
    """An attention_mechanism whose diffusers backend cannot run where the transformer is built."""


# attention_mechanism -> diffusers' attention backend (diffusers.models.attention_dispatch), as
# SimpleTuner maps its names; "diffusers" keeps the transformer's own attention processors.
ATTENTION_BACKENDS: Mapping[str, str] = {
    "xformers": "xformers",
    "flash-attn": "flash",
    "flash-attn-hub": "flash_hub",
    "flash-attn-2": "flash_varlen",
    "flash-attn-varlen-hub": "flash_varlen_hub",
    "flash-attn-3": "_flash_3",
    "flash-attn-3-hub": "_flash_3_hub",
    "flash-attn-3-varlen": "_flash_varlen_3",
    "flash-attn-3-varlen-hub": "_flash_3_varlen_hub",
    "flash-attn-4-hub": "flash_4_hub",
    "flex": "flex",
    "native": "native",
    "cudnn": "_native_cudnn",
    "native-efficient": "_native_efficient",
    "native-flash": "_native_flash",
    "native-math": "_native_math",
    "native-npu": "_native_npu",
    "native-xla": "_native_xla",
}

# (VAE class, feature) pairs already warned about: an actor pool warns once per process, not per call.
_WARNED_VAE_FEATURES: set[tuple[str, str]] = set()

# One prompt's conditioning as cached (tensors without batch padding), and a collated batch of it.
PromptConditioning = dict[str, torch.Tensor]
ConditioningBatch = dict[str, Any]


class Denoiser(Protocol):
    """What :meth:`ModelFamily.predict` calls: the family's transformer, or under DeepSpeed the
    engine around it (``raytuner.train.zero.EngineForward``); ``dtype`` is the base model's."""

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class CardLicense(TypedDict, total=False):
    """A base model's licence as its Hub card states it: the model card fields of the same names."""

    license: str
    license_name: str
    license_link: str


@dataclass(frozen=True, kw_only=True)
class LossOutput:
    """What one training forward pass produced; ``loss`` is a float32 scalar."""

    loss: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


class ModelFamily(ABC):
    """One model family: components, latent and prompt encoding, the training step's inputs."""

    name: ClassVar[str]
    # How people and messages name the family ("Cosmos2"), and other model_family values that mean it.
    display_name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # The base model's licence as its Hub card states it (an adapter is a derivative of its base):
    # the model card's license, license_name and license_link fields.
    card_license: ClassVar[CardLicense] = {}
    # None when the family draws training sigmas from the run's schedule (flow_schedule_shift,
    # flow_schedule_auto_shift, flow_sigmoid_scale, the uniform and Beta options); otherwise what
    # it does instead, in the words of a warning: those keys then have no effect.
    fixed_sigma_schedule: ClassVar[str | None] = None
    # Whether the family's pipeline screens prompts and images with a safety checker (generate's
    # screening policy: raytuner.generate.settings.screening_for).
    screens_images: ClassVar[bool] = False
    # Why a quantised base (base_model_precision) is advised against for this family, in the words
    # of a warning; None when the family's guide has nothing against it.
    quantized_base_advice: ClassVar[str | None] = None
    # None when the transformer's attention goes through diffusers' attention backends (every
    # attention_mechanism applies); otherwise why it does not, in the words of a config error.
    fixed_attention: ClassVar[str | None] = None
    # flavour -> default hub id; a local path given as pretrained_model_name_or_path always wins.
    flavours: ClassVar[Mapping[str, str]]
    default_flavour: ClassVar[str]
    pipeline_class: ClassVar[UpstreamClass[DiffusionPipeline]]
    transformer_class: ClassVar[UpstreamClass[ModelMixin]]
    vae_class: ClassVar[UpstreamClass[ModelMixin]]
    # LyCORIS preset names as users write them -> the diffusers class names they mean.
    module_aliases: ClassVar[Mapping[str, Sequence[str]]] = {}
    # +1: the transformer predicts noise - x0; -1: it predicts x0 - noise.
    target_direction: ClassVar[float] = 1.0
    # Training sigmas are clamped to the noise levels the family's pipeline ever evaluates.
    sigma_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    # Image pixels per transformer token along each edge (VAE downsampling x patch size): every
    # aspect bucket's width and height are a multiple of it.
    pixels_per_token: ClassVar[int] = 16
    # The model folders the cache's two encoders are loaded from (they make its encoder identity).
    vae_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]]
    # Names of the tensors encode_prompts returns per prompt (the text cache's columns).
    prompt_tensors: ClassVar[tuple[str, ...]]
    # Pipeline components a validation pipeline is built without: it renders from cached conditioning.
    validation_skipped_components: ClassVar[tuple[str, ...]] = ()
    # The transformer's list of blocks, each checkpointed on its own under gradient checkpointing.
    checkpoint_blocks: ClassVar[str]

    def __init__(
        self,
        model_path: str | Path,
        *,
        revision: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model_path = str(model_path)
        self.revision = revision
        self.device = torch.device(device)
        self.dtype = dtype
        self._vae: ModelMixin | None = None

    # ---- where the parts come from -------------------------------------------------------------

    @classmethod
    def resolve_model_path(cls, flavour: str | None, pretrained_model_name_or_path: str | None) -> str:
        """The folder or hub id to load: an explicit path/id wins, else the flavour's hub id."""
        if pretrained_model_name_or_path:
            return pretrained_model_name_or_path
        chosen = flavour or cls.default_flavour
        if chosen not in cls.flavours:
            known = ", ".join(sorted(cls.flavours))
            raise ValueError(f"model_flavour {chosen!r} is not a flavour of {cls.name} (known: {known})")
        return cls.flavours[chosen]

    def _load_kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision} if self.revision else {}

    def load_transformer(self, *, device: torch.device | None = None) -> ModelMixin:
        """A fresh copy of the base transformer in ``self.dtype``, on ``device`` (default
        ``self.device``; group offload loads it onto the CPU and moves groups itself)."""
        transformer = self.transformer_class.from_pretrained(
            self.model_path, subfolder="transformer", dtype=self.dtype, **self._load_kwargs()
        )
        # diffusers wraps ModelMixin.to in functools.wraps, which hides the bound self from mypy.
        return transformer.to(device or self.device)  # type: ignore[arg-type]

    def apply_attention(self, transformer: ModelMixin, mechanism: str) -> None:
        """Run ``transformer``'s attention through diffusers' backend for ``mechanism``
        (attention_mechanism); "diffusers" leaves its own processors as they are."""
        backend = ATTENTION_BACKENDS.get(mechanism)
        if backend is None:
            return
        # diffusers makes the backend the process's active one too (attention_dispatch's registry):
        # a worker holds one transformer, so that is the run's attention wherever it is dispatched.
        try:
            transformer.set_attention_backend(backend)
        except (RuntimeError, ValueError, ImportError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise AttentionBackendError(
                f"'attention_mechanism' = '{mechanism}': diffusers' '{backend}' attention backend cannot run "
                f"on this machine ({reason}); install its kernel there or set attention_mechanism to diffusers"
            ) from None

    def enable_gradient_checkpointing(
        self, transformer: ModelMixin, *, interval: int | None = None
    ) -> BlockCheckpointing | None:
        """Checkpoint the transformer's blocks: every one, or every ``interval``-th from the first
        (gradient_checkpointing_interval); the interval's counter is returned."""
        if interval is None or interval <= 1:  # SimpleTuner reads 1 as "every block"
            transformer.enable_gradient_checkpointing()
            return None
        blocks = getattr(transformer, self.checkpoint_blocks)
        return enable_block_interval_checkpointing(transformer, list(blocks), interval)

    def load_vae(self) -> ModelMixin:
        """The frozen VAE in float32 (loaded once), on ``self.device``."""
        if self._vae is None:
            vae = self.vae_class.from_pretrained(
                self.model_path, subfolder="vae", dtype=torch.float32, **self._load_kwargs()
            )
            # diffusers wraps ModelMixin.to in functools.wraps, which hides the bound self from mypy.
            self._vae = vae.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        return self._vae

    def apply_vae_options(self, *, slicing: bool, tiling: bool) -> ModelMixin:
        """The VAE of :meth:`load_vae` with diffusers' slicing (one image per VAE pass) and tiling
        (large images in overlapping tiles) as SimpleTuner's vae_enable_slicing/vae_enable_tiling
        ask. A VAE class without the feature is named in a warning, once, and encodes as before."""
        vae = self.load_vae()
        # diffusers marks support with the use_slicing/use_tiling flags its encode() reads;
        # enable_*() on a class without them raises NotImplementedError.
        for wanted, feature in ((slicing, "slicing"), (tiling, "tiling")):
            if not wanted:
                continue
            if hasattr(vae, f"use_{feature}"):
                getattr(vae, f"enable_{feature}")()
                continue
            key = (type(vae).__name__, feature)
            if key not in _WARNED_VAE_FEATURES:
                _WARNED_VAE_FEATURES.add(key)
                logger.warning(
                    "vae_enable_%s: %s (%s) has no VAE %s; images are encoded without it",
                    feature,
                    type(vae).__name__,
                    self.display_name,
                    feature,
                )
        return vae

    # ---- encoding (the cache step) -------------------------------------------------------------

    def latent_settings(self) -> dict[str, Any]:
        """How this family turns pixels into cached latents, beyond the VAE's own files."""
        return {
            "family": self.name,
            "vae_class": self.vae_class.__name__,
            "latents": "posterior mode, normalised",
        }

    def text_settings(self) -> dict[str, Any]:
        """How this family turns a prompt into cached conditioning, beyond the text side's files."""
        return {"family": self.name, "tensors": list(self.prompt_tensors)}

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in ``[-1, 1]`` -> normalised latents, as the pipeline expects them back."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptConditioning]:
        """One conditioning dict per prompt, without batch padding (it is rebuilt per batch)."""

    @abstractmethod
    def collate_conditioning(self, items: Sequence[PromptConditioning]) -> ConditioningBatch:
        """Stack per-prompt conditioning into what :meth:`predict` takes for a batch."""

    # ---- the training step ---------------------------------------------------------------------

    @abstractmethod
    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Number of image tokens the transformer sees for these latents (drives auto-shift)."""

    @abstractmethod
    def timesteps_from_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The ``timestep`` the transformer receives for noise fraction ``sigmas``."""

    @abstractmethod
    def predict(
        self,
        transformer: Denoiser,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: ConditioningBatch,
    ) -> torch.Tensor:
        """Call the transformer exactly as the family's pipeline does at inference time."""

    @classmethod
    def loss_weight(cls, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the velocity loss for noise fractions ``t`` (float32, same shape).

        The loss of a sample is ``loss_weight(t) * mean((prediction - target) ** 2)``. The plain
        velocity MSE weighs every noise level alike (1 everywhere); a family whose reference trainer
        weights the loss by noise level (Cosmos2) overrides this, so training and eval losses are
        in the same units as there.
        """
        return torch.ones_like(t, dtype=torch.float32)

    def weighted_loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        sigmas: torch.Tensor,
        mask_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The float32 loss of a batch: :meth:`loss_weight` per sample, times a loss mask's
        per-pixel weights when given, averaged over every element (SimpleTuner's normalisation)."""
        weights = flow.per_sample(self.loss_weight(sigmas).to(prediction.device), prediction)
        if mask_weights is not None:
            weights = weights * mask_weights
        return flow.flow_matching_loss(prediction, target, weights)

    def sample_sigmas(
        self,
        latents: torch.Tensor,
        schedule: flow.FlowSchedule,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training sigmas for this batch (a family with its own scheme overrides this)."""
        sigmas = flow.sample_training_sigmas(
            latents.shape[0],
            schedule,
            image_seq_len=self.image_seq_len(latents),
            generator=generator,
            device=latents.device,
        )
        return sigmas.clamp(*self.sigma_range)

    def sample_noise_and_sigmas(
        self,
        latents: torch.Tensor,
        schedule: flow.FlowSchedule,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian noise like ``latents`` and one training sigma per sample."""
        if generator is None or isinstance(generator, torch.Generator):
            noise = torch.randn(
                latents.shape, generator=generator, device=latents.device, dtype=torch.float32
            )
            return noise, self.sample_sigmas(latents, schedule, generator=generator)
        if len(generator) != latents.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {latents.shape[0]}")
        # Per-sample generators live on the CPU: draws are the same on every device.
        cpu = latents.detach().to("cpu")
        noise = torch.stack([torch.randn(cpu.shape[1:], generator=g, dtype=torch.float32) for g in generator])
        sigmas = torch.cat(
            [
                self.sample_sigmas(cpu[index : index + 1], schedule, generator=g)
                for index, g in enumerate(generator)
            ]
        )
        return noise.to(latents.device), sigmas.to(latents.device)

    def training_loss(
        self,
        transformer: Denoiser,
        latents: torch.Tensor,
        conditioning: ConditioningBatch,
        schedule: flow.FlowSchedule,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        mask_weights: torch.Tensor | None = None,
    ) -> LossOutput:
        """Noise the latents, run the transformer, and score it against the flow target (fp32).

        ``generator`` is one generator for the whole batch, or one per sample (the training
        loop's: seeded by seed, sample key and step, so a sample is noised the same whichever
        rank trains it).
        """
        latents = latents.to(self.device, torch.float32)
        noise, sigmas = self.sample_noise_and_sigmas(latents, schedule, generator=generator)
        noisy_latents = flow.add_noise(latents, noise, sigmas)
        prediction = self.predict(transformer, noisy_latents, sigmas, conditioning)
        target = flow.velocity_target(latents, noise, direction=self.target_direction)
        loss = self.weighted_loss(prediction, target, sigmas, mask_weights)
        return LossOutput(loss=loss, sigmas=sigmas, timesteps=self.timesteps_from_sigmas(sigmas))

    # ---- inference -----------------------------------------------------------------------------

    def build_pipeline(
        self, transformer: torch.nn.Module | None = None, **components: Any
    ) -> DiffusionPipeline:
        """The family's diffusers pipeline from ``model_path``, around ``transformer`` when given."""
        if transformer is not None:
            components["transformer"] = transformer
        pipeline = self.pipeline_class.from_pretrained(
            self.model_path, dtype=self.dtype, **self._load_kwargs(), **components
        )
        return pipeline.to(self.device)

    @abstractmethod
    def pipeline_components(self, *, allow_unscreened: bool) -> dict[str, Any]:
        """Extra components :meth:`build_pipeline` needs to run (Cosmos2: its safety checker).

        ``allow_unscreened`` lets a family without its screening package installed run anyway
        (validation inside training); it is never the default for user-facing generation.
        """

    def generation_components(self, *, screened: bool) -> dict[str, Any]:
        """Extra components of a pipeline built for ``raytuner generate``: with ``screened`` the
        family's safety checker (its package must be installed), else a pass-through where the
        pipeline insists on one. Nothing for a family without screening."""
        return {}

    def prompt_refusal(self, pipeline: DiffusionPipeline, prompt: str, device: torch.device) -> str | None:
        """Why the pipeline's safety checker refuses ``prompt`` (checked before rendering, so one
        refused prompt of a batch is recorded rather than ending it), or None."""
        return None

    def render(
        self, pipeline: DiffusionPipeline, call: dict[str, Any], *, negative_prompt: str | None
    ) -> Image.Image:
        """One image from the pipeline's own ``__call__`` with the keyword arguments ``call``
        (prompt, steps, guidance, size, generator), and ``negative_prompt`` when given."""
        if negative_prompt is not None:
            call = {**call, "negative_prompt": negative_prompt}
        assert callable(pipeline)  # DiffusionPipeline has no __call__; each pipeline class defines one
        return pipeline(**call).images[0]

    # ---- validation from cached conditioning ---------------------------------------------------

    def build_validation_pipeline(
        self, transformer: torch.nn.Module, *, allow_unscreened: bool = True
    ) -> DiffusionPipeline:
        """The family's pipeline around ``transformer`` (used as it is, never reloaded), for
        :meth:`generate_image`: the components in ``validation_skipped_components`` (the text
        encoder) are neither loaded nor downloaded.

        The VAE is :meth:`load_vae`'s, loaded once per family object, so building again only reads
        the scheduler's and tokenizer's small files; a caller may also keep the pipeline and reuse
        it, since it holds the transformer itself. ``allow_unscreened``: see :meth:`pipeline_components`.
        """
        components: dict[str, Any] = dict.fromkeys(self.validation_skipped_components)
        components.update(self.pipeline_components(allow_unscreened=allow_unscreened))
        pipeline = self.pipeline_class.from_pretrained(
            self.model_path,
            transformer=transformer,
            vae=self.load_vae(),
            **self._load_kwargs(),
            **components,
        )
        # Validation runs inside training, whose log would fill with one progress bar per image.
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(self.device)

    @abstractmethod
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
        """One image of ``prompt`` through ``pipeline`` (:meth:`build_validation_pipeline`), from
        the prompt's cached ``conditioning`` rather than its text.

        ``negative`` is the negative prompt's cached conditioning; None asks for the family's own
        default where it has one. ``disable_cfg`` renders the conditional prediction alone.
        """
