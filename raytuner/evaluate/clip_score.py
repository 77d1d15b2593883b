"""CLIP score: how closely an image matches its prompt, as SimpleTuner's ``evaluation_type: "clip"`` reports it.

For an image I and its prompt C the score is ``100 * max(cos(E_I, E_C), 0)``, where E_I and E_C
are CLIP's image and text embeddings (the projected, pooled outputs of its two towers): the
formula of torchmetrics' ``clip_score``, which SimpleTuner calls. raytuner computes it with
transformers' ``CLIPModel`` and ``CLIPProcessor`` directly, because torchmetrics 1.9 does not fit
here: it loads only a fixed list of hub ids by name (a local CLIP folder is refused), it expects
the models' feature methods to return tensors (transformers 5 returns model outputs), and it
returns only the mean of a batch, where a validation round needs one score per image. Unlike
torchmetrics, the clamp at 0 is applied to each pair's score, not to the batch mean.

Prompts longer than the text tower's context (77 tokens for every OpenAI CLIP) are truncated by
the tokenizer, which keeps the end-of-text token that CLIP pools the prompt's embedding from;
cutting the token ids afterwards, as torchmetrics does, would pool from the wrong position.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image

from raytuner.config.training import DEFAULT_EVALUATION_MODEL, ValidationSection
from raytuner.errors import RaytunerError

CLIP_EVALUATION = "clip"  # the evaluation_type that turns CLIP scoring on
DEFAULT_CLIP_MODEL = DEFAULT_EVALUATION_MODEL
CLIP_MODEL_TYPE = "clip"  # config.json's model_type of a CLIP checkpoint
EVALUATION_MODEL_KEY = "pretrained_evaluation_model_name_or_path"
# Pairs embedded at once: bounds the memory of a long `raytuner generate` batch; validation
# rounds are smaller than this.
SCORE_BATCH_SIZE = 16

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# transformers 5 saves the image processor inside processor_config.json; checkpoints saved by
# earlier versions (the hub's OpenAI CLIPs) carry preprocessor_config.json.
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_HOW_TO_FIX = (
    "give a folder saved with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained, "
    f"or a hub id such as {DEFAULT_CLIP_MODEL}"
)


class ClipScoreError(RaytunerError, ValueError):
    """A one-line reason a CLIP model cannot be used: which model, what is wrong, how to fix it."""


def clip_model_problem(model_name_or_path: str) -> str | None:
    """Why ``model_name_or_path`` cannot be a CLIP model, found without loading it; None when it may be.

    A local folder must hold a CLIP ``config.json``, weights, a tokenizer and an image processor.
    A string that is not an existing path must have the form of a hub id (``owner/name``); with
    the hub offline (``HF_HUB_OFFLINE``), that model must be in the local hub cache. Anything
    else — what a hub id's files hold, whether the hub can be reached — is for loading to tell.
    """
    shown = f"CLIP model {model_name_or_path!r}"
    text = model_name_or_path.strip()
    if not text:
        return f"the CLIP model path is empty; {_HOW_TO_FIX}"
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{shown}: is a file, not a model folder; {_HOW_TO_FIX}"
        return _folder_problem(path, shown)
    if not _is_hub_id(text):
        return f"{shown}: no such folder, and not a hub id (owner/name); {_HOW_TO_FIX}"
    return _offline_hub_problem(text, shown)


def clip_evaluation_problem(validation: ValidationSection) -> str | None:
    """Why the run's CLIP evaluation cannot work, found before Ray starts; None when it is off or may work.

    A relative folder is refused as well: Ray Train starts each worker in a working directory of
    its own, where the same relative path names nothing.
    """
    if validation.evaluation_type != CLIP_EVALUATION:
        return None
    value = validation.pretrained_evaluation_model_name_or_path
    path = Path(value.strip()).expanduser()
    if value.strip() and not path.is_absolute() and path.is_dir():
        return (
            f"'{EVALUATION_MODEL_KEY}' = {value!r}: a relative folder, which the training workers would look "
            f"for in their own working directory; give its absolute path ({path.resolve()})"
        )
    problem = clip_model_problem(value)
    return f"'{EVALUATION_MODEL_KEY}': {problem}" if problem else None


def _folder_problem(folder: Path, shown: str) -> str | None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return f"{shown}: the folder has no config.json; {_HOW_TO_FIX}"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{shown}: config.json is not readable JSON ({type(error).__name__}); {_HOW_TO_FIX}"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != CLIP_MODEL_TYPE:
        return f"{shown}: config.json describes a {model_type!r} model, not CLIP (model_type 'clip'); {_HOW_TO_FIX}"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return f"{shown}: the folder has no weights ({' or '.join(_WEIGHT_FILES[::2])}); {_HOW_TO_FIX}"
    if not (folder / "tokenizer.json").is_file() and not (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        return f"{shown}: the folder has no tokenizer (tokenizer.json, or vocab.json and merges.txt); {_HOW_TO_FIX}"
    if not any((folder / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
        return f"{shown}: the folder has no image processor ({' or '.join(_IMAGE_PROCESSOR_FILES)}); {_HOW_TO_FIX}"
    return None


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _offline_hub_problem(repo_id: str, shown: str) -> str | None:
    import huggingface_hub

    if not huggingface_hub.is_offline_mode():
        return None
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    return (
        f"{shown}: not in the local hub cache, and the hub is offline (HF_HUB_OFFLINE); download it first "
        f"(`hf download {repo_id}`) or give a local CLIP folder"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class ClipScorer:
    """One CLIP model, loaded once, that scores (image, prompt) pairs.

    Prompts longer than the text tower's context (77 tokens for OpenAI's CLIPs) are truncated to
    it, as every CLIP score implementation does: the text beyond it is not seen. The model runs
    in float32 on ``device`` whatever precision training uses, so scores do not depend on it.
    """

    def __init__(
        self, model_name_or_path: str, *, device: str | torch.device = "cpu", revision: str | None = None
    ) -> None:
        problem = clip_model_problem(model_name_or_path)
        if problem is not None:
            raise ClipScoreError(problem)
        from transformers import AutoConfig, CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig

        shown = f"CLIP model {model_name_or_path!r}"
        self.model_name_or_path = model_name_or_path
        self.device = torch.device(device)
        # from_pretrained fails in many ways (OSError for missing files, ValueError, safetensors'
        # and the hub client's own errors, JSON errors): each becomes one line naming the model.
        try:
            config = AutoConfig.from_pretrained(model_name_or_path, revision=revision)
        except Exception as error:
            raise ClipScoreError(
                f"{shown}: cannot read its config ({_first_line(error)}); {_HOW_TO_FIX}"
            ) from None
        if not isinstance(config, CLIPConfig):
            # CLIPModel.from_pretrained would build a CLIP from any config, with random weights.
            raise ClipScoreError(
                f"{shown}: is a {config.model_type!r} model, not CLIP (model_type 'clip'); {_HOW_TO_FIX}"
            )
        # The hub reads no revision as "main"; transformers types the argument as a plain str.
        hub_revision = revision or "main"
        try:
            # output_loading_info=True makes from_pretrained return (model, loading info);
            # transformers' annotation names the model alone.
            model, loading = cast(
                "tuple[CLIPModel, dict[str, list[str]]]",
                CLIPModel.from_pretrained(
                    model_name_or_path, config=config, revision=hub_revision, output_loading_info=True
                ),
            )
            processor = CLIPProcessor.from_pretrained(model_name_or_path, revision=hub_revision)
        except Exception as error:
            raise ClipScoreError(f"{shown}: cannot be loaded ({_first_line(error)}); {_HOW_TO_FIX}") from None
        missing = loading.get("missing_keys") or []
        if missing:
            raise ClipScoreError(
                f"{shown}: its weights lack {len(missing)} of CLIPModel's tensors (e.g. {sorted(missing)[0]}), "
                f"so scores would come from random weights; {_HOW_TO_FIX}"
            )
        # transformers wraps PreTrainedModel.to in functools.wraps, which hides the bound self from mypy.
        self.model: Any = model.to(device=self.device, dtype=torch.float32).eval()  # type: ignore[call-arg]
        self.processor: Any = processor
        text_config = config.text_config
        assert isinstance(text_config, CLIPTextConfig)  # CLIPConfig builds it from a dict or None
        self.max_length: int = int(text_config.max_position_embeddings)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """The CLIP score of each (image, prompt) pair, in order: ``100 * max(cos, 0)``, from 0 to 100.

        Images of any mode and size are converted to RGB and go through the model's own image
        processor (resize, centre crop, normalise). Pairs are embedded a few at a time; a pair's
        score does not depend on the others in its batch.
        """
        if len(images) != len(prompts):
            raise ValueError(
                f"CLIP score: {len(images)} image(s) but {len(prompts)} prompt(s); give one prompt per image"
            )
        scores: list[float] = []
        for start in range(0, len(images), SCORE_BATCH_SIZE):
            chunk = slice(start, start + SCORE_BATCH_SIZE)
            scores += self._score_batch(list(images[chunk]), list(prompts[chunk]))
        return scores

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        inputs = self.processor(
            text=prompts,
            images=[image.convert("RGB") for image in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        ).to(self.device)
        # The towers and projections themselves: what get_image_features / get_text_features
        # compute, whichever type those return in this transformers version.
        model = self.model
        image_embeds = model.visual_projection(
            model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
        )
        text_embeds = model.text_projection(
            model.text_model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).pooler_output
        )
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return (100 * cosine).clamp(min=0).tolist()
