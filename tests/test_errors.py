"""One error type: every expected error is a RaytunerError, which the ``raytuner`` command prints as
``error:`` lines with exit code 2, also when Ray raised it elsewhere; anything else is a bug (exit 1)."""

from __future__ import annotations

import ast
import builtins
import importlib
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from raytuner.cache.format import CacheError
from raytuner.cache.stages import VaeEncoder
from raytuner.cli import main, report_error
from raytuner.config import ConfigError
from raytuner.config.training import DataSection
from raytuner.data.discovery import DatasetError
from raytuner.errors import RaytunerError, find_error
from raytuner.storage import Location, StorageError
from raytuner.train.launcher import TrainError
from raytuner.tune.command import SweepError
from tests.config.helpers import clear_config_variables

PACKAGE = Path(__file__).resolve().parents[1] / "raytuner"

# raytuner's exception classes that are not RaytunerErrors, each with the reason it never reaches
# the user as it is.
NOT_RAYTUNER_ERRORS = {
    "raytuner.config.fields.CoercionError": (
        "control flow inside config loading: every caller turns it into a ConfigError line naming "
        "the file, the key and the value"
    ),
}

# A base class name that makes a class an exception candidate; whether it is one is then checked
# on the imported class.
EXCEPTION_BASE = re.compile(r"(Error|Exception|Warning|Interrupt|Exit)$")
BUILTIN_EXCEPTIONS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


