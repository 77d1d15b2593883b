"""Bad configs: each gives one clear, self-contained error line and exit status 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raytuner.cli import main
from raytuner.config import ConfigError, load_config
from tests.config.bad_cases import BAD_CASES


@pytest.mark.parametrize(("case", "files", "fragments"), BAD_CASES, ids=[case[0] for case in BAD_CASES])
def test_bad_config_gives_one_clear_line(
    case: str, files: dict[str, Any], fragments: list[str], write_run: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_run(**files)
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    error = caught.value
    assert isinstance(error, ValueError)
    assert "\n" not in str(error)
    matching = [line for line in error.problems if all(fragment in line for fragment in fragments)]
    assert matching, f"no problem line contains {fragments}: {error.problems}"
    assert all("\n" not in line for line in error.problems)

    assert main(["check-config", "--config", str(config_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert any(
        line.startswith("error: ") and all(f in line for f in fragments) for line in captured.err.splitlines()
    )


def test_missing_config_file_differs_from_malformed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"nope\.json: file not found"):
        load_config("nope.json")
    assert main(["check-config", "--config", "nope.json"]) == 2
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.json: invalid JSON at line 1, column 2"):
        load_config("broken.json")


def test_missing_instance_data_dir_folder_fails_preflight(
    write_run: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_run(make_images=False)
    load_config(config_path)  # loading does not require the folder; the pre-flight check does
    assert main(["check-config", "--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "dataset 'images'" in err and "images': folder does not exist" in err


def test_several_problems_are_reported_together(write_run: Any) -> None:
    config_path = write_run(
        config_updates={"learning_rate": "fast", "train_batch_size": 0, "use_ema": "perhaps"}
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert len(caught.value.problems) == 3
    assert str(caught.value).endswith("(and 2 more problems)")
    # The other files are checked too once config.json itself is usable.
    config_path = write_run(lycoris={"algo": "nope"}, datasets=[])
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert {line.split(":")[0] for line in caught.value.problems} == {
        "multidatabackend.json",
        "lycoris_config.json",
    }
