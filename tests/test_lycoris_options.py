"""What each key of ``lycoris_config.json`` changes in the adapter raytuner builds and trains.

Every case goes through raytuner's own path: the dict is parsed with ``parse_lycoris`` exactly as a
user's file is, the adapter is built with ``build_adapter`` on a copy of a tiny transformer, and the
result is compared with the same config without the key (or with another value). The evidence is
the adapter's parameter shapes, the modules it wraps, the adapted model's output (fixed inputs; a
fixed torch seed in train mode for the dropout keys) or the saved adapter file.

Some keys cannot change anything for raytuner's models, and for some lycoris trains one model and
merges another. Those findings are tests too (``test_option_has_no_effect`` and the strict ``xfail``
cases), so that they fail loudly once lycoris or raytuner changes the behaviour they pin down.
``test_every_lycoris_key_has_a_test`` keeps the list complete as lycoris grows new options.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris
from lycoris.config_sdk import VALID_PRESET_KEYS
from safetensors.torch import load_file

from raytuner.adapters import (
    AdapterError,
    AdapterReport,
    build_adapter,
    load_adapter,
    preserved_lycoris_class_state,
    save_adapter,
)
from raytuner.config.lycoris import known_lycoris_keys, parse_lycoris
from raytuner.models.base import ConditioningBatch, ModelFamily
from raytuner.models.registry import get_family

Raw = dict[str, Any]

COSMOS = "cosmos2image"
OMNIGEN = "omnigen"
WHERE = "lycoris_config.json"

ATTENTION: Raw = {"target_module": ["Attention"]}
# OmniGen's patch embedding holds the only Conv2d layers of either transformer (4 -> 32 channels,
# kernel 2x2); Cosmos2 embeds patches with a Linear.
PATCH_EMBED: Raw = {"target_module": ["OmniGenPatchEmbed"]}

# LyCORIS module names (the saved keys' prefixes) of the layers the cases look at.
TO_Q = "lycoris_transformer_blocks_0_attn1_to_q"  # Cosmos2 Linear 32 -> 32
PROJ_OUT = "lycoris_proj_out"  # Cosmos2 Linear 32 -> 64
PATCH_CONV = "lycoris_patch_embedding_output_image_proj"  # OmniGen Conv2d 4 -> 32, kernel 2x2
PATCH_CONVS = frozenset({PATCH_CONV, "lycoris_patch_embedding_input_image_proj"})
OMNIGEN_FEEDFORWARD = frozenset(
    f"lycoris_layers_{layer}_mlp_{proj}" for layer in (0, 1) for proj in ("gate_up_proj", "down_proj")
)
COSMOS_FEEDFORWARD = frozenset(
    f"lycoris_transformer_blocks_{block}_ff_net_{layer}" for block in (0, 1) for layer in ("0_proj", "2")
)

# to_q under lokr() below: 32 = 4 x 8 on both sides, rank 2 keeps the bigger factor low-rank.
LOKR_TO_Q = {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
# The patch conv under patch_embed_lokr(): out 32 = 2 x 16, in 4 = 2 x 2, the 2x2 kernel in w2_b.
LOKR_PATCH_CONV = {"lokr_w1": (2, 2), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 8)}
LOKR_PATCH_CONV_TUCKER = {
    "lokr_w1": (2, 2),
    "lokr_w2_a": (4, 16),
    "lokr_w2_b": (4, 2),
    "lokr_t2": (4, 4, 2, 2),
}

# An adapter that changes nothing leaves the output bit for bit; any real change moves it by far more.
CHANGED = 1e-3
# The same adapter computed two ways (bypass vs rebuilt weight, merged vs hooked) in fp32.
SAME_FUNCTION = 1e-5
DROPOUT_SEED = 1234


def lokr(apply_preset: Raw | None = ATTENTION, **options: Any) -> Raw:
    """A LoKr config whose bigger Kronecker factor stays low-rank, so rank and alpha both matter.

    The seeds' ``linear_dim: 10000`` makes both factors full matrices, where LoKr ignores
    ``linear_alpha``; the tiny layers need rank 2 to stay below that threshold.
    """
    raw: Raw = {"algo": "lokr", "linear_dim": 2, "linear_alpha": 1, "factor": 4, **options}
    if apply_preset is not None:
        raw["apply_preset"] = copy.deepcopy(apply_preset)
    return raw


def patch_embed_lokr(**options: Any) -> Raw:
    """LoKr on OmniGen's patch-embedding convs, with factor 2 so the 2x2 kernel sits in a low-rank factor."""
    return lokr(PATCH_EMBED, **{"linear_dim": 4, "factor": 2, **options})


