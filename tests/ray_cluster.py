"""What the tests learn of the session's Ray cluster; tests/conftest.py starts it once per session."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RayCluster:
    address: str
    nodes: int
