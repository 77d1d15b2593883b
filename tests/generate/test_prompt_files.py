"""Prompts files for ``raytuner generate --prompts``: the forms accepted, the seeds, the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytuner.generate.prompts import PromptFileError, parse_resolution, read_prompt_file


def read(path: Path, **options: int) -> list:
    return read_prompt_file(
        path, seed=options.get("seed", 0), num_images=options.get("num_images", 1), multiple=16
    )


def test_a_text_file_is_one_prompt_per_line_without_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# studio shots\na red cube\n\n  a blue ball  \n", encoding="utf-8")
    requests = read(path, seed=7, num_images=2)
    assert [(r.prompt, r.seed) for r in requests] == [
        ("a red cube", 7),
        ("a red cube", 8),
        ("a blue ball", 7),
        ("a blue ball", 8),
    ]
    assert requests[0].name == "a_red_cube"
    assert len({r.file_name for r in requests}) == 4


def test_a_prompt_library_and_entry_objects(tmp_path: Path) -> None:
    library = tmp_path / "user_prompt_library.json"
    library.write_text(
        json.dumps({"subject/close up": "a portrait", "wide": "a landscape"}), encoding="utf-8"
    )
    assert [(r.name, r.prompt) for r in read(library)] == [
        ("subject_close_up", "a portrait"),
        ("wide", "a landscape"),
    ]

    entries = tmp_path / "prompts.json"
    entries.write_text(
        json.dumps(
            [
                "plain text",
                {
                    "prompt": "wide shot",
                    "resolution": "64x32",
                    "seed": 40,
                    "num_images": 2,
                    "negative_prompt": "fog",
                },
            ]
        ),
        encoding="utf-8",
    )
    plain, first, second = read(entries, seed=1)
    assert (plain.prompt, plain.seed, plain.width) == ("plain text", 1, None)
    assert (first.width, first.height, first.seed, second.seed) == (64, 32, 40, 41)
    assert first.negative_prompt == "fog"


def test_seeds_do_not_depend_on_where_a_prompt_sits(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a\nb\n", encoding="utf-8")
    before = {r.prompt: r.file_name for r in read(path)}
    path.write_text("new\nb\na\n", encoding="utf-8")
    after = {r.prompt: r.file_name for r in read(path)}
    assert after["a"] == before["a"] and after["b"] == before["b"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.json", "[1, 2", "invalid JSON at line 1"),
        ("p.json", '[{"prompt": "x", "steps": 3}]', "unknown key(s) steps"),
        ("p.json", '[{"prompt": ""}]', "'prompt' must be non-empty text"),
        ("p.json", '[{"prompt": "x", "seed": -1}]', "'seed' must be a non-negative integer"),
        ("p.json", '[{"prompt": "x", "resolution": "65"}]', "multiples of 16"),
        ("p.json", '{"a": 3}', "maps each nickname to its prompt text"),
        ("p.json", '"x"', "expected a JSON list"),
        ("p.txt", "# nothing\n\n", "holds no prompts"),
        ("p.txt", "same\nsame\n", "is asked for twice"),
        ("p.csv", "x", "expected a .txt file"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=None) as error:
        read(path)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_resolutions() -> None:
    assert parse_resolution("1024", multiple=16) == (1024, 1024)
    assert parse_resolution("1360x768", multiple=16) == (1360, 768)
    with pytest.raises(ValueError, match=r"e\.g\. 992x496"):
        parse_resolution("1000x500", multiple=16)
