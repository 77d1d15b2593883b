"""The config.json and multidatabackend.json keys raytuner honours, each shown changing what it does.

Every test here is named by a ``honoured`` row of ``raytuner/config/data/compatibility.tsv``;
each sets its key through a real config file (``write_run``) and checks the effect, not just
that the value was read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from raytuner import flow
from raytuner.adapters import build_adapter
from raytuner.cache.settings import encoder_identities, model_path_of
from raytuner.config import ConfigError, load_config, record_seed
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.registry import get_family
from raytuner.models.tiny import build_tiny_checkpoint
from raytuner.train.schedule import flow_schedule_from_config
from raytuner.train.step import train_step

SIGMA_SAMPLES = 20_000
# Image tokens of a 1024 px Cosmos2 image (128 x 128 latents, 2 x 2 patches).
LARGE_IMAGE_SEQ_LEN = 4096


def _family_of(config_path: Path) -> str:
    training = load_config(config_path).training
    return get_family(training.model.model_family).name


def test_model_family_selects_the_family(write_run: Any) -> None:
    assert _family_of(write_run(config_updates={"model_family": "cosmos2image"})) == "cosmos2image"
    assert _family_of(write_run(config_updates={"model_family": "cosmos"})) == "cosmos2image"
    assert _family_of(write_run(config_updates={"model_family": "omnigen"})) == "omnigen"
    with pytest.raises(ConfigError) as other:
        load_config(write_run(config_updates={"model_family": "flux"}))
    assert list(other.value.problems) == [
        "config.json: model_family 'flux' is not supported by raytuner (supported: cosmos2image, omnigen)"
    ]
    with pytest.raises(ConfigError) as typo:
        load_config(write_run(config_updates={"model_family": "omnigne"}))
    assert "unknown model family (did you mean 'omnigen'?)" in typo.value.problems[0]


@pytest.mark.parametrize(
    ("family", "flavour", "hub_id"),
    [
        ("cosmos2image", None, "nvidia/Cosmos-Predict2-2B-Text2Image"),
        ("cosmos2image", "14b", "nvidia/Cosmos-Predict2-14B-Text2Image"),
        ("cosmos2image", "2B", "nvidia/Cosmos-Predict2-2B-Text2Image"),
        ("omnigen", "v1", "Shitao/OmniGen-v1-diffusers"),
    ],
)
def test_model_flavour_picks_the_hub_checkpoint(
    write_run: Any, family: str, flavour: str | None, hub_id: str
) -> None:
    updates: dict[str, Any] = {"model_family": family}
    if flavour is not None:
        updates["model_flavour"] = flavour
    training = load_config(write_run(config_updates=updates)).training
    resolved = get_family(training.model.model_family).resolve_model_path(
        training.model.model_flavour, training.model.pretrained_model_name_or_path
    )
    assert resolved == hub_id
    with pytest.raises(ConfigError, match="'model_flavour' = 'xl': expected a cosmos2image flavour: 2b, 14b"):
        load_config(write_run(config_updates={"model_flavour": "xl"}))


def test_pretrained_model_name_or_path_loads_that_checkpoint(write_run: Any, tiny_cosmos_dir: Path) -> None:
    training = load_config(
        write_run(
            config_updates={"model_flavour": "14b", "pretrained_model_name_or_path": str(tiny_cosmos_dir)}
        )
    ).training
    path = get_family(training.model.model_family).resolve_model_path(
        training.model.model_flavour, training.model.pretrained_model_name_or_path
    )
    assert path == str(tiny_cosmos_dir)
    transformer = get_family(training.model.model_family)(path).load_transformer()
    tiny_width = json.loads((tiny_cosmos_dir / "transformer" / "config.json").read_text())[
        "num_attention_heads"
    ]
    assert transformer.config.num_attention_heads == tiny_width


HUB_ID = "raytuner-test/tiny-cosmos"
MAIN_COMMIT, V2_COMMIT = "a" * 40, "b" * 40


def _first_weight(family: Any) -> torch.Tensor:
    return next(family.load_transformer().parameters()).detach()


def test_revision_loads_that_hub_revision(
    write_run: Any, tiny_cosmos_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hugging Face cache (offline) holds the repo at main and at tag v2 with other weights; the
    revision picks the weights training loads and the snapshot the cache's encoder identity reads."""
    from huggingface_hub import constants

    tagged = build_tiny_checkpoint("cosmos2image", tmp_path / "tiny-seed-1", seed=1)
    repo = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    for ref, commit, source in (("main", MAIN_COMMIT, tiny_cosmos_dir), ("v2", V2_COMMIT, tagged)):
        shutil.copytree(source, repo / "snapshots" / commit)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def loaded(updates: dict[str, Any]) -> tuple[torch.Tensor, str]:
        run = load_config(write_run(config_updates={"pretrained_model_name_or_path": HUB_ID, **updates}))
        # The family as the training loop and the cache build make it.
        family = get_family(run.training.model.model_family)(
            model_path_of(run), revision=run.training.model.revision
        )
        vae, _ = encoder_identities(run, family)
        return _first_weight(family), vae.identity["commit"]

    main_weight, main_commit = loaded({})
    v2_weight, v2_commit = loaded({"revision": "v2"})
    family_class = get_family("cosmos2image")
    assert torch.equal(main_weight, _first_weight(family_class(str(tiny_cosmos_dir))))
    assert torch.equal(v2_weight, _first_weight(family_class(str(tagged))))
    assert not torch.equal(main_weight, v2_weight)
    assert (main_commit, v2_commit) == (MAIN_COMMIT, V2_COMMIT)


