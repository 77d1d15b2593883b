"""SimpleTuner's shipped examples (``simpletuner/examples/``), copied unchanged into tests/examples/,
laid out under a test's working directory as they sit in a SimpleTuner checkout (``config/examples/``).

Their paths are relative to the directory SimpleTuner runs from, so with the test's temporary
directory as the working directory every file, output and cache lands there, with the files as
shipped. Their Hugging Face datasets are saved with ``datasets`` under the hub id they name
(``keras-dreambooth/minercraft/`` below the working directory), which raytuner reads as a local
folder: no Hub access, and the dataloader stays as shipped too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.hub_datasets import save_hub_dataset

EXAMPLES = Path(__file__).resolve().parent / "examples"
OMNIGEN_LOKR = "omnigen.lycoris-lokr"


def lay_out_example(root: Path, name: str, *, model: Path, **overrides: Any) -> Path:
    """``config/examples/<name>/`` and the dataloaders below ``root`` with the example's datasets;
    its config.json gets the tiny ``model`` and ``overrides``. Returns the config.json path
    (relative paths in it resolve against ``root``: make it the working directory)."""
    target = root / "config" / "examples"
    shutil.copytree(EXAMPLES, target, dirs_exist_ok=True)
    config_path = target / name / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(
        json.dumps({**config, "pretrained_model_name_or_path": str(model), **overrides}, indent=2),
        encoding="utf-8",
    )
    dataloader = json.loads((root / config["data_backend_config"]).read_text(encoding="utf-8"))
    for dataset in dataloader:
        if dataset.get("type") == "huggingface":
            # Big enough for the example's minimum_image_size (128), small for the tiny VAE.
            save_hub_dataset(root / dataset["dataset_name"], 2, size=(160, 128))
    return config_path