# ---- building and running --------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModel:
    family: ModelFamily
    transformer: torch.nn.Module


@dataclass(frozen=True)
class Built:
    family: ModelFamily
    transformer: torch.nn.Module
    network: LycorisNetwork
    report: AdapterReport


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Layers 32 wide gain nothing from a second thread; on shared cores its spin-waits cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_cosmos_dir: Path, tiny_omnigen_dir: Path) -> dict[str, TinyModel]:
    """Both tiny transformers, loaded once; every build adapts a deep copy."""
    models: dict[str, TinyModel] = {}
    for name, folder in ((COSMOS, tiny_cosmos_dir), (OMNIGEN, tiny_omnigen_dir)):
        family = get_family(name)(folder)
        models[name] = TinyModel(family=family, transformer=family.load_transformer())
    return models


def randomise(network: LycorisNetwork) -> None:
    """Seeded non-zero LoKr factors, as after some training.

    LoKr starts as an exact no-op (one factor is zero), so untouched every config would leave the
    output alone. Filled in name order: networks with the same factor names get the same values.
    """
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in sorted(network.named_parameters()):
            if ".lokr_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


def build(tiny: dict[str, TinyModel], raw: Raw, family: str = COSMOS, *, strict: bool = True) -> Built:
    parsed = parse_lycoris(copy.deepcopy(raw), where=WHERE, strict=strict)
    assert parsed.config is not None, parsed.problems
    model = tiny[family]
    transformer = copy.deepcopy(model.transformer)
    network, report = build_adapter(
        transformer, parsed.config, module_aliases=model.family.module_aliases, seed=0
    )
    randomise(network)
    return Built(family=model.family, transformer=transformer, network=network, report=report)


def model_inputs(family: str) -> tuple[torch.Tensor, torch.Tensor, ConditioningBatch]:
    """Fixed inputs; random prompt embeddings stand in for Cosmos2's T5, which the adapter never touches."""
    generator = torch.Generator().manual_seed(0)
    sigmas = torch.tensor([0.6])
    if family == COSMOS:
        latents = torch.randn(1, 16, 1, 8, 8, generator=generator)
        return latents, sigmas, {"prompt_embeds": torch.randn(1, 8, 32, generator=generator)}
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    return latents, sigmas, {"input_ids": [[1, 20, 30, 40, 50]]}


def run_model(
    family: ModelFamily,
    transformer: torch.nn.Module,
    network: LycorisNetwork | None = None,
    *,
    train: bool = False,
) -> torch.Tensor:
    """The transformer's prediction, called as the family's training step calls it."""
    transformer.train(train)
    if network is not None:
        # The LyCORIS modules hang off the network, not the transformer, and read their own flag.
        network.train(train)
    latents, sigmas, conditioning = model_inputs(family.name)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(DROPOUT_SEED)
        return family.predict(transformer, latents, sigmas, conditioning)


def forward(built: Built, *, train: bool = False) -> torch.Tensor:
    return run_model(built.family, built.transformer, built.network, train=train)


def base_output(tiny: dict[str, TinyModel], family: str) -> torch.Tensor:
    model = tiny[family]
    return run_model(model.family, copy.deepcopy(model.transformer))


def module(built: Built, lora_name: str) -> torch.nn.Module:
    found = [lora for lora in built.network.loras if lora.lora_name == lora_name]
    assert found, f"{lora_name} is not wrapped; wrapped: {sorted(lora_names(built))}"
    return found[0]


def shapes(built: Built, lora_name: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module(built, lora_name).named_parameters()}


def parameter_shapes(built: Built) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in built.network.named_parameters()}