def test_model_type_full_is_refused(write_run: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_run(config_updates={"model_type": "full"}))
    assert list(caught.value.problems) == [
        "config.json: 'model_type' = 'full': expected 'lora'; raytuner trains LoKr adapters only; "
        'set "model_type": "lora"'
    ]


def test_lora_type_must_be_lycoris(write_run: Any) -> None:
    config = {key: value for key, value in load_base(write_run).items() if key != "lora_type"}
    with pytest.raises(ConfigError) as left_out:
        load_config(write_run(config=config))
    assert (
        "'lora_type' = \"standard (SimpleTuner's default)\": expected 'lycoris'" in left_out.value.problems[0]
    )
    with pytest.raises(ConfigError, match="'lora_type' = 'standard': expected 'lycoris'"):
        load_config(write_run(config_updates={"lora_type": "standard"}))


def load_base(write_run: Any) -> dict[str, Any]:
    return json.loads(write_run().read_text())


def _trainable_parameters(config_path: Path, model_dir: Path) -> int:
    run = load_config(config_path)
    assert run.lycoris is not None
    family = get_family(run.training.model.model_family)(model_dir)
    network, _ = build_adapter(
        family.load_transformer(), run.lycoris, module_aliases=family.module_aliases, seed=0
    )
    return sum(parameter.numel() for parameter in network.parameters() if parameter.requires_grad)


