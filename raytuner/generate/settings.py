"""What ``raytuner generate`` renders with, resolved and checked before any model is loaded.

The model's family comes from its ``model_index.json`` (``_class_name`` names the diffusers
pipeline), the adapter from a file, a folder holding ``pytorch_lora_weights.safetensors`` (a
raytuner or SimpleTuner ``output_dir``) or a hub repo id, as the seeds' ``download_adapter`` does.
Unset sampling settings take the family pipeline's own defaults, read from its ``__call__``, so
the index always records the numbers actually used.

Cosmos2's safety policy (``raytuner.models.safety``): the ``cosmos_guardrail`` checker when it is
installed; without it, only an explicit ``--no-safety-checker`` or a tiny test checkpoint renders,
and every index entry says that its image was not screened.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raytuner.adapters import AdapterError, inspect_adapter_file
from raytuner.errors import RaytunerError
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.generate.prompts import parse_resolution
from raytuner.models.registry import get_family, known_families
from raytuner.models.safety import GUARDRAIL_PACKAGE, is_guardrail_installed, is_tiny_checkpoint

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bf16", "fp16", "fp32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class GenerateError(RaytunerError, ValueError):
    """A reason ``raytuner generate`` cannot run, stated in one line."""


@dataclass(frozen=True, kw_only=True)
class Screening:
    """Whether a safety checker screens prompts and images, and why (recorded in the index)."""

    screened: bool
    checker: str | None
    note: str


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """Everything shared by the images of one run; :meth:`fingerprint` covers what changes pixels."""

    model: str
    family: str
    revision: str | None
    adapter: str | None  # a local file; None renders the base model
    adapter_sha256: str | None
    adapter_scale: float
    negative_prompt: str | None  # None: the family pipeline's default negative prompt
    guidance: float
    steps: int
    width: int | None  # None: the pipeline's default size
    height: int | None
    dtype: str
    screening: Screening
    clip_model: str | None

    def fingerprint(self) -> dict[str, Any]:
        """The settings two runs into one folder must share for its images to belong together."""
        return {
            "model": self.model,
            "family": self.family,
            "revision": self.revision,
            "adapter_sha256": self.adapter_sha256,
            "adapter_scale": self.adapter_scale,
            "guidance": self.guidance,
            "steps": self.steps,
            "dtype": self.dtype,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        return cls(**{**data, "screening": Screening(**data["screening"])})


def detect_family(model: str, *, revision: str | None = None, family: str | None = None) -> str:
    """The raytuner family of the diffusers pipeline at ``model`` (a folder or a hub id)."""
    if family is not None:
        get_family(family)  # an unknown name lists the known ones
    class_name = _pipeline_class_name(model, revision=revision, given_family=family)
    if class_name is None:  # a hub id that cannot be reached: the user's --family decides
        assert family is not None
        return family
    by_pipeline = {get_family(name).pipeline_class.__name__: name for name in known_families()}
    detected = by_pipeline.get(class_name)
    if detected is None:
        known = ", ".join(f"{name} ({pipeline})" for pipeline, name in sorted(by_pipeline.items()))
        raise GenerateError(f"--model {model} is a {class_name}; raytuner generates with {known}")
    if family is not None and family != detected:
        raise GenerateError(
            f"--model {model} is a {detected} checkpoint ({class_name}), not --family {family}"
        )
    return detected


def _pipeline_class_name(model: str, *, revision: str | None, given_family: str | None) -> str | None:
    local = Path(model).expanduser()
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise GenerateError(
                f"--model {model} is not a diffusers pipeline folder (it has no model_index.json)"
            )
        return _class_name_of(index, model)
    if not _HUB_ID.match(model):
        raise GenerateError(f"--model {model}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        index = Path(hf_hub_download(model, "model_index.json", revision=revision))
    except LocalEntryNotFoundError:
        if given_family is not None:
            return None
        raise GenerateError(
            f"--model {model}: its model_index.json is neither cached nor reachable on the hub (offline?); "
            "download the model first, or pass --family"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise GenerateError(
            f"--model {model}: cannot read its model_index.json from the hub ({error})"
        ) from None
    return _class_name_of(index, model)


def _class_name_of(index: Path, model: str) -> str:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
        return str(content["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        raise GenerateError(f"--model {model}: its model_index.json has no readable _class_name") from None


def resolve_adapter(adapter: str, *, revision: str | None = None) -> Path:
    """A local adapter file for ``--adapter``: a file, a folder holding one, or a hub repo id."""
    local = Path(adapter).expanduser()
    if local.is_dir():
        candidate = local / ADAPTER_FILENAME
        if not candidate.is_file():
            raise GenerateError(f"--adapter {adapter} is a folder without {ADAPTER_FILENAME}")
        return candidate
    if local.exists() or not _HUB_ID.match(adapter):
        return local  # inspect_adapter_file says what is wrong with it, if anything
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(adapter, ADAPTER_FILENAME, revision=revision))
    except LocalEntryNotFoundError:
        raise GenerateError(
            f"--adapter {adapter}: no such file, and {ADAPTER_FILENAME} of hub repo {adapter} is neither "
            "cached nor reachable"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise GenerateError(f"--adapter {adapter}: cannot download {ADAPTER_FILENAME} ({error})") from None


def screening_for(family: str, model: str, *, no_safety_checker: bool) -> Screening:
    """The safety policy for this model (see the module docstring)."""
    family_cls = get_family(family)
    if not family_cls.screens_images:
        if no_safety_checker:
            logger.warning("--no-safety-checker has no effect: %s pipelines have no safety checker", family)
        return Screening(screened=False, checker=None, note=f"{family} pipelines have no safety checker")
    if no_safety_checker:
        return Screening(
            screened=False,
            checker=None,
            note="not screened: generated with --no-safety-checker",
        )
    if is_guardrail_installed():
        return Screening(screened=True, checker=f"{GUARDRAIL_PACKAGE}.CosmosSafetyChecker", note="screened")
    if is_tiny_checkpoint(model):
        return Screening(
            screened=False,
            checker=None,
            note=f"not screened: a tiny test model ({GUARDRAIL_PACKAGE} is not installed)",
        )
    raise GenerateError(
        f"{family_cls.display_name} generation screens prompts and images with {GUARDRAIL_PACKAGE}'s safety checker, which is "
        f"not installed: `pip install {GUARDRAIL_PACKAGE}` (it downloads its guard models on first use), or "
        "pass --no-safety-checker to generate unscreened images"
    )


def pipeline_defaults(family: str) -> dict[str, Any]:
    """The family pipeline's own ``__call__`` defaults for the settings generate exposes."""
    parameters = inspect.signature(get_family(family).pipeline_class.__call__).parameters
    return {
        "guidance": float(parameters["guidance_scale"].default),
        "steps": int(parameters["num_inference_steps"].default),
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_settings(
    *,
    model: str,
    family: str | None,
    revision: str | None,
    adapter: str | None,
    adapter_scale: float,
    negative_prompt: str | None,
    guidance: float | None,
    steps: int | None,
    resolution: str | None,
    dtype: str,
    no_safety_checker: bool,
    clip_model: str | None,
) -> GenerationSettings:
    """Check every flag and file and return the settings; nothing heavy is loaded."""
    detected = detect_family(model, revision=revision, family=family)
    width = height = None
    if resolution is not None:  # the size rule is the family's
        try:
            width, height = parse_resolution(resolution, multiple=get_family(detected).pixels_per_token)
        except ValueError as error:
            raise GenerateError(str(error)) from None
    if dtype not in DTYPES:
        raise GenerateError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if steps is not None and steps < 1:
        raise GenerateError(f"--steps {steps}: expected at least 1")
    if guidance is not None and guidance < 0:
        raise GenerateError(f"--guidance {guidance}: expected 0 or more")
    adapter_path: Path | None = None
    adapter_sha: str | None = None
    if adapter is not None:
        adapter_path = resolve_adapter(adapter, revision=None)
        try:
            info = inspect_adapter_file(adapter_path)
        except AdapterError as error:
            raise GenerateError(str(error)) from None
        if info.family is not None and info.family != detected:
            raise GenerateError(
                f"--adapter {adapter} was trained for {info.family} (its raytuner_family metadata), but "
                f"--model {model} is a {detected} checkpoint: pass the model it was trained on"
            )
        adapter_sha = file_sha256(adapter_path)
    if clip_model is not None:
        from raytuner.evaluate.clip_score import clip_model_problem

        problem = clip_model_problem(clip_model)
        if problem:
            raise GenerateError(f"--clip-model {clip_model}: {problem}")
    defaults = pipeline_defaults(detected)
    return GenerationSettings(
        model=model,
        family=detected,
        revision=revision,
        adapter=str(adapter_path.resolve()) if adapter_path else None,
        adapter_sha256=adapter_sha,
        adapter_scale=adapter_scale,
        negative_prompt=negative_prompt,
        guidance=defaults["guidance"] if guidance is None else float(guidance),
        steps=defaults["steps"] if steps is None else int(steps),
        width=width,
        height=height,
        dtype=dtype,
        screening=screening_for(detected, model, no_safety_checker=no_safety_checker),
        clip_model=clip_model,
    )
