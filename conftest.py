"""Shared pytest fixtures: real server processes on free loopback ports (helpers in testkit.py)."""
from __future__ import annotations

import pytest

from testkit import start_server


@pytest.fixture
def server():
    """A fresh single-process server for one test."""
    s = start_server()
    yield s
    s.stop()
