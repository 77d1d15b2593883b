"""The compatibility table against SimpleTuner's own key lists, the loader, the CLI and the docs."""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from raytuner.cli import main
from raytuner.config import ConfigError, load_config
from raytuner.config.compatibility import (
    STATUSES,
    compatibility_table,
    format_markdown,
    honoured_share,
    key_status,
    keys_in,
    status_counts,
)
from raytuner.config.datasets import DATASET_BLOCKS, dataset_keys
from raytuner.config.fields import field_names
from raytuner.config.lycoris import LycorisConfig, known_lycoris_keys
from raytuner.config.surface import config_keys, key_aliases
from raytuner.config.training import TrainingConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SIMPLETUNER_DATA = REPO_ROOT / "raytuner" / "config" / "data"
SEED_CONFIGS = sorted((REPO_ROOT / "configs").glob("*/config.json"))
SEED_CONFIGS = [path for path in SEED_CONFIGS if path.parent.name != "demo"]


def _listed_dataset_keys() -> list[str]:
    """Every key in SimpleTuner's dataset list: top level, nested blocks, UI form ids, internal markers."""
    lines = (SIMPLETUNER_DATA / "dataset_keys.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _alias_keys() -> list[str]:
    lines = (SIMPLETUNER_DATA / "config_key_aliases.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines if line.strip() and " value " not in line.split("\t")[0]]


def test_every_simpletuner_key_has_a_status() -> None:
    config = keys_in("config")
    assert sorted(config_keys() - config) == []
    assert sorted(set(_alias_keys()) - config) == []
    assert sorted(set(_listed_dataset_keys()) - keys_in("dataset")) == []
    assert sorted(known_lycoris_keys() - keys_in("lycoris")) == []
    assert {row.key for row in compatibility_table() if row.scope == "raytuner"} == {
        "ray_num_workers",
        "ray_gpus_per_worker",
        "ray_cpus_per_worker",
        "ray_storage_path",
        "ray_max_failures",
    }


def test_one_row_per_key_and_scope_with_a_known_status() -> None:
    rows = Counter((row.key, row.scope) for row in compatibility_table())
    assert [key for key, count in rows.items() if count > 1] == []
    assert {row.status for row in compatibility_table()} <= set(STATUSES)
    assert all(row.note for row in compatibility_table())


def test_fields_and_table_agree() -> None:
    """A raytuner field is in the table; an honoured key is a field (so the loader keeps it)."""
    for scope, fields in (
        ("config", field_names(TrainingConfig)),
        ("dataset", dataset_keys()),
        ("lycoris", field_names(LycorisConfig)),
    ):
        assert sorted(fields - keys_in(scope)) == [], scope
        honoured = {
            row.key for row in compatibility_table() if row.scope == scope and row.status == "honoured"
        }
        # A block (and its dotted keys) is read by its dataset's parser, not kept as a field.
        blocks = set(DATASET_BLOCKS) if scope == "dataset" else set()
        assert sorted(key for key in honoured - fields - blocks if key.split(".")[0] not in blocks) == [], (
            scope
        )


@pytest.mark.parametrize("alias", sorted(key_aliases()), ids=str)
def test_aliases_resolve_as_simpletuner_resolves_them(write_run: Any, alias: str) -> None:
    row = key_status(alias, "config")
    assert row is not None and row.status == "alias"
    mapping = key_aliases()[alias]
    value: Any = 7
    if mapping.inverted:
        value = False
    run = load_config(write_run(config_updates={alias: value}))
    assert not any(f"unknown key '{alias}'" in warning for warning in run.warnings)
    if mapping.maps_to is None:
        assert any(f"'{alias}' ignored, as SimpleTuner ignores it" in note for note in run.notes)
    elif mapping.maps_to in field_names(TrainingConfig):
        assert run.training.flat()[mapping.maps_to] == (True if mapping.inverted else 7)
        assert any(f"'{alias}' read as '{mapping.maps_to}'" in note for note in run.notes)
    else:
        assert any(f"not yet supported: {mapping.maps_to} = " in warning for warning in run.warnings)


def test_deliberate_differences_from_simpletuner_are_explained() -> None:
    for key in ("lora_type", "seed", "optimizer"):
        row = key_status(key, "config")
        assert row is not None and "deliberate" in row.note, key


def test_cosine_with_warmup_is_read_as_cosine(write_run: Any) -> None:
    run = load_config(write_run(config_updates={"lr_scheduler": "cosine_with_warmup"}))
    assert run.training.optimization.lr_scheduler == "cosine"


# SimpleTuner options raytuner does not implement yet, each set to a value that asks for something.
NOT_YET_SUPPORTED: dict[str, Any] = {
    "checkpoint_epoch_interval": 2,
    "validation_on_startup": True,
    "post_upload_script": "notify.sh",
    "publishing_config": "publishing.json",
    "enable_model_cpu_offload": True,
    "checkpointing_rolling_steps": 250,
    "delete_invalid_checkpoints": True,
    "eval_epoch_interval": 1,
    "loss_type": "huber",
    "validation_external_script": "render.sh",
    "input_perturbation": 0.1,
    "crepa_enabled": True,
    "masked_loss_probability": 0.5,
    "fsdp_enable": True,
    "disable_tf32": True,
    "fuse_qkv_projections": True,
    "post_checkpoint_script": "upload.sh",
    "twinflow_enabled": True,
    "maximum_image_size": 2048,
}


def test_not_yet_supported_keys_warn_once_each_and_strict_refuses_them_in_one_error(write_run: Any) -> None:
    config_path = write_run(config_updates=NOT_YET_SUPPORTED)
    run = load_config(config_path)
    for key in NOT_YET_SUPPORTED:
        row = key_status(key, "config")
        assert row is not None and row.status == "not-yet-supported", key
        matching = [
            w for w in run.warnings if w.startswith(f"config.json: accepted, not yet supported: {key} = ")
        ]
        assert len(matching) == 1, key
        assert matching[0].endswith("the run will not do what it asks")

    with pytest.raises(ConfigError) as caught:
        load_config(config_path, strict=True)
    (line,) = caught.value.problems
    assert line.startswith("not yet supported by raytuner (--strict refuses them): config.json: ")
    listed = line.split("config.json: ", 1)[1].split(";")[0].split(", ")
    assert set(NOT_YET_SUPPORTED) <= set(listed)


def test_a_switch_left_off_asks_for_nothing(write_run: Any) -> None:
    quiet = {
        "use_ema": False,
        "push_to_hub": "false",
        "report_to": "none",
        "ema_decay": 0.9,
        "crepa_lambda": 2,
        "fuse_qkv_projections": False,
        "vae_enable_tiling": "false",
        "attention_mechanism": "diffusers",
        # not-applicable keys left at a value that asks for nothing are silent too
        "text_cache_ondemand": False,
        "validation_guidance_rescale": "0.0",
        "max_grounding_entities": 0,
        "adam_beta1": 0.9,
        "keep_vae_loaded": True,
    }
    run = load_config(write_run(config_updates=quiet))
    assert not [w for w in run.warnings if any(f"{key} = " in w or f"'{key}'" in w for key in quiet)]
    for off in ("", "false", False):
        run = load_config(write_run(config_updates={"skip_file_discovery": off}))
        assert not [w for w in run.warnings if "skip_file_discovery" in w], off


def test_not_applicable_keys_still_warn_for_values_that_ask_for_something(write_run: Any) -> None:
    run = load_config(write_run(config_updates={"text_cache_ondemand": True, "adam_beta1": 0.5}))
    assert any("not applicable to raytuner: 'text_cache_ondemand'" in w for w in run.warnings)
    assert any(
        "not applicable to raytuner: 'adam_beta1'" in w and "optimizer_beta1" in w for w in run.warnings
    )


def test_not_applicable_keys_say_what_replaces_them(write_run: Any) -> None:
    config_path = write_run(config_updates={"accelerate_config": "acc.yaml", "flux_guidance_value": 3.5})
    run = load_config(config_path)
    assert any(
        "ignored, not applicable to raytuner: 'accelerate_config': raytuner does not launch through Accelerate"
        in warning
        and "ray_num_workers" in warning
        for warning in run.warnings
    )
    assert any("'flux_guidance_value': applies to SimpleTuner's Flux models only" in w for w in run.warnings)


@pytest.mark.parametrize("config_path", SEED_CONFIGS, ids=lambda path: path.parent.name)
def test_seed_configs_have_no_unknown_keys(config_path: Path) -> None:
    run = load_config(config_path)
    unknown = [warning for warning in run.warnings if "unknown key" in warning]
    assert unknown == []
    compile_warnings = [w for w in run.warnings if "validation_torch_compile" in w]
    assert len(compile_warnings) == (1 if config_path.parent.name == "omnigen" else 0)


@functools.cache
def _function_names(path: Path) -> frozenset[str]:
    # Read as text, not with ast.parse: Python 3.11's AST validation can fail with "recursion depth
    # mismatch" when another thread of the test process (Ray's, a test server's) builds an AST.
    return frozenset(
        re.findall(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)[ \t]*\(", path.read_text("utf-8"), re.M)
    )


def test_honoured_rows_name_tests_that_exist() -> None:
    """Each test an honoured row names is a test function in that file (the run-last check below
    also shows they passed, but only in a whole-suite run)."""
    problems = []
    for row in compatibility_table():
        if row.status != "honoured":
            continue
        assert row.tests, row.key
        for test in row.tests:
            file, _, name = test.partition("::")
            path = REPO_ROOT / file
            if not path.is_file():
                problems.append(f"{row.key}: no file {file}")
                continue
            if name.split("[")[0] not in _function_names(path):
                problems.append(f"{row.key}: {file} has no test {name}")
    assert problems == []


def test_keys_tsv_is_one_line_per_key_and_scope(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--keys", "--format", "tsv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines]
    assert all(len(row) == 5 for row in rows)
    assert len(rows) == len(compatibility_table()) == len({(row[0], row[1]) for row in rows})
    assert {row[1] for row in rows} == {"config", "dataset", "lycoris", "raytuner"}
    # SimpleTuner has 32 names that are both config.json options and dataset keys.
    scopes_per_key = Counter(
        row[0] for row in rows if row[1] in ("config", "dataset") and row[0] in config_keys()
    )
    assert len([key for key, count in scopes_per_key.items() if count == 2]) == 32
    for key, _scope, status, _note, test in rows:
        assert (status == "honoured") == bool(test), key


def test_keys_text_lists_every_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--keys"]) == 0
    out = capsys.readouterr().out
    counts = status_counts("config")
    assert f"config keys ({sum(counts.values())}): {counts['honoured']} honoured" in out
    assert "    validation_torch_compile" in out


def test_the_compatibility_doc_is_current() -> None:
    doc = REPO_ROOT / "docs" / "simpletuner-compatibility.md"
    assert doc.read_text(encoding="utf-8") == format_markdown(), "run `make docs` and commit the result"


def test_the_readme_states_the_current_counts() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    counts = status_counts("config")
    assert "docs/simpletuner-compatibility.md" in readme
    assert f"{counts['honoured']} of {sum(counts.values())} ({honoured_share('config'):.1%})" in readme
    for status in STATUSES:
        assert f"{counts[status]} {status}" in readme, status


def _asserts_something(function: Any) -> bool:
    """True when the test's own body holds an assert, a pytest.raises / pytest.warns block, or a
    call to an ``assert_*`` function (``torch.testing.assert_close`` and the like)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", "")
            if name.startswith("assert_"):
                return True
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("raises", "warns")
            and getattr(node.value, "id", "") == "pytest"
        ):
            return True
    return False


def test_every_honoured_key_names_a_test_that_passed(run_record: Any, request: pytest.FixtureRequest) -> None:
    """Each honoured key's test was collected, asserts something and passed, in this same run.

    It runs last (see tests/conftest.py). A partial run (test files left out, ``-k``, ``-m`` or
    ``--deselect``) cannot show this, so it skips there; the whole suite, as CI runs it, always checks.
    """
    options = request.config.option
    collected_files = {nodeid.split("::")[0] for nodeid in run_record.items}
    all_files = {str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "tests").rglob("test_*.py")}
    if not all_files <= collected_files or options.keyword or options.markexpr or options.deselect:
        pytest.skip("checked only when the whole suite runs")
    problems = []
    for row in compatibility_table():
        if row.status != "honoured":
            continue
        for test in row.tests:
            problems += _test_problems(row.scope, row.key, test, run_record)
    assert problems == []


def _test_problems(scope: str, key: str, test: str, run_record: Any) -> list[str]:
    # A test named without parameters stands for all of its parametrized cases.
    cases = [nodeid for nodeid in run_record.items if nodeid == test or nodeid.startswith(f"{test}[")]
    if not cases:
        return [f"{scope} key {key}: test {test!r} was not collected"]
    problems = []
    for nodeid in cases:
        outcome = run_record.outcomes.get(nodeid, "did not run")
        if outcome != "passed":
            problems.append(f"{scope} key {key}: {nodeid} {outcome}")
    if not _asserts_something(run_record.items[cases[0]].function):
        problems.append(f"{scope} key {key}: {test} asserts nothing")
    return problems