def lora_names(built: Built) -> set[str]:
    return {lora.lora_name for lora in built.network.loras}


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same_adapter(a: Built, b: Built) -> None:
    """Same saved tensors and the same outputs, in eval and in (seeded) train mode."""
    state_a, state_b = a.network.state_dict(), b.network.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key
    assert torch.equal(forward(a), forward(b))
    assert torch.equal(forward(a, train=True), forward(b, train=True))


# ---- keys that change the adapter's parameters -----------------------------------------------


@dataclass(frozen=True)
class ShapeCase:
    key: str
    without: Raw
    with_key: Raw
    probe: str
    before: dict[str, tuple[int, ...]]
    after: dict[str, tuple[int, ...]]
    family: str = COSMOS
    variant: str = ""  # names a second case of the same key

    @property
    def id(self) -> str:
        return f"{self.key}-{self.variant}" if self.variant else self.key


SHAPE_CASES = [
    ShapeCase(
        "algo",
        lokr(),
        lokr(algo="lora"),
        TO_Q,
        LOKR_TO_Q,
        {"lora_down.weight": (2, 32), "lora_up.weight": (32, 2)},
    ),
    ShapeCase(
        "linear_dim",
        lokr(),
        lokr(linear_dim=1),
        TO_Q,
        LOKR_TO_Q,
        {**LOKR_TO_Q, "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)},
    ),
    ShapeCase(
        "factor",
        lokr(),
        lokr(factor=2),
        TO_Q,
        LOKR_TO_Q,
        {"lokr_w1": (2, 2), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16)},
    ),
    ShapeCase(
        "full_matrix", lokr(), lokr(full_matrix=True), TO_Q, LOKR_TO_Q, {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}
    ),
    # The smaller factor is only split when the rank is below half of it (4 / 2), hence rank 1.
    ShapeCase(
        "decompose_both",
        lokr(linear_dim=1),
        lokr(linear_dim=1, decompose_both=True),
        TO_Q,
        {"lokr_w1": (4, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)},
        {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)},
    ),
    ShapeCase(
        "unbalanced_factorization",
        lokr(),
        lokr(unbalanced_factorization=True),
        TO_Q,
        LOKR_TO_Q,
        {"lokr_w1": (8, 4), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 8)},
    ),
    ShapeCase("use_scalar", lokr(), lokr(use_scalar=True), TO_Q, LOKR_TO_Q, {**LOKR_TO_Q, "scalar": ()}),
    ShapeCase(
        "weight_decompose",
        lokr(),
        lokr(weight_decompose=True),
        TO_Q,
        LOKR_TO_Q,
        {**LOKR_TO_Q, "dora_scale": (32, 1)},
    ),
    ShapeCase("dora_wd", lokr(), lokr(dora_wd=True), TO_Q, LOKR_TO_Q, {**LOKR_TO_Q, "dora_scale": (32, 1)}),
    ShapeCase(
        "wd_on_output",
        lokr(weight_decompose=True),
        lokr(weight_decompose=True, wd_on_output=False),
        TO_Q,
        {**LOKR_TO_Q, "dora_scale": (32, 1)},
        {**LOKR_TO_Q, "dora_scale": (1, 32)},
    ),
    *(
        # disable_conv_cp, use_cp and use_conv_cp are lycoris's older spellings of use_tucker; lycoris's
        # create_lycoris also reads "disable_conv_cp": true as use_tucker (its alias copies the value).
        ShapeCase(
            spelling,
            patch_embed_lokr(),
            patch_embed_lokr(**{spelling: True}),
            PATCH_CONV,
            LOKR_PATCH_CONV,
            LOKR_PATCH_CONV_TUCKER,
            family=OMNIGEN,
        )
        for spelling in ("use_tucker", "disable_conv_cp", "use_cp", "use_conv_cp")
    ),
    ShapeCase(
        "conv_dim",
        patch_embed_lokr(),
        patch_embed_lokr(conv_dim=2),
        PATCH_CONV,
        LOKR_PATCH_CONV,
        {"lokr_w1": (2, 2), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 8)},
        family=OMNIGEN,
    ),
    ShapeCase(
        "module_algo_map",
        lokr(),
        lokr({**ATTENTION, "module_algo_map": {"Attention": {"factor": 2}}}),
        TO_Q,
        LOKR_TO_Q,
        {"lokr_w1": (2, 2), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16)},
    ),
    # The OmniGen seed names FeedForward; raytuner's alias carries its override to OmniGenFeedForward.
    # gate_up_proj is 32 -> 128: factor 4 splits 128 as 4 x 32, factor 2 as 2 x 64.
    ShapeCase(
        "module_algo_map",
        lokr({"target_module": ["Attention", "FeedForward"]}),
        lokr(
            {"target_module": ["Attention", "FeedForward"], "module_algo_map": {"FeedForward": {"factor": 2}}}
        ),
        "lycoris_layers_0_mlp_gate_up_proj",
        {"lokr_w1": (4, 4), "lokr_w2_a": (32, 2), "lokr_w2_b": (2, 8)},
        {"lokr_w1": (2, 2), "lokr_w2_a": (64, 2), "lokr_w2_b": (2, 16)},
        family=OMNIGEN,
        variant="omnigen",
    ),
    # proj_out is 32 -> 64: factor 4 splits 64 as 4 x 16, factor 2 as 2 x 32.
    ShapeCase(
        "name_algo_map",
        lokr({**ATTENTION, "target_name": ["proj_out"]}),
        lokr({**ATTENTION, "target_name": ["proj_out"], "name_algo_map": {"proj_out": {"factor": 2}}}),
        PROJ_OUT,
        {"lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 8)},
        {"lokr_w1": (2, 2), "lokr_w2_a": (32, 2), "lokr_w2_b": (2, 16)},
    ),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in SHAPE_CASES])
