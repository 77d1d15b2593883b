"""text_encoder_batch_size: the captions the text cache stage encodes per forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from raytuner.cache import format as fmt
from raytuner.cache.settings import text_batch_size
from raytuner.cache.stages import TextEncoder
from raytuner.models.base import PromptConditioning
from tests.cache.helpers import image_dataset, text_dataset, write_run_files

PROMPTS = [f"a red circle number {n} on a blue background" for n in range(5)]


def test_the_dataset_batch_size_wins_over_the_option_and_simpletuners_default_is_one(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    images = image_dataset(tmp_path / "images", tmp_path / "latents")
    plain = [images, text_dataset(tmp_path / "text")]
    own = [images, text_dataset(tmp_path / "text", text_encoder_batch_size=8)]
    assert text_batch_size(write_run_files(tmp_path / "a", tiny_cosmos_dir, plain).load()) == 1
    option = write_run_files(tmp_path / "b", tiny_cosmos_dir, plain, text_encoder_batch_size=3)
    assert text_batch_size(option.load()) == 3
    both = write_run_files(tmp_path / "c", tiny_cosmos_dir, own, text_encoder_batch_size=3)
    assert text_batch_size(both.load()) == 8


@pytest.mark.parametrize("name", ["cosmos2image", "omnigen"])
def test_the_text_stage_encodes_the_configured_number_of_captions_per_pass(
    name: str, tiny_checkpoints: dict[str, Path]
) -> None:
    encoders = {size: TextEncoder(name, str(tiny_checkpoints[name]), None, size) for size in (1, 2)}
    passes: list[int] = []
    family = encoders[2].family
    encode = family.encode_prompts

    def counted(prompts: Sequence[str]) -> list[PromptConditioning]:
        passes.append(len(prompts))
        return encode(prompts)

    family.encode_prompts = counted  # type: ignore[method-assign]
    batch = {"key": [f"k{n}" for n in range(len(PROMPTS))], "prompt": PROMPTS}
    batched = encoders[2](batch)
    assert passes == [2, 2, 1]
    # Padding within a pass is masked out: each caption's conditioning is the one it gets alone.
    single = encoders[1](batch)
    assert batched["key"] == single["key"] and batched["length"] == single["length"]
    for index in range(len(PROMPTS)):
        ours = {name: values[index] for name, values in batched.items()}
        alone = {name: values[index] for name, values in single.items()}
        for tensor in family.prompt_tensors:
            np.testing.assert_allclose(
                fmt.tensor_from_fields(ours, tensor), fmt.tensor_from_fields(alone, tensor), atol=1e-4
            )
