"""What the driver writes into ``output_dir`` around the adapter: configs as run, model card, pictures.

The three SimpleTuner files are copied as run, with every credential replaced by ``***`` (an
``aws_secret_access_key`` in ``multidatabackend.json`` never leaves the user's machine in an
uploaded model). The model card carries the loading snippet of the seeds' inference example and
the Hub's front matter (base model, license, tags, a widget of the newest validation images), so
the same README.md reads right in ``output_dir`` and as the card of a Hub repo (raytuner/hub.py
uploads it with the files its widget points to, at the same paths).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytuner.config import RunConfig
from raytuner.config.formats import options_as_object
from raytuner.config.redact import redact
from raytuner.evaluate.metrics import read_metrics
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.models.registry import get_family

logger = logging.getLogger(__name__)

CONFIG_FOLDER = "config"
MODEL_CARD_FILENAME = "README.md"
VALIDATION_FOLDER = "validation"
STEP_FOLDER_PREFIX = "step_"
# Roles in RunConfig.sources copied into output_dir/config/, with the names SimpleTuner uses.
_CONFIG_FILES = {
    "config": "config.json",
    "data_backend_config": "multidatabackend.json",
    "lycoris_config": "lycoris_config.json",
    "user_prompt_library": "user_prompt_library.json",
}
# The Hub's tag for models whose outputs need not be safe for work; SimpleTuner adds it unless
# model_card_safe_for_work is set.
NOT_FOR_ALL_AUDIENCES = "not-for-all-audiences"


def write_config_copies(run: RunConfig, output_dir: Path) -> list[Path]:
    """The config files as run, redacted, under ``output_dir/config/`` (the options of any config
    format as ``config.json``); and the resolved run."""
    folder = output_dir / CONFIG_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for role, name in _CONFIG_FILES.items():
        source = run.sources.get(role)
        if source is None:
            continue
        # A config.toml or config.env is copied as the config.json of the options it held.
        content: Any = (
            options_as_object(Path(source))
            if role == "config"
            else json.loads(Path(source).read_text(encoding="utf-8"))
        )
        target = folder / name
        target.write_text(json.dumps(redact(content), indent=2) + "\n", encoding="utf-8")
        written.append(target)
    resolved = folder / "raytuner_resolved.json"
    resolved.write_text(json.dumps(run.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    written.append(resolved)
    return written


@dataclass(frozen=True, kw_only=True)
class CardImage:
    """A validation image the card's widget shows: its path relative to the card, and its prompt."""

    path: str
    prompt: str


def validation_step_folders(output_dir: Path) -> list[Path]:
    """``output_dir/validation/step_N`` folders, oldest step first."""
    folders = [
        path
        for path in (output_dir / VALIDATION_FOLDER).glob(f"{STEP_FOLDER_PREFIX}*")
        if path.is_dir() and path.name.removeprefix(STEP_FOLDER_PREFIX).isdigit()
    ]
    return sorted(folders, key=lambda path: int(path.name.removeprefix(STEP_FOLDER_PREFIX)))


def card_images(
    run: RunConfig, output_dir: Path, *, prompts: Mapping[str, str], step: int | None = None
) -> list[CardImage]:
    """The trained weights' images of one validation step (default: the newest), with their prompts.

    The unconditional image (empty prompt) and the EMA twins stay out of the widget: the Hub shows
    each entry as "prompt -> image", and the EMA images would repeat every prompt.
    """
    from raytuner.evaluate.validation import image_filename, parse_validation_resolutions

    if step is None:
        folders = validation_step_folders(output_dir)
        if not folders:
            return []
        folder = folders[-1]
    else:
        folder = output_dir / VALIDATION_FOLDER / f"{STEP_FOLDER_PREFIX}{step}"
    family = get_family(run.training.model.model_family)
    sizes = parse_validation_resolutions(
        run.training.validation.validation_resolution, multiple=family.pixels_per_token
    )
    images = []
    for nickname, prompt in prompts.items():
        if not prompt.strip():
            continue
        for width, height in sizes:
            name = image_filename(nickname, width, height)
            if (folder / name).is_file():
                images.append(CardImage(path=f"{VALIDATION_FOLDER}/{folder.name}/{name}", prompt=prompt))
    return images


def base_model_ids(run: RunConfig) -> tuple[str, str | None]:
    """The base model's hub id for the card, and the local folder it was trained from (or None).

    The Hub links a model to its base by id only, and a card must not carry a path of the
    machine it was written on: a local folder is taken to be a copy of the flavour's hub id.
    """
    training = run.training
    family = get_family(training.model.model_family)
    base = family.resolve_model_path(
        training.model.model_flavour, training.model.pretrained_model_name_or_path
    )
    if not Path(base).expanduser().exists():
        return base, None
    return family.resolve_model_path(training.model.model_flavour, None), Path(base).name