def test_option_changes_parameters(tiny: dict[str, TinyModel], case: ShapeCase) -> None:
    assert shapes(build(tiny, case.without, case.family), case.probe) == case.before
    assert shapes(build(tiny, case.with_key, case.family), case.probe) == case.after


# ---- keys that change which modules are wrapped ----------------------------------------------


@dataclass(frozen=True)
class SelectionCase:
    key: str
    without: Raw
    with_key: Raw
    gained: frozenset[str] = frozenset()
    lost: frozenset[str] = frozenset()
    family: str = COSMOS
    variant: str = ""  # names a second case of the same key

    @property
    def id(self) -> str:
        return f"{self.key}-{self.variant}" if self.variant else self.key


SELECTION_CASES = [
    SelectionCase(
        "target_module",
        lokr(),
        lokr({"target_module": ["Attention", "FeedForward"]}),
        gained=COSMOS_FEEDFORWARD,
    ),
    SelectionCase(
        "target_name", lokr(), lokr({**ATTENTION, "target_name": ["proj_out"]}), gained=frozenset({PROJ_OUT})
    ),
    SelectionCase(
        "exclude_name",
        lokr(),
        lokr({**ATTENTION, "exclude_name": ["transformer_blocks.1.attn2"]}),
        lost=frozenset(
            f"lycoris_transformer_blocks_1_attn2_{layer}" for layer in ("to_q", "to_k", "to_v", "to_out_0")
        ),
    ),
    # As a regular expression "?" makes the "." before it optional, so the pattern matches nothing.
    SelectionCase(
        "use_fnmatch",
        lokr({**ATTENTION, "target_name": ["transformer_blocks.?.ff.net.2"]}),
        lokr({**ATTENTION, "target_name": ["transformer_blocks.?.ff.net.2"], "use_fnmatch": True}),
        gained=frozenset({"lycoris_transformer_blocks_0_ff_net_2", "lycoris_transformer_blocks_1_ff_net_2"}),
    ),
    # lycoris's built-in presets list UNet and other models' block classes under unet_target_module,
    # which LycorisNetwork.apply_preset ignores (and ia3's name patterns match no path here); for these
    # transformers a built-in preset only sets enable_conv. "full" (the default) keeps convs,
    # "full-lin" drops OmniGen's patch-embedding convs.
    SelectionCase("preset", lokr(None), lokr(None, preset="full-lin"), lost=PATCH_CONVS, family=OMNIGEN),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in SELECTION_CASES])
def test_option_changes_module_selection(tiny: dict[str, TinyModel], case: SelectionCase) -> None:
    before = lora_names(build(tiny, case.without, case.family))
    after = lora_names(build(tiny, case.with_key, case.family))
    assert after - before == case.gained
    assert before - after == case.lost


