"""What the driver writes into ``output_dir`` around the adapter: configs as run, model card, pictures.

The three SimpleTuner files are copied as run, with every credential replaced by ``***`` (an
``aws_secret_access_key`` in ``multidatabackend.json`` never leaves the user's machine in an
uploaded model). The model card carries the loading snippet of the seeds' inference example.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from raytuner.adapters import ADAPTER_FILENAME
from raytuner.config import RunConfig
from raytuner.config.redact import redact
from raytuner.evaluate.metrics import read_metrics
from raytuner.models.registry import get_family

logger = logging.getLogger(__name__)

CONFIG_FOLDER = "config"
# Roles in RunConfig.sources copied into output_dir/config/, with the names SimpleTuner uses.
_CONFIG_FILES = {
    "config": "config.json",
    "data_backend_config": "multidatabackend.json",
    "lycoris_config": "lycoris_config.json",
    "user_prompt_library": "user_prompt_library.json",
}


def write_config_copies(run: RunConfig, output_dir: Path) -> list[Path]:
    """The config files as run, redacted, under ``output_dir/config/``; and the resolved run."""
    folder = output_dir / CONFIG_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for role, name in _CONFIG_FILES.items():
        source = run.sources.get(role)
        if source is None:
            continue
        content: Any = json.loads(Path(source).read_text(encoding="utf-8"))
        target = folder / name
        target.write_text(json.dumps(redact(content), indent=2) + "\n", encoding="utf-8")
        written.append(target)
    resolved = folder / "raytuner_resolved.json"
    resolved.write_text(json.dumps(run.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    written.append(resolved)
    return written


def model_card(run: RunConfig, *, steps: int, eval_loss: float | None, ema: bool) -> str:
    training = run.training
    family = get_family(training.model_family)
    base = family.resolve_model_path(training.model_flavour, training.pretrained_model_name_or_path)
    pipeline = family.pipeline_class.__name__
    lycoris = run.to_dict()["lycoris"] or {}
    prompt = training.validation_prompt or "a photo"
    evaluation = f"| eval loss (last) | {eval_loss:.4f} |\n" if eval_loss is not None else ""
    ema_line = (
        f"\nThe EMA of the adapter weights (`ema_decay` {training.ema_decay}) is in "
        f"`ema/{ADAPTER_FILENAME}`; load it the same way.\n"
        if ema
        else ""
    )
    return f"""---
base_model: {base}
library_name: diffusers
tags:
- lycoris
- lokr
- {training.model_family}
- raytuner
---

# LyCORIS LoKr adapter for {base}

Trained with raytuner from SimpleTuner configuration files (copied, redacted, in `config/`).

| setting | value |
| --- | --- |
| model family | {training.model_family} |
| steps | {steps} |
| learning rate | {training.learning_rate} ({training.lr_scheduler}) |
| optimizer | {training.optimizer} |
| batch size per worker | {training.train_batch_size} |
| gradient accumulation steps | {training.gradient_accumulation_steps} |
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


def write_model_card(run: RunConfig, output_dir: Path, *, steps: int, eval_loss: float | None) -> Path:
    path = output_dir / "README.md"
    ema = (output_dir / "ema" / ADAPTER_FILENAME).is_file()
    path.write_text(model_card(run, steps=steps, eval_loss=eval_loss, ema=ema), encoding="utf-8")
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

    steps = sorted(
        (p for p in (output_dir / "validation").glob("step_*") if p.is_dir()),
        key=lambda p: int(p.name.split("_")[1]),
    )
    if not steps:
        return None
    images = [(path.stem, Image.open(path).convert("RGB")) for path in sorted(steps[-1].glob("*.png"))]
    if not images:
        return None
    return save_image_grid(images, output_dir / "validation" / "grid.png")
