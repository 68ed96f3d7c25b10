"""Shared pytest fixtures: real server processes on free loopback ports (helpers in testkit.py)."""
from __future__ import annotations

import pytest

from testkit import start_server


def server_factory(scope: str):
    """A fixture of that scope: start(*args, port=, metrics_port=, env=) starts a server with
    quiet logs and those flags (testkit.start_server); every server started is stopped after."""
    @pytest.fixture(scope=scope)
    def factory():
        started = []

        def start(*args: str, **options):
            started.append(start_server("--log-level", "WARNING", *args, **options))
            return started[-1]
        yield start
        for s in started:
            s.stop()
    return factory


serve = server_factory("function")
serve_shared = server_factory("module")       # for tests that only read: one server for many


@pytest.fixture
def server(serve):
    """A fresh single-process server with default settings for one test."""
    return serve()