def test_lycoris_config_builds_the_adapter(write_run: Any, tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    config_path = write_run()
    (tmp_path / "lycoris_small.json").write_text(
        json.dumps({"algo": "lokr", "linear_dim": 1, "linear_alpha": 1, "factor": 4}), encoding="utf-8"
    )
    (tmp_path / "lycoris_large.json").write_text(
        json.dumps({"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4}), encoding="utf-8"
    )
    config = json.loads(config_path.read_text())
    sizes = []
    for name in ("lycoris_small.json", "lycoris_large.json"):
        config["lycoris_config"] = name
        config_path.write_text(json.dumps(config), encoding="utf-8")
        sizes.append(_trainable_parameters(config_path, tiny_cosmos_dir))
    assert 0 < sizes[0] < sizes[1]


def test_data_backend_config_lists_the_runs_datasets(write_run: Any, tmp_path: Path) -> None:
    config_path = write_run()
    other = [
        {"id": "portraits", "type": "local", "instance_data_dir": "images"},
        {"id": "captions", "type": "local", "dataset_type": "text_embeds", "default": True},
    ]
    (tmp_path / "other.json").write_text(json.dumps(other), encoding="utf-8")
    assert [d.id for d in load_config(config_path).datasets] == ["images", "text"]
    config = json.loads(config_path.read_text())
    config["data_backend_config"] = "other.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    run = load_config(config_path)
    assert [d.id for d in run.datasets] == ["portraits", "captions"]
    assert run.sources["data_backend_config"] == tmp_path / "other.json"


def test_output_dir_receives_the_runs_records(write_run: Any, tmp_path: Path) -> None:
    run = load_config(write_run(config_updates={"output_dir": "runs/first", "seed": None}))
    assert run.training.output_dir == tmp_path / "runs" / "first"
    record_seed(run)
    written = tmp_path / "runs" / "first" / "raytuner_seed.json"
    assert json.loads(written.read_text())["seed"] == run.seed
    assert load_config(write_run(config_updates={"output_dir": "runs/first", "seed": None})).seed == run.seed


def test_seed_seeds_the_adapter_initialisation(write_run: Any, tiny_cosmos_dir: Path) -> None:
    def initial_weights(seed: int) -> dict[str, torch.Tensor]:
        run = load_config(write_run(config_updates={"seed": seed}))
        assert run.lycoris is not None
        family = get_family(run.training.model.model_family)(tiny_cosmos_dir)
        network, _ = build_adapter(
            family.load_transformer(), run.lycoris, module_aliases=family.module_aliases, seed=run.seed
        )
        return {key: value.clone() for key, value in network.state_dict().items()}

    first, again, other = initial_weights(1), initial_weights(1), initial_weights(2)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def _sigmas(write_run: Any, updates: dict[str, Any], *, image_seq_len: int = 256) -> torch.Tensor:
    training = load_config(write_run(config_updates=updates)).training
    return flow.sample_training_sigmas(
        SIGMA_SAMPLES,
        flow_schedule_from_config(training.flow),
        image_seq_len=image_seq_len,
        generator=torch.Generator().manual_seed(0),
    )


def test_flow_schedule_shift_moves_sigmas_towards_noise(write_run: Any) -> None:
    unshifted = _sigmas(write_run, {"flow_schedule_shift": 1.0})
    shifted = _sigmas(write_run, {"flow_schedule_shift": 3.0})
    default = _sigmas(write_run, {})  # SimpleTuner's default shift is 3.0
    assert shifted.mean() > unshifted.mean() + 0.1
    assert torch.equal(default, shifted)
    # 0 means "no shift", as in SimpleTuner.
    assert torch.equal(_sigmas(write_run, {"flow_schedule_shift": 0}), unshifted)


def test_flow_schedule_auto_shift_follows_the_image_size(write_run: Any) -> None:
    updates = {"flow_schedule_auto_shift": True, "flow_schedule_shift": 0}
    small = _sigmas(write_run, updates, image_seq_len=256)
    large = _sigmas(write_run, updates, image_seq_len=LARGE_IMAGE_SEQ_LEN)
    static = _sigmas(write_run, {"flow_schedule_shift": 0}, image_seq_len=LARGE_IMAGE_SEQ_LEN)
    assert large.mean() > small.mean() + 0.05
    assert not torch.equal(large, static)


def test_flow_sigmoid_scale_spreads_the_sigmas(write_run: Any) -> None:
    narrow = _sigmas(write_run, {"flow_sigmoid_scale": 0.5, "flow_schedule_shift": 0})
    wide = _sigmas(write_run, {"flow_sigmoid_scale": 2.0, "flow_schedule_shift": 0})
    assert wide.std() > narrow.std() * 1.5


def test_flow_use_uniform_schedule_samples_uniformly(write_run: Any) -> None:
    sigmas = _sigmas(write_run, {"flow_use_uniform_schedule": True, "flow_schedule_shift": 0})
    logit_normal = _sigmas(write_run, {"flow_schedule_shift": 0})
    # Uniform(0, 1) has standard deviation 1/sqrt(12) = 0.289; sigmoid(N(0, 1)) about 0.21.
    assert sigmas.std().item() == pytest.approx(12**-0.5, abs=0.01)
    assert logit_normal.std() < 0.23
    # Uniform wins over the Beta schedule when both are set, as in SimpleTuner.
    both = _sigmas(
        write_run,
        {"flow_use_uniform_schedule": True, "flow_use_beta_schedule": True, "flow_schedule_shift": 0},
    )
    assert torch.equal(both, sigmas)


def test_flow_use_beta_schedule_samples_a_beta_distribution(write_run: Any) -> None:
    sigmas = _sigmas(write_run, {"flow_use_beta_schedule": True, "flow_schedule_shift": 0})
    assert sigmas.mean().item() == pytest.approx(0.5, abs=0.01)  # Beta(2, 2), SimpleTuner's defaults
    assert sigmas.std().item() == pytest.approx(0.05**0.5, abs=0.01)


def test_flow_beta_schedule_alpha_sets_the_beta_distribution(write_run: Any) -> None:
    sigmas = _sigmas(
        write_run, {"flow_use_beta_schedule": True, "flow_beta_schedule_alpha": 6.0, "flow_schedule_shift": 0}
    )
    assert sigmas.mean().item() == pytest.approx(6 / 8, abs=0.01)


def test_flow_beta_schedule_beta_sets_the_beta_distribution(write_run: Any) -> None:
    sigmas = _sigmas(
        write_run, {"flow_use_beta_schedule": True, "flow_beta_schedule_beta": 6.0, "flow_schedule_shift": 0}
    )
    assert sigmas.mean().item() == pytest.approx(2 / 8, abs=0.01)


@pytest.fixture(scope="module")
def cosmos_batch(tiny_checkpoints: dict[str, Path]) -> tuple[Any, torch.Tensor, Any]:
    family = get_family("cosmos2image")(tiny_checkpoints["cosmos2image"])
    items = synthetic_images(2, width=64, height=64)
    latents = family.encode_images(to_pixels([item.image for item in items]))
    conditioning = family.collate_conditioning(family.encode_prompts([item.caption for item in items]))
    return family, latents, conditioning


def _gradients_after_one_step(
    write_run: Any, cosmos_batch: Any, updates: dict[str, Any]
) -> list[torch.Tensor]:
    family, latents, conditioning = cosmos_batch
    run = load_config(write_run(config_updates=updates))
    assert run.lycoris is not None
    transformer = family.load_transformer()
    network, _ = build_adapter(transformer, run.lycoris, module_aliases=family.module_aliases, seed=0)
    parameters = [p for p in network.parameters() if p.requires_grad]
    # lr 0: the step changes nothing, so the gradients left behind are exactly the clipped ones.
    optimizer = torch.optim.SGD(parameters, lr=0.0)
    train_step(
        family,
        transformer,
        parameters,
        optimizer,
        latents,
        conditioning,
        flow_schedule_from_config(run.training.flow),
        generator=torch.Generator().manual_seed(0),
        max_grad_norm=run.training.optimization.max_grad_norm,
        grad_clip_method=run.training.optimization.grad_clip_method,
    )
    return [p.grad.detach().clone() for p in parameters if p.grad is not None]


def test_max_grad_norm_bounds_the_gradients(write_run: Any, cosmos_batch: Any) -> None:
    unclipped = _gradients_after_one_step(write_run, cosmos_batch, {"max_grad_norm": 0})
    clipped = _gradients_after_one_step(write_run, cosmos_batch, {"max_grad_norm": 1e-4})
    largest = max(grad.abs().max().item() for grad in unclipped)
    assert largest > 1e-4
    assert max(grad.abs().max().item() for grad in clipped) <= 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(unclipped, clipped, strict=True))


def test_grad_clip_method_norm_clips_the_total_norm(write_run: Any, cosmos_batch: Any) -> None:
    threshold = 1e-3
    by_value = _gradients_after_one_step(write_run, cosmos_batch, {"max_grad_norm": threshold})
    by_norm = _gradients_after_one_step(
        write_run, cosmos_batch, {"max_grad_norm": threshold, "grad_clip_method": "norm"}
    )
    norm_of = torch.nn.utils.get_total_norm
    assert norm_of(by_norm).item() == pytest.approx(threshold, rel=1e-3)
    assert norm_of(by_value).item() > threshold  # value clipping bounds elements, not the norm
    # Norm clipping keeps the direction of the gradient; value clipping does not.
    flat_norm, flat_value = (
        torch.cat([g.flatten() for g in by_norm]),
        torch.cat([g.flatten() for g in by_value]),
    )
    assert torch.nn.functional.cosine_similarity(flat_norm, flat_value, dim=0) < 0.9999


# --- multidatabackend.json -------------------------------------------------------------------


def test_dataset_id_names_each_dataset_and_must_be_unique(write_run: Any) -> None:
    datasets = [
        {"id": "portraits", "type": "local", "instance_data_dir": "images"},
        {"id": "captions", "type": "local", "dataset_type": "text_embeds"},
    ]
    run = load_config(write_run(datasets=datasets))
    assert [dataset.id for dataset in run.datasets] == ["portraits", "captions"]
    duplicate = [datasets[0], {**datasets[0]}, datasets[1]]
    with pytest.raises(ConfigError, match="dataset id 'portraits' is used 2 times"):
        load_config(write_run(datasets=duplicate))


def test_dataset_type_sets_the_role_of_each_entry(write_run: Any) -> None:
    datasets = [
        {"id": "train", "type": "local", "instance_data_dir": "images"},
        {"id": "held-out", "type": "local", "instance_data_dir": "images", "dataset_type": "eval"},
        {"id": "captions", "type": "local", "dataset_type": "text_embeds"},
    ]
    run = load_config(write_run(datasets=datasets))
    assert [(d.id, d.dataset_type, d.needs_images) for d in run.datasets] == [
        ("train", "image", True),
        ("held-out", "eval", True),
        ("captions", "text_embeds", False),
    ]
    only_eval = [datasets[1], datasets[2]]
    with pytest.raises(ConfigError, match="no enabled image dataset"):
        load_config(write_run(datasets=only_eval))
    with pytest.raises(ConfigError, match="'video' is not supported yet"):
        load_config(write_run(datasets=[{**datasets[0], "dataset_type": "video"}, datasets[2]]))


def test_default_chooses_the_text_embeds_dataset(write_run: Any) -> None:
    image = {"id": "train", "type": "local", "instance_data_dir": "images"}
    first = {"id": "first", "type": "local", "dataset_type": "text_embeds"}
    second = {"id": "second", "type": "local", "dataset_type": "text_embeds"}

    def chosen(datasets: list[dict[str, Any]]) -> list[str]:
        run = load_config(write_run(datasets=datasets))
        return [d.id for d in run.datasets if d.dataset_type == "text_embeds" and d.default]

    assert chosen([image, first, {**second, "default": True}]) == ["second"]
    assert chosen([image, first, second]) == ["first"]


def test_disabled_leaves_the_dataset_out(write_run: Any) -> None:
    datasets = [
        {"id": "train", "type": "local", "instance_data_dir": "images"},
        {"id": "old", "type": "local", "instance_data_dir": "images", "disabled": True},
        {"id": "captions", "type": "local", "dataset_type": "text_embeds"},
    ]
    run = load_config(write_run(datasets=datasets))
    assert [d.id for d in run.enabled_datasets] == ["train", "captions"]
    all_disabled = [{**datasets[0], "disabled": True}, datasets[2]]
    with pytest.raises(ConfigError, match="no enabled image dataset"):
        load_config(write_run(datasets=all_disabled))