def test_a_preset_file_replaces_the_apply_preset_targets(tiny: dict[str, TinyModel], tmp_path: Path) -> None:
    # lycoris reads a preset that is not a built-in name as a TOML file. create_lycoris applies it
    # after raytuner's apply_preset, so its keys win (and miss raytuner's module aliases).
    preset_file = tmp_path / "feedforward.toml"
    preset_file.write_text('target_module = ["FeedForward"]\n', encoding="utf-8")
    built = build(tiny, lokr(ATTENTION, preset=str(preset_file)))
    assert lora_names(built) == COSMOS_FEEDFORWARD


def test_an_unknown_preset_name_fails_inside_lycoris(tiny: dict[str, TinyModel]) -> None:
    # raytuner passes the name through unchecked; lycoris tries it as a TOML path, prints
    # "Error: cannot read preset file." and then fails a bare assert.
    with pytest.raises(AssertionError):
        build(tiny, lokr(preset="attn_only"))


# ---- keys that change the adapted model's output ---------------------------------------------


@dataclass(frozen=True)
class OutputCase:
    key: str
    without: Raw
    with_key: Raw
    family: str = COSMOS


OUTPUT_CASES = [
    OutputCase("multiplier", lokr(), lokr(multiplier=0.5)),
    OutputCase("linear_alpha", lokr(), lokr(linear_alpha=4)),
    OutputCase("conv_alpha", patch_embed_lokr(), patch_embed_lokr(conv_alpha=0.5), family=OMNIGEN),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.key) for case in OUTPUT_CASES])
def test_option_changes_output(tiny: dict[str, TinyModel], case: OutputCase) -> None:
    without = build(tiny, case.without, case.family)
    with_key = build(tiny, case.with_key, case.family)
    assert parameter_shapes(without) == parameter_shapes(with_key)
    assert max_difference(forward(without), forward(with_key)) > CHANGED


def test_multiplier_zero_gives_back_the_base_model(tiny: dict[str, TinyModel]) -> None:
    base = base_output(tiny, COSMOS)
    assert max_difference(forward(build(tiny, lokr())), base) > CHANGED
    assert torch.equal(forward(build(tiny, lokr(multiplier=0.0))), base)


def test_multiplier_is_not_written_to_the_adapter_file(tiny: dict[str, TinyModel], tmp_path: Path) -> None:
    # The file holds the factors and alpha only; at inference the strength is load_adapter's scale.
    full = load_file(save_adapter(build(tiny, lokr()).network, tmp_path / "full"))
    half = load_file(save_adapter(build(tiny, lokr(multiplier=0.5)).network, tmp_path / "half"))
    assert full.keys() == half.keys()
    assert all(torch.equal(full[key], half[key]) for key in full)


@pytest.mark.parametrize(
    ("key", "family", "raw", "probe", "saved"),
    [
        pytest.param("linear_alpha", COSMOS, lokr(linear_alpha=4), TO_Q, 4.0, id="linear_alpha"),
        pytest.param(
            "conv_alpha", OMNIGEN, patch_embed_lokr(conv_alpha=0.5), PATCH_CONV, 0.5, id="conv_alpha"
        ),
    ],
)
def test_alpha_is_written_to_the_adapter_file(
    tiny: dict[str, TinyModel], tmp_path: Path, key: str, family: str, raw: Raw, probe: str, saved: float
) -> None:
    default = load_file(
        save_adapter(build(tiny, {k: v for k, v in raw.items() if k != key}, family).network, tmp_path / "a")
    )
    changed = load_file(save_adapter(build(tiny, raw, family).network, tmp_path / "b"))
    assert default[f"{probe}.alpha"].item() == 1.0
    assert changed[f"{probe}.alpha"].item() == saved


# ---- keys that change only the training forward pass -----------------------------------------


TRAINING_CASES = [
    # LoKr applies plain dropout only in its bypass forward (see test_option_has_no_effect).
    OutputCase("dropout", lokr(bypass_mode=True), lokr(bypass_mode=True, dropout=0.5)),
    OutputCase("rank_dropout", lokr(), lokr(rank_dropout=0.5)),
    OutputCase("module_dropout", lokr(), lokr(module_dropout=0.5)),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.key) for case in TRAINING_CASES])