def _name(node: ast.expr) -> str:
    """The last part of a base class expression: ``fmt.CacheError`` -> ``CacheError``."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    return ""


def _exception_classes() -> tuple[dict[str, str], list[str]]:
    """Every class of raytuner/ that may be an exception: ``{module.Class: module}``, and the
    candidates that are not defined at a module's top level (which Ray could not unpickle)."""
    found: dict[str, tuple[str, list[str], bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [_name(base) for base in node.bases]
                found[f"{module}.{node.name}"] = (module, bases, id(node) in top_level)
    names = {qualified.rsplit(".", 1)[1] for qualified in found}
    candidates: set[str] = set()
    changed = True
    while changed:  # a class deriving from a candidate of raytuner is one too
        changed = False
        known = {qualified.rsplit(".", 1)[1] for qualified in candidates}
        for qualified, (_, bases, _) in found.items():
            if qualified in candidates:
                continue
            if any(
                EXCEPTION_BASE.search(base) or base in BUILTIN_EXCEPTIONS or (base in known and base in names)
                for base in bases
            ):
                candidates.add(qualified)
                changed = True
    nested = [qualified for qualified in sorted(candidates) if not found[qualified][2]]
    return {qualified: found[qualified][0] for qualified in sorted(candidates)}, nested


def test_every_exception_class_of_raytuner_is_a_raytuner_error() -> None:
    candidates, nested = _exception_classes()
    assert not nested, f"define exception classes at a module's top level, where Ray can find them: {nested}"
    checked = []
    for qualified, module in candidates.items():
        cls = getattr(importlib.import_module(module), qualified.rsplit(".", 1)[1])
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            continue
        checked.append(qualified)
        if qualified in NOT_RAYTUNER_ERRORS:
            assert not issubclass(cls, RaytunerError), (
                f"{qualified} is a RaytunerError: drop it from the list"
            )
            continue
        assert issubclass(cls, RaytunerError), (
            f"{qualified} does not derive from raytuner.errors.RaytunerError: the command line would "
            "report it as a bug; derive it from RaytunerError, or list it here with the reason it "
            "never reaches the user"
        )
    assert set(NOT_RAYTUNER_ERRORS) <= set(checked), "the list names a class that is gone"
    # The scan found what is known to be there (it would pass vacuously on finding nothing).
    assert {"raytuner.config.errors.ConfigError", "raytuner.cache.format.CacheError"} <= set(checked)
    assert len(checked) >= 20


# --- the type ----------------------------------------------------------------------------------------


def test_problems_are_lines_and_str_is_the_first_with_a_count() -> None:
    one = CacheError("cache/x: written by another VAE")
    assert one.problems == ("cache/x: written by another VAE",)
    assert str(one) == "cache/x: written by another VAE"
    several = ConfigError(["config.json: 'a' = 1: bad", "config.json: 'b' = 2: bad", "config.json: 'c': bad"])
    assert len(several.problems) == 3
    assert str(several) == "config.json: 'a' = 1: bad (and 2 more problems)"
    assert str(ConfigError(["x", "y"])) == "x (and 1 more problem)"
    with pytest.raises(ValueError, match="StorageError needs at least one problem"):
        StorageError([])


def test_the_subclasses_keep_their_builtin_bases() -> None:
    # ``except ValueError`` / ``except RuntimeError`` around raytuner calls still catch them.
    assert isinstance(ConfigError("x"), ValueError) and isinstance(ConfigError("x"), RaytunerError)
    assert isinstance(CacheError("x"), RuntimeError) and isinstance(TrainError("x"), RuntimeError)


@pytest.mark.parametrize(
    "error",
    [ConfigError(["a: 1", "b: 2", "c: 3"]), CacheError("cache: bad"), SweepError("sweep: none")],
    ids=lambda error: type(error).__name__,
)
def test_an_error_pickles_whole(error: RaytunerError) -> None:
    """What Ray does to a worker's error on its way to the driver."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.problems == error.problems
    assert str(copy) == str(error)


def test_find_error_looks_through_causes_and_stops_at_a_bug() -> None:
    inner = ConfigError(["a", "b"])
    try:
        try:
            raise inner
        except ConfigError as error:
            raise RuntimeError("wrapped") from error
    except RuntimeError as outer:
        assert find_error(outer) is inner
    assert find_error(KeyError("x")) is None


# --- the command line --------------------------------------------------------------------------------


@pytest.fixture
def failing_command(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make ``raytuner tiny-model`` raise the exception given."""
    import raytuner.models.tiny

    def install(error: BaseException) -> None:
        def tiny_model_main(family: str, out: str, seed: int = 0) -> int:
            raise error

        monkeypatch.setattr(raytuner.models.tiny, "tiny_model_main", tiny_model_main)

    return install


TINY = ["tiny-model", "--family", "omnigen", "--out", "unused"]


def test_an_expected_error_is_one_error_line_per_problem_and_exit_2(
    failing_command: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    failing_command(ConfigError(["config.json: 'a' = 1: bad", "config.json: 'b' = 2: bad"]))
    assert main(TINY) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: config.json: 'a' = 1: bad",
        "error: config.json: 'b' = 2: bad",
    ]


def test_a_usage_problem_is_an_error_line_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    clear_config_variables(monkeypatch)
    assert main(["check-config"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: no config file found (format json, looked at: config/config.json; ")
    assert line.endswith("pass --config, or set CONFIG_PATH or ENV as for SimpleTuner")


def _deep_bug() -> int:
    settings: dict[str, int] = {}
    return settings["no such key"]


def test_a_bug_is_one_line_with_its_type_message_and_saved_traceback(
    failing_command: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    try:
        _deep_bug()
    except KeyError as error:
        failing_command(error)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(TINY) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: unexpected KeyError: 'no such key' (a bug in raytuner")
    assert lines[0].endswith("run again with --verbose to print it")
    saved = Path(re.search(r"traceback in (\S+), or run", lines[0]).group(1))  # type: ignore[union-attr]
    assert saved.parent == tmp_path
    text = saved.read_text(encoding="utf-8")
    assert text.startswith("Traceback") and "_deep_bug" in text and "KeyError: 'no such key'" in text


@pytest.mark.parametrize("flags", [["-v", *TINY], [*TINY, "--verbose"]], ids=["before", "after"])
def test_verbose_prints_a_bug_s_traceback(
    flags: list[str], failing_command: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        _deep_bug()
    except KeyError as error:
        failing_command(error)
    assert main(flags) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "_deep_bug" in err
    assert err.splitlines()[-1].startswith("error: unexpected KeyError: 'no such key'")
    assert err.splitlines()[-1].endswith("traceback above")


# --- through Ray ---------------------------------------------------------------------------------------

PROBLEMS = ["config.json: 'learning_rate' = 'fast': expected a number", "config.json: 'seed' = -1: bad"]


def test_an_error_raised_in_a_ray_task_arrives_as_raised(
    ray_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    # Defined here, so that Ray sends the function itself (this test module is not importable
    # on the workers).
    def refuse_in_a_task() -> None:
        raise ConfigError(PROBLEMS)

    with pytest.raises(ConfigError) as raised:
        ray.get(ray.remote(refuse_in_a_task).remote())
    wrapper = raised.value
    # Ray's wrapper is a ConfigError too, but its text is the task's traceback and its __init__
    # is Ray's: the error as raised is inside it.
    assert isinstance(wrapper, ray.exceptions.RayTaskError) and "\n" in str(wrapper)
    found = find_error(wrapper)
    assert type(found) is ConfigError
    assert found.problems == tuple(PROBLEMS)
    assert str(found) == f"{PROBLEMS[0]} (and 1 more problem)"
    assert report_error(wrapper) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {line}" for line in PROBLEMS]


def test_an_error_raised_in_a_ray_data_map_arrives_as_raised(ray_cluster: Any) -> None:
    import ray

    from raytuner.ray_runtime import original_map_errors

    def refuse_in_a_map(batch: dict[str, Any]) -> dict[str, Any]:
        raise CacheError("dataset 'shapes': node 10.0.0.2 cannot read /data/shapes")

    with original_map_errors(), pytest.raises(ray.exceptions.RayError) as raised:
        ray.data.range(2).map_batches(refuse_in_a_map).materialize()
    found = find_error(raised.value)
    assert type(found) is CacheError
    assert found.problems == ("dataset 'shapes': node 10.0.0.2 cannot read /data/shapes",)
    assert not ray.data.DataContext.get_current().raise_original_map_exception  # restored


def test_an_error_raised_in_a_ray_train_worker_arrives_as_raised(ray_cluster: Any, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytuner.train.launcher import fit

    def refuse_in_a_worker(config: dict[str, Any]) -> None:
        raise ConfigError(PROBLEMS)

    trainer = TorchTrainer(
        refuse_in_a_worker,
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="refused", storage_path=str(tmp_path)),
    )
    with pytest.raises(ConfigError) as raised:
        fit(trainer)
    assert type(raised.value) is ConfigError
    assert raised.value.problems == tuple(PROBLEMS)


def test_an_encoder_actor_raises_an_unreadable_dataset_on_its_first_call(tmp_path: Path) -> None:
    """Not from its constructor, whose errors reach the driver as text only."""
    encoder = VaeEncoder(
        "cosmos2image",
        "unused",
        None,
        {"shapes": Location(uri=str(tmp_path / "gone"))},
        DataSection(data_backend_config=tmp_path / "multidatabackend.json"),
    )
    with pytest.raises(DatasetError, match=r"^dataset 'shapes': node .* cannot read"):
        encoder({})
