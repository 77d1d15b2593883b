"""Fixtures of the config tests; what they build lives in tests/config/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.helpers import WriteRun, make_write_run


@pytest.fixture
def write_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteRun:
    """Write config.json, multidatabackend.json and lycoris_config.json into tmp_path and chdir there
    (see :func:`tests.config.helpers.make_write_run`)."""
    return make_write_run(tmp_path, monkeypatch)