def test_option_changes_training_forward(tiny: dict[str, TinyModel], case: OutputCase) -> None:
    without = build(tiny, case.without, case.family)
    with_key = build(tiny, case.with_key, case.family)
    assert max_difference(forward(without, train=True), forward(with_key, train=True)) > CHANGED
    assert torch.equal(forward(without), forward(with_key)), "dropout must not reach eval mode"


def test_module_dropout_one_skips_every_module_in_training(tiny: dict[str, TinyModel]) -> None:
    built = build(tiny, lokr(module_dropout=1.0))
    assert torch.equal(forward(built, train=True), base_output(tiny, COSMOS))


def test_bypass_mode_switches_the_lokr_forward_path(tiny: dict[str, TinyModel]) -> None:
    rebuilt = build(tiny, lokr())
    bypass = build(tiny, lokr(bypass_mode=True))
    assert {lora.bypass_mode for lora in rebuilt.network.loras} == {False}
    assert {lora.bypass_mode for lora in bypass.network.loras} == {True}
    # The same function, computed without building ΔW...
    assert max_difference(forward(rebuilt), forward(bypass)) < SAME_FUNCTION
    # ...but the two paths honour different dropout keys in training.
    for key, bypass_honours in (("dropout", True), ("rank_dropout", False)):
        with_dropout = build(tiny, lokr(bypass_mode=True, **{key: 0.5}))
        changed = max_difference(forward(with_dropout, train=True), forward(bypass, train=True)) > CHANGED
        assert changed is bypass_honours, key


# ---- train_norm ------------------------------------------------------------------------------


def test_train_norm_adds_norm_modules_that_train_nothing(tiny: dict[str, TinyModel]) -> None:
    plain = build(tiny, lokr())
    with_norms = build(tiny, lokr(train_norm=True))
    # Cosmos2's attention has RMSNorm on q and k (2 blocks x 2 attentions x 2); lycoris's NormModule
    # supports torch's LayerNorm and GroupNorm only, so it wraps them with no parameters.
    assert with_norms.report.algo_counts == {"LokrModule": 16, "NormModule": 8}
    assert with_norms.report.trainable_parameters == plain.report.trainable_parameters
    assert_same_adapter(plain, with_norms)


@pytest.mark.parametrize("family", [COSMOS, OMNIGEN])
def test_train_norm_on_weightless_norms_is_refused_before_training(
    tiny: dict[str, TinyModel], family: str
) -> None:
    # Without apply_preset lycoris targets every LayerNorm. Both transformers' LayerNorms (the
    # adaptive norms) have no affine weight, and lycoris's NormModule would fail on the first
    # forward pass reading org_module.weight; raytuner refuses it while building, in one line.
    with pytest.raises(AdapterError, match=r"train_norm wraps \d+ norm layer\(s\) of .* no learnable weight"):
        build(tiny, lokr(None, train_norm=True), family)


# ---- lora_prefix -----------------------------------------------------------------------------


def test_lora_prefix_renames_the_saved_keys(tiny: dict[str, TinyModel], tmp_path: Path) -> None:
    default = save_adapter(build(tiny, lokr()).network, tmp_path / "default")
    renamed = save_adapter(
        build(tiny, lokr({**ATTENTION, "lora_prefix": "lora_unet"})).network, tmp_path / "renamed"
    )
    assert {key.split(".")[0] for key in load_file(default)} == {
        lora.lora_name for lora in build(tiny, lokr()).network.loras
    }
    renamed_keys = load_file(renamed)
    assert renamed_keys and all(key.startswith("lora_unet_transformer_blocks_") for key in renamed_keys)
    # The inference recipe (create_lycoris_from_weights) only knows the default prefix.
    fresh = copy.deepcopy(tiny[COSMOS].transformer)
    with pytest.raises(AdapterError, match="matches no module"):
        load_adapter(renamed, fresh)


# ---- keys that cannot change anything here ---------------------------------------------------


@dataclass(frozen=True)
class NoEffectCase:
    id: str
    key: str
    without: Raw
    with_key: Raw
    family: str = COSMOS
    # Modules the key would act on, asserted present so that "no effect" is not "nothing in scope".
    in_scope: frozenset[str] = field(default_factory=frozenset)