def card_front_matter(run: RunConfig, *, images: Sequence[CardImage] = ()) -> str:
    """The card's YAML block (without the ``---`` fences), as the Hub reads it."""
    from huggingface_hub import ModelCardData

    training = run.training
    hub_id, _ = base_model_ids(run)
    tags = ["lycoris", "lokr", training.model.model_family, "text-to-image", "diffusers", "raytuner"]
    if not training.tracking.model_card_safe_for_work:
        tags.append(NOT_FOR_ALL_AUDIENCES)
    data = ModelCardData(
        base_model=hub_id,
        library_name="diffusers",
        **get_family(training.model.model_family).card_license,
        pipeline_tag="text-to-image",
        tags=tags,
        widget=[{"text": image.prompt, "output": {"url": image.path}} for image in images] or None,
    )
    return data.to_yaml()


def model_card(
    run: RunConfig,
    *,
    steps: int,
    eval_loss: float | None,
    ema: bool,
    images: Sequence[CardImage] = (),
) -> str:
    training = run.training
    family = get_family(training.model.model_family)
    base, local_copy = base_model_ids(run)
    pipeline = family.pipeline_class.__name__
    lycoris = run.to_dict()["lycoris"] or {}
    prompt = training.validation.validation_prompt or "a photo"
    evaluation = f"| eval loss (last) | {eval_loss:.4f} |\n" if eval_loss is not None else ""
    card_note = (training.tracking.model_card_note or "").strip()
    note = f"{card_note}\n\n" if card_note else ""
    origin = (
        f"Trained from a local copy of the base model (`{local_copy}`), taken to be `{base}` "
        f"(model_flavour {training.model.model_flavour}).\n\n"
        if local_copy
        else ""
    )
    ema_line = (
        f"\nThe EMA of the adapter weights (`ema_decay` {training.optimization.ema_decay}) is in "
        f"`ema/{ADAPTER_FILENAME}`; load it the same way.\n"
        if ema
        else ""
    )
    return f"""---
{card_front_matter(run, images=images)}
---

# LyCORIS LoKr adapter for {base}

{note}{origin}Trained with raytuner from SimpleTuner configuration files (copied, redacted, into `config/` of
the training output folder).

| setting | value |
| --- | --- |
| model family | {training.model.model_family} |
| steps | {steps} |
| learning rate | {training.optimization.learning_rate} ({training.optimization.lr_scheduler}) |
| optimizer | {training.optimization.optimizer} |
| batch size per worker | {training.optimization.train_batch_size} |
| gradient accumulation steps | {training.optimization.gradient_accumulation_steps} |
| LoKr | algo {lycoris.get("algo", "lokr")}, factor {lycoris.get("factor", "")}, multiplier {lycoris.get("multiplier", "")} |
| seed | {run.seed} |
{evaluation}
## Use it

```python
import torch
from diffusers import {pipeline}
from lycoris import create_lycoris_from_weights

pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.bfloat16)
wrapper, _ = create_lycoris_from_weights(1.0, "{ADAPTER_FILENAME}", pipe.transformer)
wrapper.merge_to()
pipe.to("cuda")

image = pipe(prompt={json.dumps(prompt)}, generator=torch.Generator().manual_seed(1)).images[0]
image.save("output.png")
```
{ema_line}
Validation images are under `validation/step_N/`; the loss curve is `loss.png`.
"""


def write_model_card(
    run: RunConfig,
    output_dir: Path,
    *,
    steps: int,
    eval_loss: float | None,
    prompts: Mapping[str, str] | None = None,
) -> Path:
    """``output_dir/README.md``; its widget shows the newest validation step's images.

    ``prompts`` (nickname -> prompt) default to the config's validation prompts.
    """
    if prompts is None:
        from raytuner.cache.settings import role_prompts

        prompts = role_prompts(run)["validation"]
    path = output_dir / MODEL_CARD_FILENAME
    ema = (output_dir / "ema" / ADAPTER_FILENAME).is_file()
    images = card_images(run, output_dir, prompts=prompts)
    path.write_text(
        model_card(run, steps=steps, eval_loss=eval_loss, ema=ema, images=images), encoding="utf-8"
    )
    return path


def write_loss_curve(output_dir: Path, *, title: str) -> Path | None:
    from raytuner.evaluate.plots import save_loss_curve

    entries = read_metrics(output_dir / "logs" / "metrics.jsonl")
    train = [e for e in entries if e.get("kind", "train") == "train" and "loss" in e]
    evals = [e for e in entries if e.get("kind") == "eval"]
    if not train:
        return None
    return save_loss_curve(
        [e["step"] for e in train],
        [e["loss"] for e in train],
        output_dir / "loss.png",
        eval_steps=[e["step"] for e in evals] or None,
        eval_losses=[e["eval_loss"] for e in evals] or None,
        title=title,
    )


def write_validation_grid(output_dir: Path) -> Path | None:
    """A grid of the last validation step's images, ``validation/grid.png``."""
    from PIL import Image

    from raytuner.evaluate.plots import save_image_grid

    steps = validation_step_folders(output_dir)
    if not steps:
        return None
    images = [(path.stem, Image.open(path).convert("RGB")) for path in sorted(steps[-1].glob("*.png"))]
    if not images:
        return None
    return save_image_grid(images, output_dir / VALIDATION_FOLDER / "grid.png")