NO_EFFECT_CASES = [
    # create_lycoris passes an explicit argument list to LycorisNetwork and leaves rank_dropout_scale out.
    NoEffectCase(
        "rank_dropout_scale",
        "rank_dropout_scale",
        lokr(rank_dropout=0.5),
        lokr(rank_dropout=0.5, rank_dropout_scale=True),
        in_scope=frozenset({TO_Q}),
    ),
    # LokrModule builds its nn.Dropout but only the bypass forward calls it ("[WARN]LoHa/LoKr
    # haven't implemented normal dropout yet.").
    NoEffectCase("dropout-without-bypass_mode", "dropout", lokr(), lokr(dropout=0.5)),
    # The bypass forward of a Linear never builds ΔW, which is where rank dropout is applied.
    NoEffectCase(
        "rank_dropout-with-bypass_mode",
        "rank_dropout",
        lokr(bypass_mode=True),
        lokr(bypass_mode=True, rank_dropout=0.5),
    ),
    # With both Kronecker factors full (full_matrix, or the seeds' linear_dim 10000), LokrModule sets
    # alpha = rank, i.e. scale 1, whatever linear_alpha says.
    NoEffectCase(
        "linear_alpha-with-full-matrix",
        "linear_alpha",
        lokr(full_matrix=True),
        lokr(full_matrix=True, linear_alpha=4),
    ),
    NoEffectCase("wd_on_output-without-weight_decompose", "wd_on_output", lokr(), lokr(wd_on_output=False)),
    # Cosmos2 has no convolution at all (its patch embedding is a Linear), so the conv-only keys have
    # nothing to act on even when lycoris's default targets wrap every Linear and Conv.
    *(
        NoEffectCase(f"{key}-cosmos2image", key, lokr(None), lokr(None, **{key: value}))
        for key, value in (("use_tucker", True), ("conv_dim", 1), ("conv_alpha", 0.5))
    ),
    # create_lycoris applies the `preset` key's built-in preset (default "full", enable_conv: true)
    # after raytuner's apply_preset, so apply_preset's enable_conv is always overwritten.
    NoEffectCase(
        "enable_conv",
        "enable_conv",
        lokr(None),
        lokr({"enable_conv": False}),
        family=OMNIGEN,
        in_scope=PATCH_CONVS,
    ),
    # Valid preset keys that LycorisNetwork.apply_preset reads nothing from.
    *(
        NoEffectCase(key, key, lokr(), lokr({**ATTENTION, key: [name]}))
        for key, name in (
            ("unet_target_module", "FeedForward"),
            ("unet_target_name", "proj_out"),
            ("text_encoder_target_module", "FeedForward"),
            ("text_encoder_target_name", "proj_out"),
        )
    ),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in NO_EFFECT_CASES])
def test_option_has_no_effect(tiny: dict[str, TinyModel], case: NoEffectCase) -> None:
    without = build(tiny, case.without, case.family)
    with_key = build(tiny, case.with_key, case.family)
    assert case.in_scope <= lora_names(with_key)
    assert_same_adapter(without, with_key)


# Options some lycoris algorithm accepts that are no LycorisConfig field: raytuner warns and drops
# them. None could matter for LoKr anyway: dim/alpha are the per-module spellings of
# linear_dim/linear_alpha (module_algo_map), block_size is DyLoRA's, constraint/rescaled are the OFT
# algorithms', sig_type/use_data_init/mask_group_id are T-LoRA's.
DROPPED_OPTIONS: dict[str, Any] = {
    "dim": 8,
    "alpha": 8,
    "block_size": 8,
    "constraint": 0.01,
    "rescaled": True,
    "sig_type": "last",
    "use_data_init": True,
    "mask_group_id": 1,
}


@pytest.mark.parametrize("key", list(DROPPED_OPTIONS))
def test_option_is_dropped_with_a_warning(tiny: dict[str, TinyModel], key: str) -> None:
    raw = lokr(**{key: DROPPED_OPTIONS[key]})
    parsed = parse_lycoris(copy.deepcopy(raw), where=WHERE, strict=False)
    assert parsed.config is not None
    assert len(parsed.warnings) == 1 and key in parsed.warnings[0], parsed.warnings
    assert key not in parsed.config.create_kwargs()
    assert_same_adapter(build(tiny, lokr()), build(tiny, raw, strict=False))


# ---- where lycoris or raytuner trains one model and saves another ----------------------------


@pytest.mark.parametrize(
    "linear_alpha",
    [
        pytest.param(2, id="linear_alpha-equals-linear_dim"),
        pytest.param(
            4,
            id="linear_alpha-differs-from-linear_dim",
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="lycoris 4.1.3 LokrModule.get_diff_weight scales ΔW by (alpha/dim)**2 when merging, "
                "the forward pass by alpha/dim",
            ),
        ),
    ],
)
def test_the_merged_adapter_file_reproduces_the_trained_model(
    tiny: dict[str, TinyModel], tmp_path: Path, linear_alpha: int
) -> None:
    built = build(tiny, lokr(linear_alpha=linear_alpha))
    trained = forward(built)
    # The seeds' inference recipe: create_lycoris_from_weights(...) then merge_to().
    merged = copy.deepcopy(tiny[COSMOS].transformer)
    load_adapter(save_adapter(built.network, tmp_path), merged, merge=True)
    assert max_difference(run_model(built.family, merged), trained) < SAME_FUNCTION


@pytest.mark.parametrize(
    "bypass_mode",
    [
        pytest.param(False, id="rebuilt-weight"),
        pytest.param(
            True,
            id="bypass_mode",
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="lycoris 4.1.3 LokrModule.bypass_forward never applies dora_scale, while merge_to "
                "does: with bypass_mode (the Cosmos2 seed) DoRA is merged but never trained",
            ),
        ),
    ],
)
def test_weight_decompose_reaches_the_training_forward(tiny: dict[str, TinyModel], bypass_mode: bool) -> None:
    plain = build(tiny, lokr(bypass_mode=bypass_mode))
    decomposed = build(tiny, lokr(bypass_mode=bypass_mode, weight_decompose=True))
    assert max_difference(forward(plain, train=True), forward(decomposed, train=True)) > CHANGED


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(True, id="true"),
        # lycoris's create_lycoris (which SimpleTuner calls) turns Tucker on whenever the key is
        # present, false included; raytuner reads it the same way.
        pytest.param(False, id="false"),
    ],
)
def test_disable_conv_cp_is_read_as_lycoris_reads_it(tiny: dict[str, TinyModel], value: bool) -> None:
    raytuner_tucker = {
        lora.tucker for lora in build(tiny, patch_embed_lokr(disable_conv_cp=value), OMNIGEN).network.loras
    }
    with preserved_lycoris_class_state():
        LycorisNetwork.apply_preset(PATCH_EMBED)
        network = create_lycoris(
            copy.deepcopy(tiny[OMNIGEN].transformer),
            1.0,
            4,
            1.0,
            algo="lokr",
            factor=2,
            disable_conv_cp=value,
        )
    assert {lora.tucker for lora in network.loras} == raytuner_tucker


def test_an_empty_target_module_list_wraps_only_the_named_modules(tiny: dict[str, TinyModel]) -> None:
    built = build(tiny, lokr({"target_module": [], "target_name": ["proj_out"]}))
    assert lora_names(built) == {PROJ_OUT}


# ---- completeness ----------------------------------------------------------------------------

# Keys shown by a dedicated test rather than a case table.
DEDICATED_TESTS = {
    "apply_preset": "test_option_changes_module_selection",
    "bypass_mode": "test_bypass_mode_switches_the_lokr_forward_path",
    "train_norm": "test_train_norm_adds_norm_modules_that_train_nothing",
    "lora_prefix": "test_lora_prefix_renames_the_saved_keys",
}


def test_every_lycoris_key_has_a_test() -> None:
    covered = (
        {case.key for case in SHAPE_CASES}
        | {case.key for case in SELECTION_CASES}
        | {case.key for case in OUTPUT_CASES}
        | {case.key for case in TRAINING_CASES}
        | {case.key for case in NO_EFFECT_CASES}
        | set(DROPPED_OPTIONS)
        | set(DEDICATED_TESTS)
    )
    assert known_lycoris_keys() | set(VALID_PRESET_KEYS) <= covered
